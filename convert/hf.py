"""Hugging Face checkpoint folders: config.json + model.safetensors, or shards listed in model.safetensors.index.json.

Tensors are read lazily, one at a time, with safetensors' numpy framework (importing ml_dtypes lets numpy
name bfloat16, so bf16 files need no torch).
"""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers numpy's 'bfloat16' dtype, which safetensors' numpy reader asks for)
import numpy as np

from hybrid_jax.config import LlamaConfig

from .source import Source, check_layer_count, check_shape, hf_shapes

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja",
                   "chat_template.json")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path.name} is not valid JSON ({path}): {e}") from None


def _config(folder: Path, dtype: str | None) -> LlamaConfig:
    hf = read_json(folder / "config.json")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ValueError(f"config.json sets {key}: biases are not supported")
    cfg = LlamaConfig.from_hf(hf, dtype=dtype)
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():  # generation_config.json's ids are the ones generation uses: they win
        gen = read_json(gen_path)
        eos = gen.get("eos_token_id")
        if eos is not None:
            cfg = cfg.replace(eos_token_ids=tuple(int(e) for e in (eos if isinstance(eos, list) else [eos])))
        if gen.get("bos_token_id") is not None:
            cfg = cfg.replace(bos_token_id=int(gen["bos_token_id"]))
    return cfg


def _open_files(folder: Path, stack: contextlib.ExitStack) -> dict[str, tuple[str, object]]:
    """Tensor name -> (file name, open safetensors handle)."""
    from safetensors import SafetensorError, safe_open

    if (folder / INDEX).is_file():
        files = sorted(set(read_json(folder / INDEX).get("weight_map", {}).values()))
        if not files:
            raise ValueError(f"{INDEX} in {folder} lists no tensors (no 'weight_map')")
    else:
        files = [SINGLE]
    where = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"safetensors file {name} (listed in {INDEX}) does not exist in {folder}")
        try:
            f = stack.enter_context(safe_open(str(path), framework="numpy"))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"safetensors file {path} is truncated or corrupt: {e}") from None
        for key in f.keys():
            where[key] = (name, f)
    return where


def open_source(folder: Path, dtype: str | None) -> Source:
    cfg = _config(folder, dtype)
    stack = contextlib.ExitStack()
    try:
        where = _open_files(folder, stack)
    except BaseException:
        stack.close()
        raise
    check_layer_count(cfg.n_layers, where, r"model\.layers\.(\d+)\.", "config.json says num_hidden_layers")
    expected = hf_shapes(cfg)
    for name, shape in expected.items():  # every shape before any data is read or allocated
        if name in where:
            check_shape(name, where[name][1].get_slice(name).get_shape(), shape, f" in {where[name][0]}")
    used: set[str] = set()

    def get(name: str) -> np.ndarray:
        if name not in where:
            raise KeyError(name)
        file, f = where[name]
        sl = f.get_slice(name)
        check_shape(name, sl.get_shape(), expected[name], f" in {file}")
        if sl.get_dtype() not in FLOAT_DTYPES:
            raise ValueError(f"tensor {name!r} in {file} has dtype {sl.get_dtype()}; only float tensors are supported")
        used.add(name)
        return f.get_tensor(name)

    def unused() -> list[str]:
        ignore = {"lm_head.weight"} if cfg.tie_embeddings else set()  # some tied checkpoints store it anyway
        return sorted(n for n in where if n not in used and n not in ignore and not n.endswith("rotary_emb.inv_freq"))

    present = [n for n in TOKENIZER_FILES if (folder / n).is_file()]

    def write_tokenizer(out: Path) -> None:
        for n in present:
            shutil.copy2(folder / n, out / n)

    has_tok = any(n in present for n in ("tokenizer.json", "tokenizer.model", "vocab.json"))
    return Source(cfg, get, unused, write_tokenizer, close=stack.close,
                  tokenizer_missing=None if has_tok else f"no tokenizer files in {folder}",
                  where=lambda name: f" in {where[name][0]}" if name in where else "")
