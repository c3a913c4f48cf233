"""Which checkpoint format a source path holds, judged from the files themselves."""
from __future__ import annotations

from pathlib import Path

GGUF_MAGIC = b"GGUF"
KNOWN = ("config.json + model.safetensors (or model.safetensors.index.json), "
         "params.json + consolidated.NN.pth + tokenizer.model, or a single .gguf file")


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def detect(src: Path) -> tuple[str, Path]:
    """('hf' | 'meta' | 'gguf', the path to read); ValueError / FileNotFoundError naming the problem."""
    if not src.exists():
        raise FileNotFoundError(f"source path {src} does not exist")
    if src.is_file():
        if src.suffix == ".gguf" or _magic(src) == GGUF_MAGIC:
            return "gguf", src
        raise ValueError(f"{src} is a file of no known format (expected a .gguf file or a folder holding {KNOWN})")
    if (src / "config.json").is_file():
        if (src / "model.safetensors.index.json").is_file() or (src / "model.safetensors").is_file():
            return "hf", src
    if (src / "params.json").is_file() and any(src.glob("consolidated.*.pth")):
        return "meta", src
    ggufs = sorted(src.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    if len(ggufs) > 1:
        raise ValueError(f"{src} holds several .gguf files ({', '.join(p.name for p in ggufs)}): pass one as the source")
    hint = ""
    if (src / "config.json").is_file():
        hint = " (config.json without model.safetensors: only safetensors weights are supported)"
    elif (src / "params.json").is_file():
        hint = " (params.json without consolidated.NN.pth shards)"
    raise ValueError(f"{src} holds no known format{hint}: expected {KNOWN}")
