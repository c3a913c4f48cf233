"""Orbax save/restore of a converted model: DIR/config.json, DIR/weights (Orbax), DIR/tokenizer files.

`save` writes into a temporary sibling folder and renames it into place at the end, so a failure leaves
no partial checkpoint; it refuses to replace an existing folder unless `force=True`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import jax

from . import weights as W
from .config import LlamaConfig

FORMAT = "hybrid_jax"
# 2: layer matrices stored output-major ([out dims..., in dims...], weights.py); version 1 stored them
# input-major. A version-1 checkpoint is refused with the command that converts its source again.
FORMAT_VERSION = 2
CONFIG_FILE = "config.json"
WEIGHTS_DIR = "weights"


def _checkpointer():
    import orbax.checkpoint as ocp
    return ocp.StandardCheckpointer()


def _meta(path: str | os.PathLike) -> dict | None:
    p = Path(path) / CONFIG_FILE
    if not p.is_file():
        return None
    try:
        meta = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def is_checkpoint(path: str | os.PathLike) -> bool:
    return _meta(path) is not None


def is_current(path: str | os.PathLike) -> bool:
    """A checkpoint of this version of the format (one this code restores)."""
    meta = _meta(path)
    return meta is not None and meta.get("format_version") == FORMAT_VERSION


def save(out_dir: str | os.PathLike, cfg: LlamaConfig, params: dict, write_tokenizer: Callable[[Path], None] | None = None,
         force: bool = False, extra: dict | None = None) -> Path:
    """Write a checkpoint atomically. `params` is the nested dict of `weights.shapes` (numpy or jax arrays)."""
    out = Path(out_dir).absolute()
    if out.exists() and not force:
        raise FileExistsError(f"output folder {out} already exists (pass --force / force=True to replace it)")
    W.check(cfg, params)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        umask = os.umask(0o22)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the renamed folder should get the usual mode
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": cfg.to_dict(), **(extra or {})}
        ckptr = _checkpointer()
        ckptr.save(tmp / WEIGHTS_DIR, params)
        ckptr.wait_until_finished()
        if write_tokenizer is not None:
            write_tokenizer(tmp)
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "x")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_config(path: str | os.PathLike) -> LlamaConfig:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model folder {p} does not exist")
    meta = _meta(p)
    if meta is None:
        raise ValueError(f"{p} is not a hybrid_jax checkpoint (no config.json with format {FORMAT!r}); "
                         f"convert it first with `python -m convert --src {p} --out DIR`")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        src = (meta.get("converted_from") or {}).get("path") or "SRC"
        raise ValueError(f"{p} is a hybrid_jax checkpoint of format version {version}; this version of hybrid_jax "
                         f"reads version {FORMAT_VERSION} (the layer matrices' layout changed): convert the source "
                         f"again with `python -m convert --src {src} --out {p} --force`")
    return LlamaConfig.from_dict(meta["model"])


def restore(path: str | os.PathLike, cfg: LlamaConfig | None = None, sharding_fn=None, dtype: str | None = None) -> tuple[LlamaConfig, W.Weights]:
    """Restore weights straight onto devices (into their shards when `sharding_fn` gives shardings)."""
    p = Path(path).absolute()
    cfg = cfg or load_config(p)
    if sharding_fn is None:  # onto the default device (Orbax gives host arrays without a sharding)
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        sharding_fn = lambda name, shape: one  # noqa: E731
    if dtype is not None and dtype != cfg.dtype:
        stored = W.abstract(cfg, sharding_fn)
        params = _checkpointer().restore(p / WEIGHTS_DIR, W.to_dict(stored))
        cfg = cfg.replace(dtype=dtype)
        params = jax.tree.map(lambda a: a.astype(dtype), params)
        return cfg, W.from_dict(params)
    target = W.to_dict(W.abstract(cfg, sharding_fn))
    params = _checkpointer().restore(p / WEIGHTS_DIR, target)
    return cfg, W.from_dict(params)
