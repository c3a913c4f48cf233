"""`python -m convert --src PATH --out DIR [--dtype bfloat16|float16|float32] [--force]`.

On failure: one line `error: <problem>` on stderr, exit status 1, and no output folder.
"""
from __future__ import annotations

import argparse
import sys
import warnings


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors too are one line and status 1
        raise ValueError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m convert",
                description="Convert a LLaMA checkpoint (Hugging Face safetensors folder, Meta params.json + "
                            "consolidated.NN.pth folder, or GGUF file) into a hybrid_jax checkpoint folder.")
    p.add_argument("--src", required=True, help="checkpoint folder or .gguf file")
    p.add_argument("--out", required=True, help="output folder (must not exist, unless --force)")
    p.add_argument("--dtype", default=None, help="bfloat16 (default) | float16 | float32: the float tensors; given "
                   "for a GGUF source without --quantize, every tensor is dequantized to it")
    p.add_argument("--quantize", default=None,
                   help="the layer matrices' weight-only quantization: int8 (per output channel; int8-g32: a scale per "
                        "32 inputs), int4 (a scale and an offset per 32 inputs; int4-g64, int4-g128: other groups; "
                        "-sym: no offset), none. Default: "
                        "a GGUF's own Q8_0 / Q4_0 / Q4_1 blocks as they are (unless --dtype is given), else none")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress (a bar on a terminal, a line at the end otherwise)")
    return p


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = lambda message, *a, **k: f"warning: {message}\n"
    try:
        args = _parser().parse_args(argv)
        from .api import convert

        progress = not args.no_progress
        quantize = args.quantize or ("none" if args.dtype else "auto")
        out = convert(args.src, args.out, dtype=args.dtype or "bfloat16", force=args.force, progress=progress,
                      quantize=quantize)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # every failure is one line, no traceback
        msg = " ".join(str(e).split())
        if not isinstance(e, (ValueError, OSError)) or not msg:
            msg = f"{type(e).__name__}: {msg}"
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(1)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
