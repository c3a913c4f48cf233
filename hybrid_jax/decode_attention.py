"""Attention of one new token over the KV cache as one Pallas (Triton) kernel, for the decode step.

XLA computes a decode step's attention as about five kernels per layer (scores, mask and max, exp, sum,
weighted values), each a few microseconds, and over every cache row, filled or not. This kernel does it
in one launch per layer (plus one small XLA fusion that combines the partitions) and reads only the rows
that hold tokens: the rows are split over programs, (KV head, row partition), each walking its rows in
blocks with an online softmax in float32 (running max and sum) for the G query heads that share the KV head. The stacked cache [L, S, K, Dh] is passed whole with the layer as a static index (no
slice copies); n, the number of rows to attend, is a device scalar, so the same compiled step serves every
position.

The result equals `model.attention` up to float32 rounding (the softmax is normalised at the end rather
than before the values are summed; in bf16 the probabilities are not rounded to bf16 first).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:
    from jax.experimental.pallas import triton as plt
except Exception:  # pragma: no cover
    plt = None

_NEG = -1e30  # a finite minus infinity: no inf - inf in the running max


def block_rows(cache_len: int, cap: int = 64) -> int:
    b = 1
    while b * 2 <= cap and cache_len % (b * 2) == 0:
        b *= 2
    return b


def supported(cache_len: int, head_dim: int) -> bool:
    return block_rows(cache_len) >= 16 and head_dim & (head_dim - 1) == 0 and head_dim >= 16


def partition_rows(cache_len: int, kv_heads: int, bs: int, target_programs: int = 256) -> int:
    """Rows per program: enough programs (kv heads x row partitions) to fill the GPU at a full cache."""
    parts = -(-target_programs // kv_heads)
    rows = -(-cache_len // parts)
    return max(bs, -(-rows // bs) * bs)


def _kernel(n_ref, q_ref, k_ref, v_ref, m_ref, l_ref, acc_ref, *, layer: int, groups: int, bs: int, rows: int,
            scale: float):
    kh = pl.program_id(0)
    part = pl.program_id(1)
    n = n_ref[0]
    start = part * rows
    stop = jnp.minimum(n, start + rows)
    steps = jnp.maximum(stop - start + bs - 1, 0) // bs  # 0 for a partition past the filled rows
    qs = [q_ref[kh, g, :].astype(jnp.float32) * scale for g in range(groups)]  # each [Dh]
    dh = qs[0].shape[0]

    def body(i, carry):
        s0 = pl.multiple_of(start + i * bs, bs)
        k = k_ref[layer, pl.ds(s0, bs), kh, :].astype(jnp.float32)  # [bs, Dh]
        v = v_ref[layer, pl.ds(s0, bs), kh, :].astype(jnp.float32)
        valid = (s0 + jax.lax.broadcasted_iota(jnp.int32, (bs,), 0)) < n
        out = []
        for g in range(groups):
            m, l, acc = carry[g]
            s = jnp.where(valid, jnp.sum(k * qs[g][None, :], axis=1), _NEG)  # [bs]
            m_new = jnp.maximum(m, jnp.max(s))
            alpha = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new)
            out.append((m_new, l * alpha + jnp.sum(p), acc * alpha + jnp.sum(p[:, None] * v, axis=0)))
        return tuple(out)

    init = tuple((jnp.float32(_NEG), jnp.float32(0.0), jnp.zeros((dh,), jnp.float32)) for _ in range(groups))
    res = jax.lax.fori_loop(0, steps, body, init)
    for g in range(groups):
        m, l, acc = res[g]
        m_ref[kh, part, g] = m
        l_ref[kh, part, g] = l
        acc_ref[kh, part, g, :] = acc


def attend(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer: int, n: jax.Array, *,
           rows_per_program: int | None = None, interpret: bool = False) -> jax.Array:
    """q: [K, G, Dh] (one token); k_cache, v_cache: [L, S, K, Dh]; n: int32 [1], rows 0..n-1 attended
    (1 <= n <= S). Returns [K, G, Dh] in q's dtype.

    The rows are split over programs (`rows_per_program`, a multiple of the row block; default: about 256
    programs at a full cache); each program leaves its running max, sum and weighted values, and XLA
    combines the partitions (flash-decoding). Partitions past the filled rows read nothing."""
    K, G, Dh = q.shape
    L, S, Kc, Dc = k_cache.shape
    if (Kc, Dc) != (K, Dh) or v_cache.shape != k_cache.shape:
        raise ValueError(f"q {q.shape} does not match the cache {k_cache.shape} / {v_cache.shape}")
    if not supported(S, Dh):
        raise ValueError(f"no kernel for cache length {S} and head dim {Dh} (call `supported` first)")
    bs = block_rows(S)
    rows = rows_per_program or partition_rows(S, K, bs)
    if rows % bs:
        raise ValueError(f"rows_per_program {rows} is not a multiple of the row block {bs}")
    parts = -(-S // rows)
    kernel = functools.partial(_kernel, layer=layer, groups=G, bs=bs, rows=rows, scale=1.0 / float(Dh) ** 0.5)
    params = {}
    if plt is not None and not interpret:
        params["compiler_params"] = plt.CompilerParams(num_warps=4, num_stages=2)
    f32 = jnp.float32
    m, l, acc = pl.pallas_call(
        kernel, grid=(K, parts), interpret=interpret, name=f"decode_attention_l{layer}",
        out_shape=(jax.ShapeDtypeStruct((K, parts, G), f32), jax.ShapeDtypeStruct((K, parts, G), f32),
                   jax.ShapeDtypeStruct((K, parts, G, Dh), f32)),
        **params,
    )(n.reshape(1).astype(jnp.int32), q, k_cache, v_cache)
    w = jnp.exp(m - jnp.max(m, axis=1, keepdims=True))  # [K, P, G]; 0 for empty partitions
    o = jnp.sum(acc * w[..., None], axis=1) / jnp.sum(l * w, axis=1)[..., None]
    return o.astype(q.dtype)
