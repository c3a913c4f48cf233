"""Rope scaling of a GGUF llama file. llama.cpp bakes LLaMA 3.1's scaling into a `rope_freqs.weight` tensor
(per-frequency divisors) instead of metadata: recover the `RopeScaling` whose divisors match it."""
from __future__ import annotations

import numpy as np

from hybrid_jax.config import LlamaConfig, RopeScaling


def _divisors(cfg: LlamaConfig) -> np.ndarray:
    from hybrid_jax.model import rope_inv_freq

    return rope_inv_freq(cfg.replace(rope_scaling=None)) / rope_inv_freq(cfg)


def rope_scaling(meta, tensors: dict, cfg: LlamaConfig, dequantize) -> RopeScaling | None:
    kind = meta("llama.rope.scaling.type")
    factor = meta("llama.rope.scaling.factor")
    if kind not in (None, "none") and not (kind == "linear" and factor in (None, 1.0)):
        raise ValueError(f"GGUF rope scaling type {kind!r} is not supported (only LLaMA 3 rope_freqs)")
    if "rope_freqs.weight" not in tensors:
        return None
    got = dequantize(tensors["rope_freqs.weight"]).reshape(-1)
    if got.shape != (cfg.hd // 2,):
        raise ValueError(f"tensor 'rope_freqs.weight' has shape {got.shape}, expected ({cfg.hd // 2},)")
    if np.allclose(got, 1.0):
        return None
    origs = list(dict.fromkeys(int(o) for o in (meta("llama.rope.scaling.original_context_length"), 8192) if o))
    for orig in origs:
        rs = RopeScaling(factor=float(got.max()), low_freq_factor=1.0, high_freq_factor=4.0,
                         original_max_position_embeddings=orig)
        if np.allclose(_divisors(cfg.replace(rope_scaling=rs)), got, rtol=1e-4, atol=1e-6):
            return rs
    raise ValueError("tensor 'rope_freqs.weight' matches no LLaMA 3 rope scaling (low/high freq factors 1/4, "
                     f"original context {' or '.join(map(str, origs))}): this rope scaling is not supported")
