"""Typed weight pytrees, their abstract shapes, and random init.

Layout (chosen for batch-1 decode and for tensor parallelism; see docs/ENGINEERING_LOG.md):
- layers are stacked on a leading L axis and sliced statically (Python-unrolled), so no weight is copied;
- every layer matrix is stored output-major, [out dims..., in dims...] (PyTorch's nn.Linear layout): each
  output's weights are contiguous, so a batch-1 matrix-vector kernel (gemv.py) gives each program whole
  rows and needs no split of the reduction, and the product's consumer (the residual add, silu x up) runs
  in the kernel's epilogue (format version 2; docs/ENGINEERING_LOG.md, session 7);
- Q, K and V are one fused matrix grouped by kv head: `wqkv[l, k, g]` is query head k*G+g for g < G,
  the key of kv head k for g == G and its value for g == G+1. A split along K keeps each kv head's
  queries, key and value on one device;
- gate and up are one fused matrix `w13[l, 0]` (gate) and `w13[l, 1]` (up);
- rotary q/k use the Hugging Face (rotate-half) layout.

Legend: L layers, D model, K kv heads, G query heads per kv head, Dh head dim, F ffn, V vocab.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .config import LlamaConfig


@struct.dataclass
class LayerWeights:
    attn_norm: jax.Array  # [L, D]
    wqkv: jax.Array  # [L, K, G+2, Dh, D]
    wo: jax.Array  # [L, D, K, G, Dh]
    mlp_norm: jax.Array  # [L, D]
    w13: jax.Array  # [L, 2, F, D]
    w2: jax.Array  # [L, D, F]


@struct.dataclass
class Weights:
    embed: jax.Array  # [V, D]
    layers: LayerWeights
    final_norm: jax.Array  # [D]
    lm_head: jax.Array | None  # [D, V]; None when tied to embed


def shapes(cfg: LlamaConfig) -> dict:
    """Name -> shape of every tensor, as a nested dict mirroring `Weights`."""
    L, D, K, G, Dh, F, V = cfg.n_layers, cfg.dim, cfg.n_kv_heads, cfg.q_per_kv, cfg.hd, cfg.ffn_dim, cfg.vocab_size
    out = {
        "embed": (V, D),
        "layers": {
            "attn_norm": (L, D),
            "wqkv": (L, K, G + 2, Dh, D),
            "wo": (L, D, K, G, Dh),
            "mlp_norm": (L, D),
            "w13": (L, 2, F, D),
            "w2": (L, D, F),
        },
        "final_norm": (D,),
    }
    if not cfg.tie_embeddings:
        out["lm_head"] = (D, V)
    return out


def from_dict(d: dict) -> Weights:
    return Weights(
        embed=d["embed"],
        layers=LayerWeights(**d["layers"]),
        final_norm=d["final_norm"],
        lm_head=d.get("lm_head"),
    )


def to_dict(w: Weights) -> dict:
    d = {
        "embed": w.embed,
        "layers": {k: getattr(w.layers, k) for k in ("attn_norm", "wqkv", "wo", "mlp_norm", "w13", "w2")},
        "final_norm": w.final_norm,
    }
    if w.lm_head is not None:
        d["lm_head"] = w.lm_head
    return d


def abstract(cfg: LlamaConfig, sharding_fn: Callable[[str, tuple], object] | None = None) -> Weights:
    """`jax.ShapeDtypeStruct` leaves: drives random init, restore, sharding and AOT lowering."""
    dtype = jnp.dtype(cfg.dtype)

    def leaf(name, shape):
        sh = sharding_fn(name, shape) if sharding_fn else None
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sh) if sh is not None else jax.ShapeDtypeStruct(shape, dtype)

    s = shapes(cfg)
    d = {k: leaf(k, v) for k, v in s.items() if k != "layers"}
    d["layers"] = {k: leaf(k, v) for k, v in s["layers"].items()}
    return from_dict(d)


def check(cfg: LlamaConfig, d: dict) -> None:
    """Raise ValueError naming the first tensor missing, extra or of the wrong shape."""
    want = shapes(cfg)

    def walk(w, got, prefix):
        for k, v in w.items():
            if k not in got:
                raise ValueError(f"missing tensor {prefix + k!r}")
            if isinstance(v, dict):
                walk(v, got[k], prefix + k + ".")
            elif tuple(got[k].shape) != tuple(v):
                raise ValueError(f"tensor {prefix + k!r} has shape {tuple(got[k].shape)}, expected {tuple(v)}")
        extra = set(got) - set(w)
        if extra:
            raise ValueError(f"unexpected tensors {sorted(prefix + e for e in extra)}")

    walk(want, d, "")


def init_random(cfg: LlamaConfig, key: jax.Array, scale: float = 0.02) -> Weights:
    """Random weights of the exact shapes (norms near 1). Made where jax puts arrays (the GPU there)."""
    s = shapes(cfg)
    dtype = jnp.dtype(cfg.dtype)
    flat = [("embed", s["embed"]), ("final_norm", s["final_norm"])]
    flat += [("layers." + k, v) for k, v in s["layers"].items()]
    if "lm_head" in s:
        flat.append(("lm_head", s["lm_head"]))
    keys = jax.random.split(key, len(flat))
    out: dict = {"layers": {}}
    for (name, shape), k in zip(flat, keys):
        # drawn in the target dtype: no float32 temporaries (a 7B model's w13 would be 11.5 GB in float32)
        if name.endswith("norm"):
            arr = (1.0 + 0.1 * jax.random.normal(k, shape, dtype)).astype(dtype)
        else:
            arr = (scale * jax.random.normal(k, shape, dtype)).astype(dtype)
        if name.startswith("layers."):
            out["layers"][name[7:]] = arr
        else:
            out[name] = arr
    return from_dict(out)


# ---- conversion from the Hugging Face per-layer layout --------------------------------------------

def from_hf_layers(cfg: LlamaConfig, get: Callable[[str], np.ndarray], dtype=None, progress=None) -> dict:
    """Build the stacked numpy dict from HF-layout tensors (`model.layers.{i}.self_attn.q_proj.weight`, ...).

    `get(name)` returns a numpy array (any float dtype) and raises KeyError for a missing tensor. Every
    tensor's shape is asserted before it is reshaped.
    """
    dtype = np.dtype(dtype or jnp.dtype(cfg.dtype))
    L, D, H, K, G, Dh, F, V = (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.q_per_kv, cfg.hd,
                                cfg.ffn_dim, cfg.vocab_size)

    def fetch(name, shape):
        try:
            a = get(name)
        except KeyError:
            raise ValueError(f"missing tensor {name!r}") from None
        if tuple(a.shape) != tuple(shape):
            raise ValueError(f"tensor {name!r} has shape {tuple(a.shape)}, expected {tuple(shape)}")
        return np.asarray(a, dtype=np.float32)

    out = {"layers": {k: np.empty(v, dtype) for k, v in shapes(cfg)["layers"].items()}}
    lay = out["layers"]
    out["embed"] = fetch("model.embed_tokens.weight", (V, D)).astype(dtype)
    for i in range(L):
        p = f"model.layers.{i}."
        # HF's [out, in] matrices are this layout already: only reshaped (query head h = k*G + g)
        q = fetch(p + "self_attn.q_proj.weight", (H * Dh, D)).reshape(K, G, Dh, D)
        k = fetch(p + "self_attn.k_proj.weight", (K * Dh, D)).reshape(K, 1, Dh, D)
        v = fetch(p + "self_attn.v_proj.weight", (K * Dh, D)).reshape(K, 1, Dh, D)
        lay["wqkv"][i] = np.concatenate([q, k, v], axis=1)
        lay["wo"][i] = fetch(p + "self_attn.o_proj.weight", (D, H * Dh)).reshape(D, K, G, Dh)
        lay["w13"][i, 0] = fetch(p + "mlp.gate_proj.weight", (F, D))
        lay["w13"][i, 1] = fetch(p + "mlp.up_proj.weight", (F, D))
        lay["w2"][i] = fetch(p + "mlp.down_proj.weight", (D, F))
        lay["attn_norm"][i] = fetch(p + "input_layernorm.weight", (D,))
        lay["mlp_norm"][i] = fetch(p + "post_attention_layernorm.weight", (D,))
        if progress:
            progress(1)
    out["final_norm"] = fetch("model.norm.weight", (D,)).astype(dtype)
    if not cfg.tie_embeddings:
        out["lm_head"] = fetch("lm_head.weight", (V, D)).T.astype(dtype)
    return out
