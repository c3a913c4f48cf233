"""The LLaMA forward as pure functions of arrays (no jit here: runtime.py compiles).

Dimension legend (einsum letters):
  T new tokens, S cache length, D model, K kv heads, G query heads per kv head, H = K*G heads,
  h head dim (Dh), F ffn, V vocab, L layers. Batch is 1 and implicit.

`forward(params, cache, tokens, positions)` computes the logits of `tokens` (at `positions`, contiguous)
given the cache, and returns the cache with their keys and values written in. It computes what HF
transformers' `LlamaForCausalLM` computes.
"""
from __future__ import annotations

import dataclasses
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

from . import decode_attention
from . import gemv as gemv_lib
from . import kv_cache
from . import qgemv
from . import quant
from . import sharding
from .config import LlamaConfig
from .kv_cache import KVCache
from .options import KernelOptions
from .weights import LayerWeights, Weights

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


# Cache rows a block of `attend_filled` reads.
FILLED_BLOCK = 128


def attend_filled(cfg: LlamaConfig, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer: int,
                  pos: jax.Array, kv_len: int) -> jax.Array:
    """One token's attention (q [1, K, G, h], at position `pos`, its key and value already in the cache) over
    the cache rows 0..pos of `layer` only: a loop over blocks of FILLED_BLOCK rows up to pos's block, with an
    online softmax (float32), instead of scores over all `kv_len` rows. Returns [1, K, G, h] in q's dtype."""
    f32 = jnp.float32
    _, _, K, h = k_cache.shape
    B = min(FILLED_BLOCK, kv_len)
    neg = jnp.finfo(f32).min
    qs = q[0].astype(f32) * (1.0 / math.sqrt(cfg.hd))  # [K, G, h]

    def body(i, carry):
        m, l, acc = carry  # [K, G], [K, G], [K, G, h]
        start = jnp.minimum(i * B, kv_len - B)  # the last block ends at kv_len; rows before i * B are masked
        kb = jax.lax.dynamic_slice(k_cache, (layer, start, 0, 0), (1, B, K, h))[0].astype(f32)
        vb = jax.lax.dynamic_slice(v_cache, (layer, start, 0, 0), (1, B, K, h))[0].astype(f32)
        rows = start + jnp.arange(B, dtype=jnp.int32)
        s = jnp.einsum("kgh,bkh->kgb", qs, kb)
        s = jnp.where((rows >= i * B) & (rows <= pos), s, neg)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.exp(s - m_new[..., None])
        alpha = jnp.exp(m - m_new)
        return m_new, l * alpha + jnp.sum(p, axis=-1), acc * alpha[..., None] + jnp.einsum("kgb,bkh->kgh", p, vb)

    G = q.shape[2]
    init = (jnp.full((K, G), neg, f32), jnp.zeros((K, G), f32), jnp.zeros((K, G, h), f32))
    _, l, acc = jax.lax.fori_loop(0, pos // B + 1, body, init)
    return (acc / l[..., None])[None].astype(q.dtype)


# The decode step's layer projections by einsum spec -> name (options.KernelOptions.row_reduce names them).
PROJECTIONS = {"td,kghd->tkgh": "wqkv", "tkgh,dkgh->td": "wo", "td,cfd->tcf": "w13", "tf,df->td": "w2"}


def _options(opts: KernelOptions | None) -> KernelOptions:
    """The resolved options a traced function reads; None: XLA's path everywhere (the 2-D matmul form on the CPU)."""
    if opts is None:
        return KernelOptions.xla(matmul_2d=jax.default_backend() == "cpu")
    if not isinstance(opts, KernelOptions) or not opts.resolved:
        raise ValueError(f"opts must be resolved KernelOptions (options.resolve), got {opts!r}")
    return opts


def _gemv_runs(opts: KernelOptions, name: str, kd: int, n: int) -> bool:
    """Whether the one-token step computes projection `name` (16-bit, [N, Kd]) through the Pallas gemv."""
    return opts.gemv != "xla" and name not in opts.row_reduce and gemv_lib.supported(kd, n, transposed=True)


def _head_gemv(cfg: LlamaConfig, params: Weights, opts: KernelOptions) -> tuple[jax.Array, bool] | None:
    """The LM head's weight and layout (tied: the embedding, output-major) where one row of logits goes through
    the Pallas gemv, else None."""
    tied = params.lm_head is None
    if opts.gemv != "xla" and gemv_lib.supported(cfg.dim, cfg.vocab_size, transposed=tied):
        return (params.embed if tied else params.lm_head), tied
    return None


def _project(opts: KernelOptions, spec: str, x: jax.Array, stacked: jax.Array, l: int, out_shape: tuple,
             norm: jax.Array | None = None, eps: float = 0.0, partials: bool = False,
             residual: jax.Array | None = None, gated: bool = False) -> jax.Array:
    """x @ layer l of a stacked output-major weight [L, (out dims), (in dims)], x first RMS-normed by layer l of the
    stacked `norm` weight if given: `jnp.einsum(spec, rms_norm(x, norm[l]), stacked[l])`, computed as `opts` says:
    one token (the decode step) where `opts.gemv` runs kernels: an XLA row reduction in float32 for the
    projections named in `opts.row_reduce`, else the Pallas `gemv` (norm inside it) where the shape suits it; the
    output projection of up to gemv.ROWS_MAX tokens through `gemm` where `opts.prefill_wo` says so (same result,
    [T, *out_shape], in x's dtype). With `partials` (one token), float32 partial sums [splits, *out_shape] for a
    consumer that adds them (XLA's einsum gives one, in x's dtype's values). The product's consumer, computed as
    model.py always has (gemv.finish), in the kernel's epilogue where the kernel runs one token: `residual`
    [T, *out_shape] returns residual + the product; `gated` (out_shape (2, F): gate and up) returns
    silu(gate) * up [T, F]."""
    n = math.prod(out_shape)
    t = x.shape[0]
    dt = x.dtype
    if isinstance(stacked, dict):  # quantized (quant.py): XLA's products over the matrix dequantized in the fusion
        return _project_quantized(opts, PROJECTIONS[spec], x, stacked, l, tuple(out_shape), norm, eps, partials,
                                  residual, gated)
    kd = math.prod(stacked.shape[1:]) // n
    name = PROJECTIONS[spec]
    mode = opts.gemv if t == 1 else (opts.prefill_wo if name == "wo" else "xla")
    w = stacked.reshape(stacked.shape[0], n, kd)  # a bitcast of the stacked parameter: no copy
    if t == 1 and mode != "xla" and name in opts.row_reduce:
        h = (x if norm is None else rms_norm(x, norm[l], eps)).reshape(1, kd)
        y = jnp.sum(w[l].astype(jnp.float32) * h.astype(jnp.float32), axis=1)  # [N]: float32, as the kernel sums
        if partials:
            return y.reshape((1,) + tuple(out_shape))  # one "split"
        y = y.astype(dt).reshape((1,) + tuple(out_shape))
    elif t == 1 and _gemv_runs(opts, name, kd, n):
        res = None if residual is None else residual.reshape(n)
        y = gemv_lib.gemv(x.reshape(kd), w, l, transposed=True, norm=norm, eps=eps, reduce=not partials,
                          residual=res, gated=gated, interpret=mode == "interpret")
        if partials:
            return y.reshape((-1,) + tuple(out_shape))
        return y.astype(dt).reshape((1,) + (tuple(out_shape[1:]) if gated else tuple(out_shape)))
    elif mode != "xla" and t > 1 and not partials and gemv_lib.gemm_supported(kd, n, t, dt.itemsize, True):
        # a few tokens (a short prompt's prefill): every row multiplied by each weight tile as it is read
        y = gemv_lib.gemm(x.reshape(t, kd), w, l, transposed=True, norm=norm, eps=eps,
                          interpret=mode == "interpret").astype(dt).reshape((t,) + tuple(out_shape))
    else:
        h = x if norm is None else rms_norm(x, norm[l], eps)
        if opts.matmul_2d:
            # one 2-D matmul [T, Kd] x [N, Kd]^T, which XLA's CPU backend hands to its matmul library (not the
            # einsum's several contracted dims); the GPU keeps the einsum (see docs/performance.md)
            y = (h.reshape(t, kd) @ w[l].T).reshape((t,) + tuple(out_shape))
        else:
            y = jnp.einsum(spec, h, stacked[l])
        if partials:
            return y.astype(jnp.float32)  # [1, *out_shape]: one "split"
    return _consume(y, residual, gated)


def _consume(y: jax.Array, residual: jax.Array | None, gated: bool) -> jax.Array:
    """A product's consumer in XLA, on y [T, *out_shape] in x's dtype: silu(gate) * up, or residual + y."""
    if gated:
        return jax.nn.silu(y[:, 0].astype(jnp.float32)).astype(y.dtype) * y[:, 1]
    return y if residual is None else residual + y


def _project_quantized(opts: KernelOptions, name: str, x: jax.Array, qm: dict, l: int, out_shape: tuple,
                       norm: jax.Array | None, eps: float, partials: bool, residual: jax.Array | None,
                       gated: bool) -> jax.Array:
    """`_project` of a quantized matrix: one token, where `opts.gemv` runs kernels and `name` is not in
    `opts.row_reduce`, through the Pallas kernel over the codes (qgemv.py; the norm and the consumer inside it,
    as for 16-bit weights); else in XLA: one token as float32 sums over the codes (quant.matvec or
    matvec_grouped, as `opts.quant_matvec` says), a chunk through qgemv.gemm where `opts.quant_prefill` runs
    kernels (up to qgemv.gemm_rows_max rows), else as a matmul over the values dequantized to x's dtype (quant.dequantize), or with one int8 scale a
    row over the codes, the scales applied to the product."""
    t = x.shape[0]
    kd = math.prod(x.shape[1:])
    n = math.prod(out_shape)
    dt = x.dtype
    scheme = quant.scheme_of(qm, kd)
    if t == 1 and opts.gemv != "xla" and name not in opts.row_reduce and qgemv.supported(kd, n, scheme) \
            and (not gated or (n // 2) % qgemv.default_config(kd, n, scheme).bn == 0):
        res = None if residual is None else residual.reshape(n)
        y = qgemv.gemv(x.reshape(kd), qm, l, scheme, norm=norm, eps=eps, reduce=not partials, residual=res,
                       gated=gated, interpret=opts.gemv == "interpret")
        if partials:
            return y.reshape((-1,) + out_shape)
        return y.astype(dt).reshape((1,) + (out_shape[1:] if gated else out_shape))
    h = (x if norm is None else rms_norm(x, norm[l], eps)).reshape(t, kd)
    if t == 1:
        mv = quant.matvec if opts.quant_matvec == "rowsum" else quant.matvec_grouped
        y = mv(qm, l, scheme, h[0])  # [N] float32
        if partials:
            return y.reshape((1,) + out_shape)  # one "split"
    elif opts.quant_prefill != "xla" and t <= qgemv.gemm_rows_max(scheme) and qgemv.gemm_supported(kd, n, scheme):
        # codes dequantized tile by tile
        y = qgemv.gemm(h, qm, l, scheme, interpret=opts.quant_prefill == "interpret")
        if partials:
            return y.astype(dt).astype(jnp.float32).reshape((1,) + out_shape)
    elif scheme.bits == 8 and scheme.group is None:  # one scale a row: applied to the product's columns
        y = jnp.dot(h, qm["q"][l].astype(dt).T, preferred_element_type=jnp.float32) * qm["scale"][l][:, 0].astype(jnp.float32)
    else:
        w = quant.dequantize(qm, l, scheme, dt)  # [N, Kd]
        y = jnp.dot(h, w.T, preferred_element_type=jnp.float32)
        if partials:
            return y.astype(dt).astype(jnp.float32).reshape((1,) + out_shape)
    return _consume(y.astype(dt).reshape((t,) + out_shape), residual, gated)


# Fused attention for a chunk that is its own whole context (`fused_attention`): jax.nn.dot_product_attention
# with the implementation options.KernelOptions.prefill_attention names ("cudnn": one cuDNN flash-attention
# kernel on the GPU; "xla": the same function through XLA, for tests off the GPU).
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
                    positions: jax.Array, cos, sin, kv_len: int | None, opts: KernelOptions | None = None,
                    residual: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """The attention's output for x [T, D] (`residual` + it where given: in the output projection's kernel
    where the kernels run) and the updated cache."""
    opts = _options(opts)
    lw = params.layers
    G = cfg.q_per_kv
    t = x.shape[0]
    if t == 1 and opts.decode_attention != "xla" and decode_attention.supported(cache.max_seq_len, cfg.hd):
        # One token: norm + QKV projection (partial sums) -> one attention kernel that adds them, applies
        # rope, writes the cache row and attends over the filled rows only.
        parts = _project(opts, "td,kghd->tkgh", x, lw.wqkv, l, (cfg.n_kv_heads, G + 2, cfg.hd), norm=lw.attn_norm,
                         eps=cfg.norm_eps, partials=True)  # [splits, K, G+2, h]
        o, kc, vc = decode_attention.attend(parts, cos[0], sin[0], cache.k, cache.v, l, positions[:1],
                                            dtype=x.dtype, interpret=opts.decode_attention == "interpret")
        cache = KVCache(k=kc, v=vc)
        o = o[None]
    else:
        qkv = _project(opts, "td,kghd->tkgh", x, lw.wqkv, l, (cfg.n_kv_heads, G + 2, cfg.hd),
                       norm=lw.attn_norm, eps=cfg.norm_eps)  # [T, K, G+2, h]
        q = apply_rope(qkv[:, :, :G], cos, sin)
        k = apply_rope(qkv[:, :, G], cos, sin)
        v = qkv[:, :, G + 1]
        cache = kv_cache.update(cache, l, positions[0], k, v)
        n = kv_len or cache.max_seq_len
        if opts.prefill_attention != "off" and n == t and t >= opts.prefill_attention_min_rows:
            # The attended rows are exactly this chunk's (a prompt's own bucket from position 0): one fused
            # kernel over the new keys and values, instead of XLA's scores, mask, softmax and two products.
            o = fused_attention(q, k.astype(cache.k.dtype), v.astype(cache.v.dtype), opts.prefill_attention)
        elif opts.chunk_attention != "xla" and decode_attention.supported(cache.max_seq_len, cfg.hd):
            # One kernel over the rows each token sees (no scores over unfilled rows, no separate mask/softmax).
            o = decode_attention.attend_chunk(q, cache.k, cache.v, l, positions[:1],
                                              interpret=opts.chunk_attention == "interpret")
        elif t == 1 and opts.matmul_2d:
            # XLA's CPU path: the filled rows only (scores over the whole cache doubled SmolLM2's decode step)
            o = attend_filled(cfg, q, cache.k, cache.v, l, positions[0], n)
        else:
            o = attention(cfg, q, cache.k[l, :n], cache.v[l, :n], positions)
    return _project(opts, "tkgh,dkgh->td", o, lw.wo, l, (cfg.dim,), residual=residual), cache


def mlp_block(cfg: LlamaConfig, params: Weights, l: int, x: jax.Array, opts: KernelOptions | None = None,
              residual: jax.Array | None = None) -> jax.Array:
    """The MLP's output for x [T, D] (`residual` + it where given: in the down projection's kernel where
    the kernels run)."""
    opts = _options(opts)
    lw = params.layers
    a = _project(opts, "td,cfd->tcf", x, lw.w13, l, (2, cfg.ffn_dim), norm=lw.mlp_norm, eps=cfg.norm_eps,
                 gated=True)  # silu(gate) * up [T, F]
    return _project(opts, "tf,df->td", a, lw.w2, l, (cfg.dim,), residual=residual)


def trunk(cfg: LlamaConfig, params: Weights, cache: KVCache, tokens: jax.Array, positions: jax.Array,
          kv_len: int | None = None, opts: KernelOptions | None = None) -> tuple[jax.Array, KVCache]:
    """The residual stream after the last layer [T, D] (before the final norm) and the updated cache.

    tokens, positions: [T] int32, positions contiguous (positions[t] = positions[0] + t) and
    positions[0] + T <= S. `kv_len` (static) limits attention to cache rows 0..kv_len-1, which must cover
    every position attended to. `opts` (resolved options.KernelOptions, a static argument; None: XLA's path)
    says which kernels compute what: for one token (T = 1, the decode step) the projections through gemv.py's
    kernels (each RMSNorm inside the kernel that consumes it) or as XLA row reductions, and the rope, cache write
    and attention through decode_attention.py's kernel; for a chunk (T > 1, the prefill) the output projection
    through `gemv.gemm` (it reads the stacked weight in place, where XLA's matmul first copies the layer's
    slice) and the attention of a chunk whose attended rows are exactly its own (kv_len = T, positions from 0)
    through `fused_attention`.

    With kernels in `opts` and a context mesh (jax.set_mesh, as runtime.Runtime lowers under a tensor-parallel
    mesh) the layers run per shard inside `jax.shard_map` (`_layers_on_shards`).
    """
    opts = _options(opts)
    x = params.embed[tokens]
    cos, sin = rope_cos_sin(cfg, positions)
    mesh = jax.sharding.get_abstract_mesh()
    if opts.gemv != "xla" and not mesh.empty and mesh.shape.get(sharding.AXIS, 1) > 1:
        return _layers_on_shards(cfg, params.layers, cache, x, positions, cos, sin, kv_len, opts, mesh)
    for l in range(cfg.n_layers):  # unrolled: static weight slices (which Triton's GEMM fusions read in place)
        x, cache = attention_block(cfg, params, cache, l, x, positions, cos, sin, kv_len, opts, residual=x)
        x = mlp_block(cfg, params, l, x, opts, residual=x)
    return x, cache


_P = jax.sharding.PartitionSpec
# The layer weights' specs on the mesh (sharding.PARAM_SPECS; the norms replicated).
LAYER_SPECS = LayerWeights(**{f.name: sharding.PARAM_SPECS.get(f.name, _P())
                              for f in dataclasses.fields(LayerWeights)})


def _layers_on_shards(cfg: LlamaConfig, layers: LayerWeights, cache: KVCache, x: jax.Array, positions: jax.Array,
                      cos, sin, kv_len: int | None, opts: KernelOptions, mesh) -> tuple[jax.Array, KVCache]:
    """`trunk`'s layers on a tensor-parallel mesh, each device running one GPU's kernels on its shard (its kv heads
    and FFN slice: a config of H/N heads, K/N kv heads, F/N), the partial sums of the output and down projections
    all-reduced (psum) where XLA's partitioner puts its all-reduces, the residual added after them."""
    n = mesh.shape[sharding.AXIS]
    local = cfg.replace(n_heads=cfg.n_heads // n, n_kv_heads=cfg.n_kv_heads // n, ffn_dim=cfg.ffn_dim // n,
                        head_dim=cfg.hd)

    def body(lw, cache, x, positions, cos, sin):
        p = Weights(embed=None, layers=lw, final_norm=None, lm_head=None)  # the blocks read only the layers
        for l in range(cfg.n_layers):
            y, cache = attention_block(local, p, cache, l, x, positions, cos, sin, kv_len, opts)
            x = x + jax.lax.psum(y, sharding.AXIS)
            x = x + jax.lax.psum(mlp_block(local, p, l, x, opts), sharding.AXIS)
        return x, cache

    rep = _P()
    cache_specs = KVCache(k=sharding.CACHE_SPEC, v=sharding.CACHE_SPEC)
    # check_vma off: Pallas calls carry no rule for which mesh axes their outputs vary over
    f = jax.shard_map(body, mesh=mesh, in_specs=(LAYER_SPECS, cache_specs, rep, rep, rep, rep),
                      out_specs=(rep, cache_specs), check_vma=False)
    return f(layers, cache, x, positions, cos, sin)


def hidden(cfg: LlamaConfig, params: Weights, cache: KVCache, tokens: jax.Array, positions: jax.Array,
           kv_len: int | None = None, opts: KernelOptions | None = None) -> tuple[jax.Array, KVCache]:
    """Final-normed hidden states [T, D] and the updated cache (arguments as `trunk`)."""
    x, cache = trunk(cfg, params, cache, tokens, positions, kv_len, opts)
    return rms_norm(x, params.final_norm, cfg.norm_eps), cache


def logits_from_hidden(cfg: LlamaConfig, params: Weights, h: jax.Array, opts: KernelOptions | None = None,
                       normed: bool = True) -> jax.Array:
    """[..., D] -> [..., V] float32 logits (fp32 accumulation). With `normed=False`, h is the residual
    stream and the final RMSNorm is applied first (inside the kernel where the kernel runs: one row, where
    `opts.gemv` runs kernels)."""
    opts = _options(opts)
    head = _head_gemv(cfg, params, opts)
    kw = dict(norm=None if normed else params.final_norm, eps=cfg.norm_eps, interpret=opts.gemv == "interpret")
    if head is not None and h.size == cfg.dim:
        y = gemv_lib.gemv(h.reshape(cfg.dim), head[0], transposed=head[1], **kw)
        return y.reshape(h.shape[:-1] + (cfg.vocab_size,))
    if not normed:
        h = rms_norm(h, params.final_norm, cfg.norm_eps)
    if params.lm_head is None:
        return jnp.einsum("...d,vd->...v", h, params.embed, preferred_element_type=jnp.float32)
    return jnp.einsum("...d,dv->...v", h, params.lm_head, preferred_element_type=jnp.float32)


def forward(cfg: LlamaConfig, params: Weights, cache: KVCache, tokens: jax.Array, positions: jax.Array,
            kv_len: int | None = None, opts: KernelOptions | None = None) -> tuple[jax.Array, KVCache]:
    """Logits [T, V] (float32) and the updated cache (arguments as `trunk`)."""
    opts = _options(opts)
    x, cache = trunk(cfg, params, cache, tokens, positions, kv_len, opts)
    return logits_from_hidden(cfg, params, x, opts, normed=False), cache
