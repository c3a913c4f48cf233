"""The model shapes the GPU scripts take (`--shape`): a preset of hybrid_jax.config, smollm2-135m, or any other
name (by convention "tiny") for a small model that dry-runs a script's loop on the CPU."""
from __future__ import annotations

from hybrid_jax.config import PRESETS, LlamaConfig

# SmolLM2-135M-Instruct's shape (random weights: its real file is the SmolLM2 suite's)
SMOLLM2_135M = LlamaConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
                           rope_theta=100000.0, tie_embeddings=True, dtype="bfloat16")
TINY = LlamaConfig(vocab_size=512, dim=256, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=512, dtype="bfloat16")


def shape_config(name: str) -> LlamaConfig:
    """PRESETS[name], or TINY for a name that is not a preset."""
    return PRESETS.get(name) or {"smollm2-135m": SMOLLM2_135M}.get(name) or TINY
