"""The decode step's matrix-vector products over quantized codes (quant.py) as Pallas (Triton) kernels.

The same job as gemv.py's output-major kernel, reading int8 or packed 4-bit codes and their float16 scales (and
offsets) in place of 16-bit weights: each program owns bn whole rows and walks their codes in runs of GGUF's
32-input blocks, so the weight bytes read are the stored ones and no dequantized copy is ever written. The
RMSNorm prologue and the consumers (residual add, silu(gate) x up) are gemv.py's, in the epilogue.

Layout. The operands are passed in views that make every load a plain 3-D block (reshapes of contiguous
arrays: bitcasts, no copies): the codes [L, N, Kd / 32, 32 / P] with P = 2 nibble planes for 4 bits (byte j of
a block holds input j in its low nibble, input j + 16 in its high one) and 1 for 8 bits; x and the norm weight
[Kd / 32, P, 32 / P], so plane p of a block is x[32 b + 16 p : ...]. A block's sum over its codes is a
reduction over the last axis, scaled once a group (symmetric 4-bit codes' -8 is folded into the conversion;
an offset m adds m * sum(x) over its group).

Where the sums go: the kernels' time is not the bytes alone. On an H100 the 4-bit kernels read 1.1-1.8 TB/s
against 3.0 TB/s copy bandwidth, XLA's row reductions over the same codes about as fast, so the unpacking and
float arithmetic a weight needs bound them (docs/performance.md).

Off the GPU (tests) the kernels run in Pallas' interpreter.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import gemv as gemv_lib
from .gemv import GemvConfig
from .quant import GGUF_BLOCK, Scheme

try:
    from jax.experimental.pallas import triton as plt
except Exception:  # pragma: no cover
    plt = None

# The fastest tiling per (Kd, N, scheme name), measured by bench/probes/qgemv_tune.py on an H100 (7B shape; the
# product as the step runs it: us, stored bytes / time); others get `default_config`'s heuristic.
_C = GemvConfig
TUNED: dict[tuple[int, int, str], GemvConfig] = {
    (4096, 12288, "int8"): _C(bn=4, bk=4096, splits=1, warps=4, stages=3),  # wqkv 23.7 us, 2.12 TB/s
    (4096, 4096, "int8"): _C(bn=2, bk=4096, splits=1, warps=8, stages=3),  # wo 9.1 us, 1.84
    (4096, 22016, "int8"): _C(bn=2, bk=4096, splits=1, warps=4, stages=3),  # w13 39.2 us, 2.30
    (11008, 4096, "int8"): _C(bn=4, bk=2048, splits=1, warps=4, stages=3),  # w2 21.6 us, 2.09
    (4096, 12288, "int4-g32-sym"): _C(bn=32, bk=1024, splits=1, warps=4, stages=3),  # 20.4 us, 1.39
    (4096, 4096, "int4-g32-sym"): _C(bn=4, bk=4096, splits=1, warps=8, stages=3),  # 8.5 us, 1.11
    (4096, 22016, "int4-g32-sym"): _C(bn=8, bk=4096, splits=1, warps=8, stages=3),  # 32.4 us, 1.57
    (11008, 4096, "int4-g32-sym"): _C(bn=8, bk=2048, splits=1, warps=4, stages=3),  # 19.1 us, 1.32
    (4096, 12288, "int4-g32-asym"): _C(bn=16, bk=2048, splits=1, warps=4, stages=3),  # 20.0 us, 1.57
    (4096, 4096, "int4-g32-asym"): _C(bn=8, bk=2048, splits=1, warps=4, stages=3),  # 8.4 us, 1.25
    (4096, 22016, "int4-g32-asym"): _C(bn=4, bk=4096, splits=1, warps=4, stages=3),  # 31.8 us, 1.77
    (11008, 4096, "int4-g32-asym"): _C(bn=8, bk=2048, splits=1, warps=4, stages=3),  # 19.6 us, 1.44
}


def _tiles(cfg: GemvConfig, scheme: Scheme) -> bool:
    """Whether cfg's tiles suit the kernel: bk a power of 2 of whole blocks, each tile whole groups."""
    nb = cfg.bk // GGUF_BLOCK
    return cfg.splits == 1 and cfg.bk % GGUF_BLOCK == 0 and nb & (nb - 1) == 0 and \
        (scheme.group is None or cfg.bk % scheme.group == 0)


def default_config(kd: int, n: int, scheme: Scheme) -> GemvConfig | None:
    """A tiling (bn rows a program, bk inputs an iteration, no split) for an output-major [N, Kd] matrix of
    `scheme`'s codes, or None where the kernel does not take it. bk need not divide Kd (the rest is walked in
    smaller tiles); a group of 32 x 2^i inputs, or one scale a row (8 bits), is required."""
    g = scheme.group or kd
    gb = g // GGUF_BLOCK
    if kd % GGUF_BLOCK or g % GGUF_BLOCK or kd % g or (scheme.group and gb & (gb - 1)) or \
            (scheme.asym and scheme.group is None):
        return None
    tuned = TUNED.get((kd, n, scheme.name))
    if tuned is not None:
        return tuned
    # tiles of ~4 KB of codes and at least ~512 programs, as the 16-bit kernel's best tilings
    bn = 8
    while bn > 1 and (n % bn or n // bn < 512):
        bn //= 2
    bk = GGUF_BLOCK
    while bk * 2 <= min(kd, 4096 * 8 // (bn * scheme.bits)):
        bk *= 2
    cfg = GemvConfig(bn=bn, bk=bk, splits=1, warps=4, stages=3)
    return cfg if n % bn == 0 and _tiles(cfg, scheme) else None


def supported(kd: int, n: int, scheme: Scheme) -> bool:
    return default_config(kd, n, scheme) is not None


def _codes_f32(c: jax.Array, bits: int, sym4: bool) -> tuple[jax.Array, ...]:
    """A tile of stored codes -> its planes of values as float32 (4 bits: (low, high) nibbles, less 8 when
    symmetric; 8 bits: the signed value). (Converting through float32 2^23's bit pattern instead of the casts
    measured no faster: bench/results/2026-12-06_NVIDIA-H100_qgemv.)"""
    f32 = jnp.float32
    if bits == 8:
        return (c.astype(f32),)
    i = c.astype(jnp.int32)
    off = 8.0 if sym4 else 0.0
    return tuple(u.astype(f32) - off for u in (i & 0x0F, i >> 4))


def _over_blocks(loop, acc, blocks: int, nb: int):
    """`loop(acc, first, nb, count)` over `blocks` blocks in tiles of nb; a count that nb does not divide (11008
    inputs = 344 blocks in tiles of 64: 5 of them, then 3 of 8) has the rest walked in smaller power-of-2 tiles."""
    acc = loop(acc, 0, nb, blocks // nb)
    tail = blocks % nb
    if tail:
        nbt = gemv_lib._pow2_divisor(tail, nb)
        acc = loop(acc, blocks - tail, nbt, tail // nbt)
    return acc


def _check_codes(q, kd: int, scheme: Scheme) -> None:
    if q.ndim != 3 or q.shape[2] * (8 // scheme.bits) != kd:
        raise ValueError(f"codes of shape {q.shape} do not hold a {scheme.name} matrix of {kd} inputs")


def _kernel(*refs, layer, norm_layer, cfg: GemvConfig, scheme: Scheme, kd: int, norm: bool, eps: float,
            residual: bool, gate_rows: int | None, dtype):
    it = iter(refs)
    x_ref = next(it)
    nw_ref = next(it) if norm else None
    q_ref, s_ref = next(it), next(it)
    z_ref = next(it) if scheme.asym else None
    r_ref = next(it) if residual else None
    o_ref = next(it)
    f32 = jnp.float32
    bn = cfg.bn
    planes = 2 if scheme.bits == 4 else 1
    grouped = scheme.group is not None
    gb = scheme.group // GGUF_BLOCK if grouped else 1  # blocks a scale
    n0 = pl.multiple_of(pl.program_id(0) * bn, bn)
    lead = (layer,)
    nlead = () if norm_layer is None else (norm_layer,)
    r = None
    if norm:  # as model.rms_norm: rsqrt(mean(x^2) + eps) over all of x (a few KB, from L2), read in power-of-2
        # slices of blocks (Triton's arrays are powers of 2; SmolLM2's 576 inputs are 18 blocks)
        nbx = gemv_lib._pow2_divisor(kd // GGUF_BLOCK, 128)

        def sq(i, a):
            xa = x_ref[pl.ds(pl.multiple_of(i * nbx, nbx), nbx), :, :].astype(f32)
            return a + jnp.sum(xa * xa)
        r = jax.lax.rsqrt(jax.lax.fori_loop(0, kd // GGUF_BLOCK // nbx, sq, jnp.zeros((), f32)) / kd + eps)

    def xplane(b0, nb, p):  # [nb, 32 / P] of x (normalised), float32
        xs = x_ref[pl.ds(b0, nb), p, :]
        if norm:
            xs = nw_ref[nlead + (pl.ds(b0, nb), p, slice(None))] * (xs.astype(f32) * r).astype(xs.dtype)
        return xs.astype(f32)

    def block_sums(row0, b0, nb, xs):  # each block's (or group's) sum of codes x inputs, scaled (and offset)
        c = q_ref[lead + (pl.ds(row0, bn), pl.ds(b0, nb), slice(None))]  # [bn, nb, 32 / P]
        vals = _codes_f32(c, scheme.bits, scheme.bits == 4 and not scheme.asym)
        blk = sum(jnp.sum(v * x[None], axis=2) for v, x in zip(vals, xs))  # [bn, nb]
        if not grouped:
            return jnp.sum(blk, axis=1)
        ng = nb // gb
        if gb > 1:
            blk = jnp.sum(blk.reshape(bn, ng, gb), axis=2)
        g0 = b0 // gb
        y = blk * s_ref[lead + (pl.ds(row0, bn), pl.ds(g0, ng))].astype(f32)
        if scheme.asym:
            xsum = sum(jnp.sum(x, axis=1) for x in xs)  # [nb]
            if gb > 1:
                xsum = jnp.sum(xsum.reshape(ng, gb), axis=1)
            y = y + z_ref[lead + (pl.ds(row0, bn), pl.ds(g0, ng))].astype(f32) * xsum[None]
        return jnp.sum(y, axis=1)

    gated = gate_rows is not None

    def loop(acc, first, nb, count):  # `count` iterations of nb blocks from block `first`
        def body(i, acc):
            b0 = pl.multiple_of(first + i * nb, nb)
            xs = [xplane(b0, nb, p) for p in range(planes)]
            if gated:
                return acc[0] + block_sums(n0, b0, nb, xs), acc[1] + block_sums(gate_rows + n0, b0, nb, xs)
            return acc + block_sums(n0, b0, nb, xs)
        return jax.lax.fori_loop(0, count, body, acc)

    zero = jnp.zeros((bn,), f32)
    acc = _over_blocks(loop, (zero, zero) if gated else zero, kd // GGUF_BLOCK, cfg.bk // GGUF_BLOCK)

    def rows(y, row0):  # [bn]: the row sums, times the row's scale for one a row
        return y if grouped else y * s_ref[lead + (pl.ds(row0, bn), 0)].astype(f32)

    if gated:
        o_ref[pl.ds(n0, bn)] = gemv_lib.finish(rows(acc[0], n0), dtype, up=rows(acc[1], gate_rows + n0))
    elif residual:
        o_ref[pl.ds(n0, bn)] = gemv_lib.finish(rows(acc, n0), dtype, residual=r_ref[pl.ds(n0, bn)])
    else:
        o_ref[0, pl.ds(n0, bn)] = rows(acc, n0)


def gemv(x: jax.Array, qm: dict, layer: int, scheme: Scheme, *, cfg: GemvConfig | None = None,
         norm: jax.Array | None = None, eps: float = 1e-6, reduce: bool = True, residual: jax.Array | None = None,
         gated: bool = False, interpret: bool = False) -> jax.Array:
    """`gemv.gemv(x, W, layer, transposed=True, ...)` for W layer `layer` of a stacked quantized matrix
    (quant.py's arrays {q, scale[, zero]}, [L, N, ...]): float32 [N], or with `reduce=False` the sums as one
    split [1, N], or the consumer's output in x's dtype (`residual=` [N], or `gated`: silu(gate) x up [N / 2])."""
    q = qm["q"]
    n = q.shape[1]
    kd = x.shape[0]
    _check_codes(q, kd, scheme)
    if (residual is not None or gated) and not reduce:
        raise ValueError("residual= and gated= need the reduced product (reduce=True)")
    if residual is not None and gated:
        raise ValueError("a product takes one consumer: residual= or gated=, not both")
    norm_layer = gemv_lib._norm_layer(norm, kd, layer)
    cfg = cfg or default_config(kd, n, scheme)
    if cfg is None:
        raise ValueError(f"no kernel shape for a {kd} x {n} {scheme.name} matrix (call `supported` first)")
    if n % cfg.bn or not _tiles(cfg, scheme) or cfg.bk > kd:
        raise ValueError(f"{cfg} does not tile a {kd} x {n} {scheme.name} matrix")
    if gated and (n % 2 or (n // 2) % cfg.bn):
        raise ValueError(f"gated=True needs [gate; up] halves tiled by bn={cfg.bn}, got N={n}")
    planes = 2 if scheme.bits == 4 else 1
    blocks = (kd // GGUF_BLOCK, planes, GGUF_BLOCK // planes)
    args = [x.reshape(blocks)]
    if norm is not None:
        args.append(norm.reshape(norm.shape[:-1] + blocks))
    args += [q.reshape(q.shape[:2] + (kd // GGUF_BLOCK, GGUF_BLOCK // planes)), qm["scale"]]
    if scheme.asym:
        args.append(qm["zero"])
    dtype = x.dtype
    out_n = n // 2 if gated else n
    if residual is not None:
        args.append(residual)
    kernel = functools.partial(_kernel, layer=layer, norm_layer=norm_layer, cfg=cfg, scheme=scheme, kd=kd,
                               norm=norm is not None, eps=float(eps), residual=residual is not None,
                               gate_rows=out_n if gated else None, dtype=dtype)
    finished = gated or residual is not None
    out = jax.ShapeDtypeStruct((out_n,) if finished else (1, n), dtype if finished else jnp.float32)
    params = {}
    if plt is not None and not interpret:
        params["compiler_params"] = plt.CompilerParams(num_warps=cfg.warps, num_stages=cfg.stages)
    name = f"qgemv_{scheme.name.replace('-', '_')}_{kd}x{n}{'_norm' if norm is not None else ''}" + \
        ("_silu" if gated else "_residual" if residual is not None else "")
    y = pl.pallas_call(kernel, out_shape=out, grid=(out_n // cfg.bn, 1), interpret=interpret, name=name,
                       **params)(*args)
    if finished or not reduce:
        return y
    return y[0]


# ---- a chunk of rows (the prefill) -----------------------------------------------------------------------------
#
# X [T, Kd] x W^T for a quantized W [N, Kd]: each program owns bn output columns and bt rows of x, walks Kd in
# tiles of whole blocks, dequantizes its [bn, tile] of codes to x's dtype as quant.dequantize does (float32
# scale x code (+ offset), rounded) and multiplies it into the rows on the tensor cores (float32 sums). The
# dequantized matrix is never written: the bytes read are the codes (once per bt rows of x; the row tiles of a
# column tile run one after the other, so the later ones read them from L2).

ROWS_TILE = 64  # bt: rows of x a program (a prompt's rows padded to a power of 2 >= 16 up to it)


def rows_tile(t: int) -> int:
    return min(gemv_lib.rows_padded(t), ROWS_TILE)


# Tilings of `gemm` measured faster than `rows_config`'s default, per (Kd, N, scheme name, rows padded to its row
# tile): (config, rows of x a program). Filled from bench/probes/qgemm_tune.py's runs; empty until one is kept.
TUNED_ROWS: dict[tuple[int, int, str, int], tuple[GemvConfig, int]] = {}


def rows_config(kd: int, n: int, scheme: Scheme) -> GemvConfig | None:
    """A tiling of `gemm` (bn columns a program, bk inputs an iteration), or None where the kernel does not take
    the matrix (as `default_config`; bn >= 16, the tensor-core dot's minimum)."""
    if default_config(kd, n, scheme) is None:
        return None
    bn = gemv_lib._pow2_divisor(n, 64)
    bk = GGUF_BLOCK
    while bk * 2 <= min(kd, 256):
        bk *= 2
    cfg = GemvConfig(bn=bn, bk=bk, splits=1, warps=4, stages=3)
    return cfg if bn >= 16 and _tiles(cfg, scheme) else None


# Prefill chunks of up to `gemm_rows_max(scheme)` rows take `gemm`; longer ones a matmul over XLA's dequantized
# matrix: where the kernel's TTFT stopped winning on an H100 (docs/performance.md, "Defaults and why").
GEMM_ROWS_MAX = 64  # the most rows any scheme takes through `gemm` (runtime.Runtime.step_options)


def gemm_rows_max(scheme: Scheme) -> int:
    return 32 if scheme.bits == 8 else GEMM_ROWS_MAX


def gemm_supported(kd: int, n: int, scheme: Scheme) -> bool:
    return rows_config(kd, n, scheme) is not None


def _rows_kernel(*refs, layer, cfg: GemvConfig, scheme: Scheme, kd: int, bt: int, dtype):
    it = iter(refs)
    x_ref, q_ref, s_ref = next(it), next(it), next(it)
    z_ref = next(it) if scheme.asym else None
    o_ref = next(it)
    f32 = jnp.float32
    bn = cfg.bn
    planes = 2 if scheme.bits == 4 else 1
    width = GGUF_BLOCK // planes
    grouped = scheme.group is not None
    gb = scheme.group // GGUF_BLOCK if grouped else 1
    n0 = pl.multiple_of(pl.program_id(0) * bn, bn)
    r0 = pl.multiple_of(pl.program_id(1) * bt, bt)
    lead = (layer,)

    def per_block(ref, g0, ng, nb):  # a group's scale (or offset) per block of the tile: [bn, nb, 1], float32
        a = ref[lead + (pl.ds(n0, bn), pl.ds(g0, ng))].astype(f32)
        if gb > 1:
            a = jnp.broadcast_to(a[:, :, None], (bn, ng, gb)).reshape(bn, nb)
        return a[:, :, None]

    def loop(acc, first, nb, count):  # `count` tiles of nb blocks from block `first`
        def body(i, acc):
            b0 = pl.multiple_of(first + i * nb, nb)
            c = q_ref[lead + (pl.ds(n0, bn), pl.ds(b0, nb), slice(None))]  # [bn, nb, 32 / P]
            vals = _codes_f32(c, scheme.bits, scheme.bits == 4 and not scheme.asym)
            if grouped:
                s = per_block(s_ref, b0 // gb, nb // gb, nb)
                z = per_block(z_ref, b0 // gb, nb // gb, nb) if scheme.asym else None
            for p, v in enumerate(vals):
                w = v if not grouped else s * v if z is None else s * v + z
                w = w.astype(dtype).reshape(bn, nb * width)
                xs = x_ref[pl.ds(r0, bt), pl.ds(b0, nb), p, :].reshape(bt, nb * width)
                acc = acc + jax.lax.dot_general(xs, w, (((1,), (1,)), ((), ())), preferred_element_type=f32)
            return acc
        return jax.lax.fori_loop(0, count, body, acc)

    acc = _over_blocks(loop, jnp.zeros((bt, bn), f32), kd // GGUF_BLOCK, cfg.bk // GGUF_BLOCK)
    if not grouped:  # one scale a row: applied to the product, as the XLA path does
        acc = acc * s_ref[lead + (pl.ds(n0, bn), 0)].astype(f32)[None, :]
    o_ref[pl.ds(r0, bt), pl.ds(n0, bn)] = acc


def gemm(x: jax.Array, qm: dict, layer: int, scheme: Scheme, *, cfg: GemvConfig | None = None,
         bt: int | None = None, interpret: bool = False) -> jax.Array:
    """float32 [T, N] = x @ W^T for rows x [T, Kd] and W layer `layer` of a stacked quantized matrix (quant.py's
    arrays {q, scale[, zero]}, [L, N, ...]): the product XLA computes over `quant.dequantize`'s matrix (int8 with
    one scale a row: over the codes, the scale applied to the product), summed in float32 in another order."""
    q = qm["q"]
    n = q.shape[1]
    t, kd = x.shape
    _check_codes(q, kd, scheme)
    if cfg is None and bt is None:
        cfg, bt = TUNED_ROWS.get((kd, n, scheme.name, gemv_lib.rows_padded(t)), (None, None))
    cfg = cfg or rows_config(kd, n, scheme)
    if cfg is None:
        raise ValueError(f"no kernel shape for a {kd} x {n} {scheme.name} matrix (call `gemm_supported` first)")
    if n % cfg.bn or cfg.bn < 16 or not _tiles(cfg, scheme) or cfg.bk > kd:
        raise ValueError(f"{cfg} does not tile a {kd} x {n} {scheme.name} matrix")
    bt = bt or rows_tile(t)
    if bt < 16 or bt & (bt - 1):
        raise ValueError(f"bt (rows of x a program) must be a power of 2 >= 16, got {bt}")
    tp = -(-t // bt) * bt
    if tp != t:
        x = jnp.pad(x, ((0, tp - t), (0, 0)))
    planes = 2 if scheme.bits == 4 else 1
    args = [x.reshape(tp, kd // GGUF_BLOCK, planes, GGUF_BLOCK // planes),
            q.reshape(q.shape[:2] + (kd // GGUF_BLOCK, GGUF_BLOCK // planes)), qm["scale"]]
    if scheme.asym:
        args.append(qm["zero"])
    kernel = functools.partial(_rows_kernel, layer=layer, cfg=cfg, scheme=scheme, kd=kd, bt=bt, dtype=x.dtype)
    params = {}
    if plt is not None and not interpret:
        params["compiler_params"] = plt.CompilerParams(num_warps=cfg.warps, num_stages=cfg.stages)
    y = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((tp, n), jnp.float32), grid=(n // cfg.bn, tp // bt),
                       interpret=interpret, name=f"qgemm{bt}_{scheme.name.replace('-', '_')}_{kd}x{n}", **params)(*args)
    return y[:t] if tp != t else y
