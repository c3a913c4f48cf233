"""Attention of one new token over the KV cache as one Pallas (Triton) kernel, for the decode step.

XLA computes a decode step's attention as a dozen small kernels per layer: the split-K sum of the QKV
projection, rotary embedding, two cache writes, then scores, mask and max, exp, sum and weighted values,
over every cache row, filled or not, each a few microseconds. This kernel does all of it in one launch per
layer (plus one small XLA fusion that combines the partitions) and reads only the rows that hold tokens:

- it takes the QKV projection's float32 partial sums (gemv.py, `reduce=False`), adds them, rounds to the
  model's dtype and applies rotary embedding to the queries and the new key, in registers;
- the program whose rows hold the new position writes the key and value into the stacked cache, whose
  buffers are the kernel's outputs (input_output_aliases: an in-place write when the cache is donated);
- the rows are split over programs, (KV head, row partition), each walking its rows in blocks with an
  online softmax in float32 (running max and sum) for the G query heads that share the KV head, the new
  token's own key and value coming from registers.

The stacked cache [L, S, K, Dh] is passed whole with the layer as a static index (no slice copies); the
position is a device scalar, so the same compiled step serves every position.

The result equals `model.attention_block`'s up to float32 rounding (the softmax is normalised at the end
rather than before the values are summed; in bf16 the probabilities are not rounded to bf16 first).
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


def partition_rows(cache_len: int, kv_heads: int, bs: int, target_programs: int = 2048) -> int:
    """Rows per program: about `target_programs` programs (kv heads x row partitions) at a full cache, so that
    no program walks more than a few row blocks one after another (2048: 32 rows for the 7B shape, run 15
    of docs/ENGINEERING_LOG.md)."""
    parts = -(-target_programs // kv_heads)
    rows = -(-cache_len // parts)
    return max(bs, -(-rows // bs) * bs)


def _new_token(qkv_ref, cos_ref, sin_ref, kh, *, groups: int, splits: int, scale: float, dtype):
    """The new token's scaled queries and its key (rotary embedding applied) and value for KV head kh, each as
    (first half, second half) in float32 holding `dtype`'s values: the QKV projection's partial sums added and
    rounded to `dtype`."""
    half = cos_ref.shape[-1] // 2
    f32 = jnp.float32
    lo, hi = pl.ds(0, half), pl.ds(half, half)

    def rnd(x):  # round to the model's dtype, as the projection's output is
        return x.astype(dtype).astype(f32)

    def head(j):  # head slot j of this KV head's [G+2] (queries, key, value): the partial sums added
        def add(s, acc):
            return acc[0] + qkv_ref[s, kh, j, lo], acc[1] + qkv_ref[s, kh, j, hi]
        zero = jnp.zeros((half,), f32)
        a, b = jax.lax.fori_loop(0, splits, add, (zero, zero))
        return rnd(a), rnd(b)

    c1, c2, s1, s2 = cos_ref[lo], cos_ref[hi], sin_ref[lo], sin_ref[hi]

    def rope(x):  # rotate-half, as model.apply_rope: x * cos + (-x2, x1) * sin
        return rnd(x[0] * c1 - x[1] * s1), rnd(x[1] * c2 + x[0] * s2)

    qs = [tuple(h * scale for h in rope(head(g))) for g in range(groups)]
    return qs, rope(head(groups)), head(groups + 1)


def _store(k_out, v_out, layer: int, pos, kh, k_new, v_new) -> None:
    """The new token's key and value (halves, as `_new_token` gives them) into row pos of kv head kh."""
    half = k_new[0].shape[0]
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    k_out[layer, pos, kh, lo] = k_new[0].astype(k_out.dtype)
    k_out[layer, pos, kh, hi] = k_new[1].astype(k_out.dtype)
    v_out[layer, pos, kh, lo] = v_new[0].astype(v_out.dtype)
    v_out[layer, pos, kh, hi] = v_new[1].astype(v_out.dtype)


def _kernel(pos_ref, qkv_ref, cos_ref, sin_ref, k_ref, v_ref, m_ref, l_ref, acc_ref, k_out, v_out, *, layer: int,
            groups: int, splits: int, bs: int, rows: int, scale: float, dtype):
    """Program (KV head kh, row partition part). k_out/v_out are k_ref/v_ref's buffers (aliased)."""
    kh, part = pl.program_id(0), pl.program_id(1)
    pos = pos_ref[0]  # the new token's position: rows 0..pos-1 are in the cache, row pos is written here
    half = cos_ref.shape[-1] // 2
    f32 = jnp.float32
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    start = part * rows

    def work():
        qs, k_new, v_new = _new_token(qkv_ref, cos_ref, sin_ref, kh, groups=groups, splits=splits, scale=scale,
                                      dtype=dtype)
        owner = pos // rows == part  # this program's partition holds row pos

        pl.when(owner)(lambda: _store(k_out, v_out, layer, pos, kh, k_new, v_new))

        stop = jnp.minimum(pos, start + rows)  # cached rows of this partition: start..stop-1
        steps = jnp.maximum(stop - start + bs - 1, 0) // bs  # 0 for a partition past the filled rows

        def body(i, carry):
            s0 = pl.multiple_of(start + i * bs, bs)
            rows_ = pl.ds(s0, bs)
            k1 = k_ref[layer, rows_, kh, lo].astype(f32)  # [bs, Dh/2]
            k2 = k_ref[layer, rows_, kh, hi].astype(f32)
            v1 = v_ref[layer, rows_, kh, lo].astype(f32)
            v2 = v_ref[layer, rows_, kh, hi].astype(f32)
            valid = (s0 + jax.lax.broadcasted_iota(jnp.int32, (bs,), 0)) < stop
            out = []
            for g in range(groups):
                m, l, a1, a2 = carry[g]
                q1, q2 = qs[g]
                s = jnp.where(valid, jnp.sum(k1 * q1[None, :], axis=1) + jnp.sum(k2 * q2[None, :], axis=1), _NEG)
                m_new = jnp.maximum(m, jnp.max(s))
                alpha = jnp.exp(m - m_new)
                p = jnp.exp(s - m_new)
                out.append((m_new, l * alpha + jnp.sum(p), a1 * alpha + jnp.sum(p[:, None] * v1, axis=0),
                            a2 * alpha + jnp.sum(p[:, None] * v2, axis=0)))
            return tuple(out)

        zero = jnp.zeros((half,), f32)
        init = tuple((jnp.float32(_NEG), jnp.float32(0.0), zero, zero) for _ in range(groups))
        res = jax.lax.fori_loop(0, steps, body, init)
        for g in range(groups):
            m, l, a1, a2 = res[g]
            q1, q2 = qs[g]
            # the new token, from registers (the owner only)
            s = jnp.where(owner, jnp.sum(q1 * k_new[0]) + jnp.sum(q2 * k_new[1]), _NEG)
            m_new = jnp.maximum(m, s)
            alpha = jnp.exp(m - m_new)
            p = jnp.where(owner, jnp.exp(s - m_new), 0.0)
            m_ref[kh, part, g] = m_new
            l_ref[kh, part, g] = l * alpha + p
            acc_ref[kh, part, g, lo] = a1 * alpha + p * v_new[0]
            acc_ref[kh, part, g, hi] = a2 * alpha + p * v_new[1]

    # Programs whose rows lie past the new token only write an empty result (no QKV sum, rope or reads):
    # faster than running the prologue everywhere (see docs/performance.md, 'Defaults and why').
    pl.when(start <= pos)(work)

    @pl.when(start > pos)
    def _empty():  # a partition past the new row: nothing to add, rope or read
        zero = (pos * 0).astype(f32)  # traced: the Triton lowering cannot store a bare constant scalar
        for g in range(groups):
            m_ref[kh, part, g] = zero + _NEG
            l_ref[kh, part, g] = zero
            acc_ref[kh, part, g, :] = jnp.zeros((2 * half,), f32) + zero


def _check_new_tokens(qkv: jax.Array, cos: jax.Array, sin: jax.Array, k_cache: jax.Array, v_cache: jax.Array) -> None:
    """`attend`'s arguments: qkv [splits, K, G+2, Dh], cos and sin [Dh], a cache [L, S, K, Dh] the kernel
    takes."""
    if qkv.ndim != 4:
        raise ValueError(f"qkv must be [splits, K, G+2, Dh], got shape {qkv.shape}")
    K, G2, Dh = qkv.shape[-3:]
    L, S, Kc, Dc = k_cache.shape
    if G2 < 3 or (Kc, Dc) != (K, Dh) or v_cache.shape != k_cache.shape:
        raise ValueError(f"qkv {qkv.shape} does not match the cache {k_cache.shape} / {v_cache.shape}")
    want = (Dh,)
    if cos.shape != want or sin.shape != want:
        raise ValueError(f"cos/sin must have shape {want}, got {cos.shape} / {sin.shape}")
    if not supported(S, Dh):
        raise ValueError(f"no kernel for cache length {S} and head dim {Dh} (call `supported` first)")


def _compiler_params(interpret: bool) -> dict:
    """The attention kernels' Triton parameters (none in the interpreter)."""
    return {"compiler_params": plt.CompilerParams(num_warps=4, num_stages=2)} if plt is not None and not interpret \
        else {}


def _combine(m: jax.Array, l: jax.Array, acc: jax.Array) -> jax.Array:
    """The partitions' results (m, l [K, P, G], acc [K, P, G, Dh]) combined: [K, G, Dh] float32."""
    w = jnp.exp(m - jnp.max(m, axis=1, keepdims=True))  # [K, P, G]; 0 for empty partitions
    return jnp.sum(acc * w[..., None], axis=1) / jnp.sum(l * w, axis=1)[..., None]


def attend(qkv: jax.Array, cos: jax.Array, sin: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer: int,
           pos: jax.Array, *, dtype=None, rows_per_program: int | None = None,
           interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The attention of one new token, with its key and value written into the cache.

    qkv: float32 [splits, K, G+2, Dh], the projection's partial sums (queries, key, value per KV head; a
    single "split" for an already summed projection); they are added and rounded to `dtype` (default: the
    cache's), and rotary embedding (cos, sin: [Dh] float32 at the token's position) is applied to the
    queries and the key, as `model.attention_block` does. k_cache, v_cache: [L, S, K, Dh]; pos: int32 [1],
    the token's position (0 <= pos < S): rows 0..pos-1 of `layer` are attended, row pos is written.

    Returns (out [K, G, Dh] in `dtype`, k_cache, v_cache), the caches updated in place (their buffers are
    the kernel's outputs). The rows are split over programs (`rows_per_program`, a multiple of the row
    block; default: `partition_rows`, about 2048 programs at a full cache); each leaves its running max, sum and weighted
    values, and XLA combines the partitions (flash-decoding). Partitions past the filled rows read nothing."""
    _check_new_tokens(qkv, cos, sin, k_cache, v_cache)
    splits, K, G2, Dh = qkv.shape
    G, S = G2 - 2, k_cache.shape[1]
    dtype = jnp.dtype(dtype or k_cache.dtype)
    bs = block_rows(S)
    rows = rows_per_program or partition_rows(S, K, bs)
    if rows % bs:
        raise ValueError(f"rows_per_program {rows} is not a multiple of the row block {bs}")
    parts = -(-S // rows)
    kernel = functools.partial(_kernel, layer=layer, groups=G, splits=splits, bs=bs, rows=rows,
                               scale=1.0 / float(Dh) ** 0.5, dtype=dtype)
    params = _compiler_params(interpret)
    f32 = jnp.float32
    m, l, acc, k_cache, v_cache = pl.pallas_call(
        kernel, grid=(K, parts), interpret=interpret, name=f"decode_attention_l{layer}",
        out_shape=(jax.ShapeDtypeStruct((K, parts, G), f32), jax.ShapeDtypeStruct((K, parts, G), f32),
                   jax.ShapeDtypeStruct((K, parts, G, Dh), f32),
                   jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                   jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)),
        input_output_aliases={4: 3, 5: 4},
        **params,
    )(pos.reshape(1).astype(jnp.int32), qkv.astype(f32), cos.astype(f32), sin.astype(f32), k_cache, v_cache)
    return _combine(m, l, acc).astype(dtype), k_cache, v_cache


# ---- a chunk of rows over the cache ----------------------------------------------------------------------------
# The rows of a chunk that does not take cuDNN's fused attention (a prompt's rest after reused rows, a verify step's
# K+1 rows, a chunk of a prompt longer than the largest bucket, a bucket under 128 rows): XLA computes that as scores
# over every row it may attend, filled or not, then mask, softmax and the weighted values, each a kernel of its own
# per layer.

CHUNK_QUERY_ROWS = 64  # query rows (T x G) a program holds: [64, Dh] float32 accumulators in registers
CHUNK_PARTIALS_BYTES = 4 << 20  # the partitions' float32 partial results stay below this per layer


def _chunk_kernel(pos_ref, q_ref, k_ref, v_ref, m_ref, l_ref, acc_ref, *, layer: int, groups: int, t: int, bm: int,
                  bs: int, rows: int, scale: float):
    """Program (KV head kh, row partition part, query block qb): query rows qb*bm .. +bm of kh's T x G (row m is
    token m // G of the chunk, at position pos + m // G) over the cache rows of `part` that any of them sees."""
    kh, part, qb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    pos = pos_ref[0]
    f32 = jnp.float32
    m0 = qb * bm
    # each row's position; padding rows (m >= T x G) as the last token's, their results dropped
    qpos = pos + jnp.minimum((m0 + jax.lax.broadcasted_iota(jnp.int32, (bm,), 0)) // groups, t - 1)
    start = part * rows
    stop = jnp.minimum(pos + jnp.minimum((m0 + bm - 1) // groups, t - 1) + 1, start + rows)  # rows start..stop-1
    steps = jnp.maximum(stop - start + bs - 1, 0) // bs
    q = q_ref[kh, pl.ds(m0, bm), :]  # [bm, Dh]

    def body(i, carry):
        m, l, acc = carry
        s0 = pl.multiple_of(start + i * bs, bs)
        k = k_ref[layer, pl.ds(s0, bs), kh, :]  # [bs, Dh]
        # a block's rows past `stop` (stale, or never written) are zeroed: 0 x inf would leak into the sum
        v = jnp.where((s0 + jax.lax.broadcasted_iota(jnp.int32, (bs, 1), 0)) < stop, v_ref[layer, pl.ds(s0, bs), kh, :],
                      0).astype(v_ref.dtype)
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=f32) * scale  # [bm, bs]
        valid = (s0 + jax.lax.broadcasted_iota(jnp.int32, (bm, bs), 1)) <= qpos[:, None]
        s = jnp.where(valid, s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(valid, jnp.exp(s - m_new[:, None]), 0.0)
        acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=f32)
        return m_new, l * alpha + jnp.sum(p, axis=1), acc

    init = (jnp.full((bm,), _NEG, f32), jnp.zeros((bm,), f32), jnp.zeros((bm, q.shape[1]), f32))
    m, l, acc = jax.lax.fori_loop(0, steps, body, init)
    m_ref[kh, part, pl.ds(m0, bm)] = m
    l_ref[kh, part, pl.ds(m0, bm)] = l
    acc_ref[kh, part, pl.ds(m0, bm), :] = acc


def attend_chunk(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer: int, pos: jax.Array, *,
                 rows_per_program: int | None = None, interpret: bool = False) -> jax.Array:
    """Causal attention of a chunk of T tokens at positions pos .. pos+T-1 over the cache rows 0 .. pos+T-1 of
    `layer`, whose keys and values (the chunk's own included) are already written there.

    q: [T, K, G, Dh] (rotary embedding applied) in the model's dtype; k_cache, v_cache: [L, S, K, Dh]; pos: int32
    [1], with pos + T <= S. Returns [T, K, G, Dh] in q's dtype: `model.attention` over rows 0..S-1 up to float32
    rounding (the softmax normalised at the end; the probabilities rounded to the values' dtype for the tensor-core
    product, as `model.attention` rounds them). Rows past the chunk's last token do not change the result, whatever
    they hold: a program (KV head, row partition, block of query rows) walks only the row blocks its queries see,
    with an online softmax, and XLA combines the partitions."""
    T, K, G, Dh = q.shape
    L, S, Kc, Dc = k_cache.shape
    if (Kc, Dc) != (K, Dh) or v_cache.shape != k_cache.shape:
        raise ValueError(f"q {q.shape} does not match the cache {k_cache.shape} / {v_cache.shape}")
    if not supported(S, Dh):
        raise ValueError(f"no kernel for cache length {S} and head dim {Dh} (call `supported` first)")
    M = T * G
    mp = max(16, 1 << (M - 1).bit_length())  # the tensor-core product's rows: a power of 2, at least 16
    bm = min(mp, CHUNK_QUERY_ROWS)
    bs = block_rows(S)
    if rows_per_program is None:  # as many partitions as the partial results' budget allows, up to ~256 programs
        parts = max(1, min(-(-256 // K), CHUNK_PARTIALS_BYTES // (K * mp * Dh * 4), S // bs))
        rows_per_program = -(-(-(-S // parts)) // bs) * bs
    rows = rows_per_program
    if rows % bs:
        raise ValueError(f"rows_per_program {rows} is not a multiple of the row block {bs}")
    parts = -(-S // rows)
    qm = jnp.transpose(q, (1, 0, 2, 3)).reshape(K, M, Dh)  # row m = token m // G, query head m % G
    if mp != M:
        qm = jnp.pad(qm, ((0, 0), (0, mp - M), (0, 0)))
    kernel = functools.partial(_chunk_kernel, layer=layer, groups=G, t=T, bm=bm, bs=bs, rows=rows,
                               scale=1.0 / float(Dh) ** 0.5)
    params = _compiler_params(interpret)
    f32 = jnp.float32
    m, l, acc = pl.pallas_call(
        kernel, grid=(K, parts, mp // bm), interpret=interpret, name=f"chunk_attention_l{layer}",
        out_shape=(jax.ShapeDtypeStruct((K, parts, mp), f32), jax.ShapeDtypeStruct((K, parts, mp), f32),
                   jax.ShapeDtypeStruct((K, parts, mp, Dh), f32)),
        **params,
    )(pos.reshape(1).astype(jnp.int32), qm.astype(k_cache.dtype), k_cache, v_cache)
    w = jnp.exp(m - jnp.max(m, axis=1, keepdims=True))  # [K, P, Mp]; 0 for partitions past a row's position
    o = jnp.sum(acc * w[..., None], axis=1) / jnp.sum(l * w, axis=1)[..., None]  # [K, Mp, Dh]
    o = o[:, :M].reshape(K, T, G, Dh)
    return jnp.transpose(o, (1, 0, 2, 3)).astype(q.dtype)
