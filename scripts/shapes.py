"""The model shapes the GPU scripts take (`--shape`): a preset of hybrid_jax.config, or any other name (by
convention "tiny") for a small model that dry-runs a script's loop on the CPU."""
from __future__ import annotations

from hybrid_jax.config import PRESETS, LlamaConfig

TINY = LlamaConfig(vocab_size=512, dim=256, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=512, dtype="bfloat16")


def shape_config(name: str) -> LlamaConfig:
    """PRESETS[name], or TINY for a name that is not a preset."""
    return PRESETS.get(name) or TINY
