"""convert(): any supported checkpoint (HF safetensors, Meta consolidated .pth, GGUF) -> a hybrid_jax checkpoint."""
from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from hybrid_jax import checkpoint, quant, weights
from hybrid_jax.config import DTYPES, LlamaConfig

from .detect import detect
from .source import Source, check_finite


def _open(kind: str, path: Path, dtype: str | None):
    if kind == "hf":
        from .hf import open_source
    elif kind == "meta":
        from .meta import open_source
    else:
        from .gguf_src import open_source
    return open_source(path, dtype)


def _checked(source: Source):
    """source.get, refusing a tensor with NaN / Inf, or (for a float16 conversion) one beyond float16's range."""
    fp16_max = float(np.finfo(np.float16).max)

    def get(name: str) -> np.ndarray:
        a = source.get(name)
        check_finite(name, a, source.where(name))
        if source.cfg.dtype == "float16" and a.size:
            peak = max(float(a.max()), -float(a.min()))
            if peak > fp16_max:  # the cast would make it Inf
                raise ValueError(f"tensor {name!r}{source.where(name)} holds values up to {peak:.4g}, beyond "
                                 f"float16's range ({fp16_max:g}): convert with --dtype bfloat16 or float32")
        return a

    return get


def _scheme(quantize: str | None, source: Source) -> str | None:
    """The checkpoint's quantization: "auto" takes a GGUF's own Q8_0 / Q4_0 / Q4_1 blocks (else none)."""
    if quantize == "auto":
        return source.native_quant
    if quantize in (None, "none"):
        return None
    return quant.parse(quantize).name


def _getter(source: Source, scheme: str | None):
    """The tensors `weights.from_hf_layers` asks for: layer matrices as the source's own blocks where the
    checkpoint keeps its scheme (checked finite), every other tensor as float (`_checked`)."""
    get = _checked(source)
    if scheme is None or scheme != source.native_quant:
        return get

    def get_any(name: str):
        if not name.endswith("proj.weight"):
            return get(name)
        a = source.get_quantized(name)
        for k in ("scale", "zero"):
            if k in a:
                check_finite(f"{name} ({k}s)", a[k], source.where(name).replace(", dequantised", ""))
        return a

    return get_any


def convert(src: str | os.PathLike, out: str | os.PathLike, dtype: str | None = "bfloat16", force: bool = False,
            progress: bool = True, on_config: Callable[[LlamaConfig], None] | None = None,
            quantize: str | None = "auto") -> Path:
    """Convert `src` into the folder `out` (written atomically); return `out`.

    quantize: the layer matrices' quantization (hybrid_jax.quant): "int8" (per output channel), "int4" (a scale and
    an offset per 32 inputs; "int4-g64" etc., "-sym" without the offset), None / "none" for none, or "auto": a GGUF
    whose layer matrices are all Q8_0, Q4_0 or Q4_1 keeps its blocks as they are (int8-g32, int4-g32-sym,
    int4-g32-asym), any other source none. Where the scheme named is the GGUF's own, its blocks are repacked, not requantized.

    `on_config(cfg)` is called with the converted model's config once the source's header is read, before its
    weights are (the loader compiles beside the conversion from it).

    dtype: bfloat16 | float16 | float32, or None for the source's own float type (bfloat16 for GGUF).
    Raises ValueError / FileNotFoundError / FileExistsError naming the problem; leaves no output on failure.
    """
    from tqdm import tqdm

    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if quantize not in (None, "none", "auto"):
        quant.parse(quantize)  # a bad name fails before any file is read
    src, out = Path(src).absolute(), Path(out).absolute()
    if not src.exists():
        raise FileNotFoundError(f"source path {src} does not exist")
    if out.exists() and not force:
        raise FileExistsError(f"output folder {out} already exists (pass --force / force=True to replace it)")
    rsrc, rout = src.resolve(), out.resolve()  # symlinks resolved: a link must not hide the overlap
    if rout == rsrc or rout in rsrc.parents:
        raise ValueError(f"output folder {out} would replace the source {src}: choose an --out outside it")
    if rsrc.is_dir() and rsrc in rout.parents:
        raise ValueError(f"output folder {out} is inside the source folder {src}: choose an --out outside it")
    kind, path = detect(src)
    checkpoint.remove_stale_temps(out)  # before the conversion needs their disk space
    source = _open(kind, path, dtype)
    try:
        cfg = source.cfg.replace(quant=_scheme(quantize, source))
        if cfg.quant is not None:
            for name, (n, kd) in cfg.layer_matrices().items():
                quant.parse(cfg.quant).check(kd, name)
        if on_config is not None:
            on_config(cfg)
        # a bar on a terminal; in a log one line at the end (a failure stays one line: its error)
        tty = sys.stderr.isatty()
        t0 = time.perf_counter()
        with tqdm(total=cfg.n_layers, desc=f"converting {path.name}", unit="layer", disable=not (progress and tty),
                  file=sys.stderr) as bar:
            params = weights.from_hf_layers(cfg, _getter(source, cfg.quant), progress=bar.update)
        extra = source.unused()
        if extra:
            more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
            raise ValueError(f"unexpected tensors in {path.name}: {extra[:5]}{more} (not part of a LLaMA model)")
        if source.tokenizer_missing:
            warnings.warn(f"{source.tokenizer_missing}: the converted model will have no tokenizer", stacklevel=2)
        saved = checkpoint.save(out, cfg, params, write_tokenizer=source.write_tokenizer, force=force,
                                extra={"converted_from": {"format": kind, "path": str(path)}})
        if progress and not tty:
            q = f", layer matrices {cfg.quant}" if cfg.quant else ""
            print(f"converted {path.name} ({cfg.n_layers} layers{q}) in {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr, flush=True)
        return saved
    finally:
        source.close()
