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
- rotary q/k use the Hugging Face (rotate-half) layout;
- with `cfg.quant` (quant.py) each layer matrix is instead a dict of its stored arrays (q, scale[, zero]), the
  matrix flattened to [L, N, Kd]: outputs by inputs, in the same order as the 16-bit layout's dims.

Legend: L layers, D model, K kv heads, G query heads per kv head, Dh head dim, F ffn, V vocab.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from . import quant as Q
from .config import LlamaConfig

MATRICES = ("wqkv", "wo", "w13", "w2")


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


def specs(cfg: LlamaConfig) -> dict:
    """Name -> (shape, dtype name) of every stored array, as a nested dict mirroring `Weights` (a quantized layer
    matrix is a dict of its arrays)."""
    scheme = Q.parse(cfg.quant)

    def walk(d):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out[k] = walk(v)
            elif scheme is not None and k in MATRICES:
                n, kd = cfg.layer_matrices()[k]
                out[k] = scheme.stored(n, kd, (cfg.n_layers,))
            else:
                out[k] = (v, cfg.dtype)
        return out

    return walk(_dense_shapes(cfg))


def shapes(cfg: LlamaConfig) -> dict:
    """Name -> shape of every stored array, as a nested dict mirroring `Weights`."""
    return _map_specs(specs(cfg), lambda shape, dtype: shape)


def float_mask(cfg: LlamaConfig) -> dict:
    """`specs`' nested dict with True for the tensors held in `cfg.dtype`, False for a quantized matrix's arrays."""
    s = specs(cfg)
    mask = _map_specs(s, lambda shape, dtype: True)
    for k, v in s["layers"].items():
        if k in MATRICES and cfg.quant is not None:
            mask["layers"][k] = {a: False for a in v}
    return mask


def _map_specs(d: dict, f) -> dict:
    return {k: _map_specs(v, f) if isinstance(v, dict) else f(*v) for k, v in d.items()}


def _dense_shapes(cfg: LlamaConfig) -> dict:
    """Name -> shape of every tensor in the 16-bit layout."""
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
    def leaf(name, shape, dtype):
        sh = sharding_fn(name, shape) if sharding_fn else None
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sh) if sh is not None else jax.ShapeDtypeStruct(shape, dtype)

    s = specs(cfg)
    d = {k: leaf(k, *v) for k, v in s.items() if k != "layers"}
    d["layers"] = {k: {a: leaf(f"{k}.{a}", *sv) for a, sv in v.items()} if isinstance(v, dict) else leaf(k, *v)
                   for k, v in s["layers"].items()}
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
    """Random weights of the exact shapes (norms near 1). Made where jax puts arrays (the GPU there). Quantized
    matrices get uniform random codes and scales that give their values a spread near `scale`."""
    s = shapes(cfg)
    dtype = jnp.dtype(cfg.dtype)
    scheme = Q.parse(cfg.quant)
    flat = [("embed", s["embed"]), ("final_norm", s["final_norm"])]
    flat += [("layers." + k, v) for k, v in s["layers"].items()]
    if "lm_head" in s:
        flat.append(("lm_head", s["lm_head"]))
    keys = jax.random.split(key, len(flat))
    out: dict = {"layers": {}}
    for (name, shape), k in zip(flat, keys):
        if isinstance(shape, dict):  # a quantized matrix
            k1, k2 = jax.random.split(k)
            code_std = 73.3 if scheme.bits == 8 else 4.6  # a uniform code's spread, about the offset
            arr = {"scale": (scale / code_std * (1 + 0.1 * jax.random.uniform(k2, shape["scale"]))).astype(jnp.float16)}
            if scheme.bits == 8:
                arr["q"] = jax.random.randint(k1, shape["q"], -127, 128, jnp.int32).astype(jnp.int8)
            else:
                arr["q"] = jax.random.bits(k1, shape["q"], jnp.uint8)
            if scheme.asym:
                arr["zero"] = (-8 * arr["scale"].astype(jnp.float32)).astype(jnp.float16)
        # drawn in the target dtype: no float32 temporaries (a 7B model's w13 would be 11.5 GB in float32)
        elif name.endswith("norm"):
            arr = (1.0 + 0.1 * jax.random.normal(k, shape, dtype)).astype(dtype)
        else:
            arr = (scale * jax.random.normal(k, shape, dtype)).astype(dtype)
        if name.startswith("layers."):
            out["layers"][name[7:]] = arr
        else:
            out[name] = arr
    return from_dict(out)


# ---- conversion from the Hugging Face per-layer layout --------------------------------------------

def from_hf_layers(cfg: LlamaConfig, get: Callable[[str], np.ndarray | dict], dtype=None, progress=None) -> dict:
    """Build the stacked numpy dict from HF-layout tensors (`model.layers.{i}.self_attn.q_proj.weight`, ...).

    `get(name)` returns a numpy array (any float dtype) and raises KeyError for a missing tensor. Every
    tensor's shape is asserted before it is reshaped. With `cfg.quant` the layer matrices are quantized
    (quant.quantize_np), one layer at a time; a source may also hand a layer matrix over already quantized in
    that scheme (a dict of its stored arrays, rows in HF's order: GGUF's blocks), which is only reordered.
    """
    dtype = np.dtype(dtype or jnp.dtype(cfg.dtype))
    L, D, H, K, G, Dh, F, V = (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.q_per_kv, cfg.hd,
                                cfg.ffn_dim, cfg.vocab_size)
    scheme = Q.parse(cfg.quant)

    def fetch(name, shape, quantized=False):
        try:
            a = get(name)
        except KeyError:
            raise ValueError(f"missing tensor {name!r}") from None
        if isinstance(a, dict):
            n, kd = shape
            want = scheme.stored(n, kd) if quantized and scheme is not None else None
            if want is None or set(a) != set(want) or any(
                    tuple(a[k].shape) != want[k][0] or a[k].dtype != np.dtype(want[k][1]) for k in want):
                raise ValueError(f"tensor {name!r} came quantized in a form that is not {cfg.quant}'s")
            return a
        if tuple(a.shape) != tuple(shape):
            raise ValueError(f"tensor {name!r} has shape {tuple(a.shape)}, expected {tuple(shape)}")
        return np.asarray(a, dtype=np.float32)

    def quantized(p):
        """A source matrix as the scheme's stored arrays (quantized here unless the source handed them over)."""
        return p if isinstance(p, dict) else Q.quantize_np(p, scheme)

    def rows(parts):
        """Concatenated rows of float [rows, Kd] arrays, or of each stored array of quantized ones."""
        if scheme is None:
            return np.concatenate(parts, axis=0)
        qs = [quantized(p) for p in parts]
        return {k: np.concatenate([q[k] for q in qs], axis=0) for k in qs[0]}

    def qkv_rows(q, k, v):
        """Rows grouped by kv head: head j's G query heads, its key, its value (the order of `wqkv`)."""
        if scheme is None:
            return np.concatenate([q.reshape(K, G, Dh, D), k.reshape(K, 1, Dh, D), v.reshape(K, 1, Dh, D)], axis=1)
        qs, ks, vs = map(quantized, (q, k, v))

        def grouped(a):  # each stored array's rows: [H*Dh | K*Dh | K*Dh] -> per kv head [G*Dh + Dh + Dh]
            return np.concatenate([qs[a].reshape(K, G * Dh, -1), ks[a].reshape(K, Dh, -1), vs[a].reshape(K, Dh, -1)],
                                  axis=1).reshape(-1, qs[a].shape[-1])
        return {a: grouped(a) for a in qs}

    if scheme is None:
        lay = {k: np.empty(v, dtype) for k, v in shapes(cfg)["layers"].items()}
    else:
        for name, (n, kd) in cfg.layer_matrices().items():
            scheme.check(kd, name)
        lay = {k: ({a: np.empty(sh, dt) for a, (sh, dt) in v.items()} if isinstance(v, dict) else np.empty(v[0], dtype))
               for k, v in specs(cfg)["layers"].items()}
    out = {"layers": lay}
    out["embed"] = fetch("model.embed_tokens.weight", (V, D)).astype(dtype)

    def put(name, i, value):
        if isinstance(lay[name], dict):
            for a, arr in value.items():
                lay[name][a][i] = arr
        else:
            lay[name][i] = value.reshape(lay[name].shape[1:])

    for i in range(L):
        p = f"model.layers.{i}."
        quant = scheme is not None
        # HF's [out, in] matrices are this layout already: only reshaped (query head h = k*G + g)
        q = fetch(p + "self_attn.q_proj.weight", (H * Dh, D), quant)
        k = fetch(p + "self_attn.k_proj.weight", (K * Dh, D), quant)
        v = fetch(p + "self_attn.v_proj.weight", (K * Dh, D), quant)
        put("wqkv", i, qkv_rows(q, k, v))
        put("wo", i, rows([fetch(p + "self_attn.o_proj.weight", (D, H * Dh), quant)]))
        put("w13", i, rows([fetch(p + "mlp.gate_proj.weight", (F, D), quant), fetch(p + "mlp.up_proj.weight", (F, D), quant)]))
        put("w2", i, rows([fetch(p + "mlp.down_proj.weight", (D, F), quant)]))
        lay["attn_norm"][i] = fetch(p + "input_layernorm.weight", (D,))
        lay["mlp_norm"][i] = fetch(p + "post_attention_layernorm.weight", (D,))
        if progress:
            progress(1)
    out["final_norm"] = fetch("model.norm.weight", (D,)).astype(dtype)
    if not cfg.tie_embeddings:
        out["lm_head"] = fetch("lm_head.weight", (V, D)).T.astype(dtype)
    return out
