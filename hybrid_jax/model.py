"""The LLaMA forward as pure functions of arrays (no jit here: runtime.py compiles).

Dimension legend (einsum letters):
  T new tokens, S cache length, D model, K kv heads, G query heads per kv head, H = K*G heads,
  h head dim (Dh), F ffn, V vocab, L layers. Batch is 1 and implicit.

`forward(params, cache, tokens, positions)` computes the logits of `tokens` (at `positions`, contiguous)
given the cache, and returns the cache with their keys and values written in. It computes what HF
transformers' `LlamaForCausalLM` computes.
"""
from __future__ import annotations

import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from . import decode_attention
from . import gemv as gemv_lib
from . import kv_cache
from .config import LlamaConfig
from .kv_cache import KVCache
from .weights import Weights

log = logging.getLogger(__name__)


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """[Dh/2] inverse frequencies (float32), with llama3 scaling if configured (as HF computes it)."""
    dh = cfg.hd
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dh, 2, dtype=np.int64).astype(np.float32) / dh))
    rs = cfg.rope_scaling
    if rs is None:
        return inv.astype(np.float32)
    low_wl = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wl = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    inv_l = np.where(wavelen > low_wl, inv / rs.factor, inv)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * inv_l / rs.factor + smooth * inv_l
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    return np.where(medium, smoothed, inv_l).astype(np.float32)


def rope_cos_sin(cfg: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin: [T, Dh] float32 for the rotate-half layout."""
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(rope_inv_freq(cfg))[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [T, ..., Dh]; rotate-half rotary embedding, computed in float32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    shape = (cos.shape[0],) + (1,) * (x.ndim - 2) + (cos.shape[1],)
    return (xf * cos.reshape(shape) + rot * sin.reshape(shape)).astype(x.dtype)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * xf.astype(x.dtype)


def attention(cfg: LlamaConfig, q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array) -> jax.Array:
    """q: [T, K, G, h]; k, v: [S, K, h] (cache rows 0..S-1); causal by position. Returns [T, K, G, h]."""
    scale = 1.0 / math.sqrt(cfg.hd)
    s = jnp.einsum("tkgh,skh->kgts", q, k, preferred_element_type=jnp.float32) * scale
    k_pos = jnp.arange(k.shape[0], dtype=jnp.int32)
    mask = k_pos[None, :] <= q_pos[:, None]  # [T, S]
    s = jnp.where(mask[None, None], s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("kgts,skh->tkgh", p.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(q.dtype)


GEMV_MODES = (None, "pallas", "interpret")


# The XLA path's projections as one 2-D matmul [T, Kd] x [N, Kd]^T (True) or as the einsum over the weight's
# several dims (False); None: the 2-D form on the CPU only (read at trace time; scripts/gpu_bg_compile.py's
# *_2d modes set it for an A/B on the GPU).
MATMUL_2D: bool | None = None

# The decode step's projections of one token, by name, that XLA computes as a float32 row reduction,
# sum(w * x, axis=1), where the GEMV kernels run, instead of gemv.gemv; their norm and consumer (residual add,
# silu x up) are XLA's fusions around it. XLA's row-reduction emitter read the 7B's wqkv, wo and w13 at
# 4.2-4.4 TB/s on an H200, where the Pallas GEMVs read them at 3.0-3.9 (the product as well as the pure read;
# runs 67-69, docs/ENGINEERING_LOG.md); for w2 (11008 columns) the product ran at 3.2 and the kernel stays.
# Whole step, 7B, H200: 3.88 -> 3.69 ms (run 70). None: the environment variable HYBRID_JAX_ROW_REDUCE
# (none, or names joined by commas; for ablations) if set, else ROW_REDUCE_AUTO in mode "pallas" and none in
# mode "interpret" (the CPU tests of the kernels themselves); a set overrides both (read when the step is
# traced; `row_reduce_names` is in the executables' key).
PROJECTIONS = {"td,kghd->tkgh": "wqkv", "tkgh,dkgh->td": "wo", "td,cfd->tcf": "w13", "tf,df->td": "w2"}
ROW_REDUCE_AUTO = frozenset({"wqkv", "wo", "w13"})
ROW_REDUCE: frozenset[str] | None = None


def row_reduce_names(mode: str | None) -> frozenset[str]:
    """The projections (PROJECTIONS' names) of one token that _project writes as XLA row reductions in this
    kernel mode."""
    if mode is None:
        return frozenset()
    if ROW_REDUCE is not None:
        return ROW_REDUCE
    env = os.environ.get("HYBRID_JAX_ROW_REDUCE", "").strip().lower()
    if env in ("", "auto"):
        return ROW_REDUCE_AUTO if mode == "pallas" else frozenset()
    names = frozenset() if env in ("none", "off") else frozenset(n.strip() for n in env.split(",") if n.strip())
    if not names <= set(PROJECTIONS.values()):
        raise ValueError(f"HYBRID_JAX_ROW_REDUCE must be none, auto or names from {sorted(PROJECTIONS.values())} "
                         f"joined by commas, got {env!r}")
    return names


def row_reduced(mode: str | None, spec: str) -> bool:
    """Whether _project computes one token's product of this einsum spec as an XLA row reduction."""
    return PROJECTIONS.get(spec) in row_reduce_names(mode)


def _project(mode: str | None, spec: str, x: jax.Array, stacked: jax.Array, l: int, out_shape: tuple,
             norm: jax.Array | None = None, eps: float = 0.0, partials: bool = False,
             residual: jax.Array | None = None, gated: bool = False) -> jax.Array:
    """x @ layer l of a stacked output-major weight [L, (out dims), (in dims)], x first RMS-normed by layer l of the
    stacked `norm` weight if given: `jnp.einsum(spec, rms_norm(x, norm[l]), stacked[l])`, or where the mode is on:
    for one token, an XLA row reduction in float32 if `row_reduced(mode, spec)`, else the Pallas `gemv` (norm
    inside it) where the shape suits it; `gemm` for up to gemv.ROWS_MAX (same result, [T, *out_shape], in x's
    dtype). With `partials` (one token), float32 partial sums [splits, *out_shape] for a consumer that adds them
    (XLA's einsum gives one, in x's dtype's values). The product's consumer, computed as model.py always has
    (gemv.finish), in the kernel's epilogue where the kernel runs one token: `residual` [T, *out_shape] returns
    residual + the product; `gated` (out_shape (2, F): gate and up) returns silu(gate) * up [T, F]."""
    n = math.prod(out_shape)
    kd = math.prod(stacked.shape[1:]) // n
    t = x.shape[0]
    dt = x.dtype
    w = stacked.reshape(stacked.shape[0], n, kd)  # a bitcast of the stacked parameter: no copy
    if t == 1 and row_reduced(mode, spec):
        h = (x if norm is None else rms_norm(x, norm[l], eps)).reshape(1, kd)
        y = jnp.sum(w[l].astype(jnp.float32) * h.astype(jnp.float32), axis=1)  # [N]: float32, as the kernel sums
        if partials:
            return y.reshape((1,) + tuple(out_shape))  # one "split"
        y = y.astype(dt).reshape((1,) + tuple(out_shape))
    elif mode is not None and t == 1 and gemv_lib.supported(kd, n, transposed=True):
        res = None if residual is None else residual.reshape(n)
        y = gemv_lib.gemv(x.reshape(kd), w, l, transposed=True, norm=norm, eps=eps, reduce=not partials,
                          residual=res, gated=gated, interpret=mode == "interpret")
        if partials:
            return y.reshape((-1,) + tuple(out_shape))
        return y.astype(dt).reshape((1,) + (tuple(out_shape[1:]) if gated else tuple(out_shape)))
    elif mode is not None and t > 1 and not partials and gemv_lib.gemm_supported(kd, n, t, dt.itemsize, True):
        # a few tokens (a short prompt's prefill): every row multiplied by each weight tile as it is read
        y = gemv_lib.gemm(x.reshape(t, kd), w, l, transposed=True, norm=norm, eps=eps,
                          interpret=mode == "interpret").astype(dt).reshape((t,) + tuple(out_shape))
    else:
        h = x if norm is None else rms_norm(x, norm[l], eps)
        if MATMUL_2D or (MATMUL_2D is None and jax.default_backend() == "cpu"):
            # the same product as one 2-D matmul [T, Kd] x [N, Kd]^T, which XLA's CPU backend hands to its
            # matmul library; the einsum's several contracted dims it does not (SmolLM2's decode step took
            # 4.2x as long on 2 cores). On the GPU both forms give the same dots (run 51a: 512-row prefill
            # 14.05 ms as 2-D matmuls, 14.02 as the einsum), so it keeps the einsum its measured runs used.
            y = (h.reshape(t, kd) @ w[l].T).reshape((t,) + tuple(out_shape))
        else:
            y = jnp.einsum(spec, h, stacked[l])
        if partials:
            return y.astype(jnp.float32)  # [1, *out_shape]: one "split"
    if gated:
        return jax.nn.silu(y[:, 0].astype(jnp.float32)).astype(dt) * y[:, 1]
    return y if residual is None else residual + y


# Fused attention for a chunk that is its own whole context (`fused_attention`): jax.nn.dot_product_attention
# with this implementation ("cudnn": one cuDNN flash-attention kernel on the GPU; "xla": the same function
# through XLA, for tests off the GPU).
FUSED_ATTENTION = (None, "cudnn", "xla")
_CUDNN_REFUSED: set[str] = set()  # the reasons cuDNN gave for refusing, already logged


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str) -> jax.Array:
    """Causal attention of T queries over the same T keys (positions 0..T-1): q [T, K, G, h], k, v [T, K, h]
    -> [T, K, G, h], as `attention` computes it over a cache holding exactly these keys."""
    T, K, G, h = q.shape
    args = (q.reshape(1, T, K * G, h), k[None], v[None])  # query head k*G+g reads kv head k
    try:
        o = jax.nn.dot_product_attention(*args, is_causal=True, implementation=implementation)
    except (NotImplementedError, RuntimeError) as e:  # no cuDNN, or it refuses this shape, dtype, card, version
        if str(e) not in _CUDNN_REFUSED:  # once per reason, not once per layer of every executable
            _CUDNN_REFUSED.add(str(e))
            log.warning("cuDNN attention unavailable (%s); the prefill uses XLA's implementation", e)
        o = jax.nn.dot_product_attention(*args, is_causal=True, implementation="xla")
    return o.reshape(q.shape).astype(q.dtype)


def attention_block(cfg: LlamaConfig, params: Weights, cache: KVCache, l: int, x: jax.Array,
                    positions: jax.Array, cos, sin, kv_len: int | None,
                    gemv: str | None = None, attn: str | None = None,
                    fused: str | None = None, wo: str | None = None,
                    residual: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """The attention's output for x [T, D] (`residual` + it where given: in the output projection's kernel
    where the kernels run) and the updated cache."""
    lw = params.layers
    G = cfg.q_per_kv
    if attn is not None and x.shape[0] == 1 and decode_attention.supported(cache.max_seq_len, cfg.hd):
        # One token: norm + QKV projection (partial sums) -> one attention kernel that adds them, applies
        # rope, writes the cache row and attends over the filled rows only.
        parts = _project(gemv, "td,kghd->tkgh", x, lw.wqkv, l, lw.wqkv.shape[1:4], norm=lw.attn_norm,
                         eps=cfg.norm_eps, partials=True)  # [splits, K, G+2, h]
        o, kc, vc = decode_attention.attend(parts, cos[0], sin[0], cache.k, cache.v, l, positions[:1],
                                            dtype=x.dtype, interpret=attn == "interpret")
        cache = KVCache(k=kc, v=vc)
        o = o[None]
    else:
        qkv = _project(gemv, "td,kghd->tkgh", x, lw.wqkv, l, lw.wqkv.shape[1:4],
                       norm=lw.attn_norm, eps=cfg.norm_eps)  # [T, K, G+2, h]
        q = apply_rope(qkv[:, :, :G], cos, sin)
        k = apply_rope(qkv[:, :, G], cos, sin)
        v = qkv[:, :, G + 1]
        cache = kv_cache.update(cache, l, positions[0], k, v)
        n = kv_len or cache.max_seq_len
        if fused is not None and n == x.shape[0]:
            # The attended rows are exactly this chunk's (a prompt's own bucket from position 0): one fused
            # kernel over the new keys and values, instead of XLA's scores, mask, softmax and two products.
            o = fused_attention(q, k.astype(cache.k.dtype), v.astype(cache.v.dtype), fused)
        else:
            o = attention(cfg, q, cache.k[l, :n], cache.v[l, :n], positions)
    return _project(gemv or wo, "tkgh,dkgh->td", o, lw.wo, l, (cfg.dim,), residual=residual), cache


def mlp_block(cfg: LlamaConfig, params: Weights, l: int, x: jax.Array, gemv: str | None = None,
              residual: jax.Array | None = None) -> jax.Array:
    """The MLP's output for x [T, D] (`residual` + it where given: in the down projection's kernel where
    the kernels run)."""
    lw = params.layers
    a = _project(gemv, "td,cfd->tcf", x, lw.w13, l, lw.w13.shape[1:3], norm=lw.mlp_norm, eps=cfg.norm_eps,
                 gated=True)  # silu(gate) * up [T, F]
    return _project(gemv, "tf,df->td", a, lw.w2, l, (cfg.dim,), residual=residual)


def trunk(cfg: LlamaConfig, params: Weights, cache: KVCache, tokens: jax.Array, positions: jax.Array,
          kv_len: int | None = None, gemv: str | None = None, attn: str | None = None,
          fused: str | None = None, wo: str | None = None) -> tuple[jax.Array, KVCache]:
    """The residual stream after the last layer [T, D] (before the final norm) and the updated cache.

    tokens, positions: [T] int32, positions contiguous (positions[t] = positions[0] + t) and
    positions[0] + T <= S. `kv_len` (static) limits attention to cache rows 0..kv_len-1, which must cover
    every position attended to. `gemv` ("pallas", or "interpret" off the GPU) computes the projections of a single
    token (T = 1), or of up to gemv.ROWS_MAX tokens, with the kernels of gemv.py (each RMSNorm inside the kernel
    that consumes it) instead of XLA's fusions, except one token's projections that `row_reduce_names` gives (in
    mode "pallas": wqkv, wo, w13), which are XLA row reductions; `attn` (same values) its rope, cache write and
    attention with the kernel of decode_attention.py. `fused` (FUSED_ATTENTION) computes the attention of a chunk
    whose attended rows are exactly its own (kv_len = T, so positions start at 0) with `fused_attention`. `wo`
    (GEMV_MODES) takes the output projection alone through gemv.py's kernels where `gemv` is None: XLA's cuBLAS
    matmul for it at 16-128 rows first copies the layer's slice of the stacked wo into a buffer of its own (32 MB
    per layer for the 7B, ~0.5 ms per prefill on an H200: run 32, docs/ENGINEERING_LOG.md), while the kernel reads
    the stacked weight in place.
    """
    if gemv not in GEMV_MODES:
        raise ValueError(f"gemv must be one of {GEMV_MODES}, got {gemv!r}")
    if attn not in GEMV_MODES:
        raise ValueError(f"attn must be one of {GEMV_MODES}, got {attn!r}")
    if fused not in FUSED_ATTENTION:
        raise ValueError(f"fused must be one of {FUSED_ATTENTION}, got {fused!r}")
    if wo not in GEMV_MODES:
        raise ValueError(f"wo must be one of {GEMV_MODES}, got {wo!r}")
    x = params.embed[tokens]
    cos, sin = rope_cos_sin(cfg, positions)
    for l in range(cfg.n_layers):  # unrolled: static weight slices (which Triton's GEMM fusions read in place)
        x, cache = attention_block(cfg, params, cache, l, x, positions, cos, sin, kv_len, gemv, attn, fused, wo,
                                   residual=x)
        x = mlp_block(cfg, params, l, x, gemv, residual=x)
    return x, cache


def hidden(cfg: LlamaConfig, params: Weights, cache: KVCache, tokens: jax.Array, positions: jax.Array,
           kv_len: int | None = None, gemv: str | None = None, attn: str | None = None,
           fused: str | None = None, wo: str | None = None) -> tuple[jax.Array, KVCache]:
    """Final-normed hidden states [T, D] and the updated cache (arguments as `trunk`)."""
    x, cache = trunk(cfg, params, cache, tokens, positions, kv_len, gemv, attn, fused, wo)
    return rms_norm(x, params.final_norm, cfg.norm_eps), cache


def logits_from_hidden(cfg: LlamaConfig, params: Weights, h: jax.Array, gemv: str | None = None,
                       normed: bool = True) -> jax.Array:
    """[..., D] -> [..., V] float32 logits (fp32 accumulation). With `normed=False`, h is the residual
    stream and the final RMSNorm is applied first (inside the kernel where the kernel runs)."""
    if gemv is not None and h.size == cfg.dim:
        tied = params.lm_head is None
        w = params.embed if tied else params.lm_head
        if gemv_lib.supported(cfg.dim, cfg.vocab_size, transposed=tied):
            y = gemv_lib.gemv(h.reshape(cfg.dim), w, transposed=tied, norm=None if normed else params.final_norm,
                              eps=cfg.norm_eps, interpret=gemv == "interpret")
            return y.reshape(h.shape[:-1] + (cfg.vocab_size,))
    if not normed:
        h = rms_norm(h, params.final_norm, cfg.norm_eps)
    if params.lm_head is None:
        return jnp.einsum("...d,vd->...v", h, params.embed, preferred_element_type=jnp.float32)
    return jnp.einsum("...d,dv->...v", h, params.lm_head, preferred_element_type=jnp.float32)


def forward(cfg: LlamaConfig, params: Weights, cache: KVCache, tokens: jax.Array, positions: jax.Array,
            kv_len: int | None = None, gemv: str | None = None, attn: str | None = None,
            fused: str | None = None, wo: str | None = None) -> tuple[jax.Array, KVCache]:
    """Logits [T, V] (float32) and the updated cache (arguments as `trunk`)."""
    x, cache = trunk(cfg, params, cache, tokens, positions, kv_len, gemv, attn, fused, wo)
    return logits_from_hidden(cfg, params, x, gemv, normed=False), cache
