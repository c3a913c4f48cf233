"""The one place that knows the rotary q/k row order of Meta's and Hugging Face's LLaMA layouts.

Meta (and llama.cpp's GGUF files) rotate interleaved pairs of each head's rows: (0, 1), (2, 3), ...
Hugging Face rotates halves: (0, Dh/2), (1, Dh/2 + 1), ... The same rows, permuted within each head.
`meta_to_hf_qk` is the `permute` of transformers' convert_llama_weights_to_hf.py and the
`_reverse_permute_weights` of its GGUF loader; `hf_to_meta_qk` is llama.cpp's `permute`.
"""
from __future__ import annotations

import numpy as np


def _check(w: np.ndarray, n_heads: int, head_dim: int) -> None:
    if head_dim % 2 or w.shape[0] != n_heads * head_dim:
        raise ValueError(f"cannot permute q/k rows: {w.shape[0]} rows for {n_heads} heads of dim {head_dim}")


def meta_to_hf_qk(w: np.ndarray, n_heads: int, head_dim: int) -> np.ndarray:
    """[n_heads*Dh, ...] rows in Meta's interleaved order -> HF's rotate-half order."""
    _check(w, n_heads, head_dim)
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_to_meta_qk(w: np.ndarray, n_heads: int, head_dim: int) -> np.ndarray:
    """The inverse of `meta_to_hf_qk`: HF's rotate-half order -> Meta's interleaved order."""
    _check(w, n_heads, head_dim)
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qk_rows_to_hf(a: np.ndarray, is_q: bool, is_k: bool, n_heads: int, n_kv_heads: int, head_dim: int) -> np.ndarray:
    """Apply `meta_to_hf_qk` to a q or k projection read in Meta's (or llama.cpp's) row order; other
    tensors pass through."""
    if is_q:
        return meta_to_hf_qk(a, n_heads, head_dim)
    if is_k:
        return meta_to_hf_qk(a, n_kv_heads, head_dim)
    return a
