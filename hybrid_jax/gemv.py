"""Batch-1 matrix-vector products as Pallas (Triton) kernels, for the decode step.

At batch 1 the decode step is a chain of matrix-vector products that read every weight once: its time is
the weight bytes over the rate they are read. XLA's own fusions for these products read at ~2.7 TB/s on an
H200 whose copy bandwidth is ~4.2 TB/s (docs/ENGINEERING_LOG.md). These kernels are written for that one
job: each program reads a [bk, bn] tile of the weight per iteration (rows of bn contiguous elements, 16-byte
loads), multiplies by the matching slice of x in float32 and accumulates; the reduction dimension is
split over `splits` programs so that even a 4096 x 4096 matrix keeps every multiprocessor busy, and the
float32 partial sums [splits, N] are added by XLA in whatever consumes them.

The weights stay stacked ([L, Kd, N]) and are passed whole, with the layer as a static index into the
kernel: a custom call cannot take a slice of an operand without XLA copying it, and copying a layer's
weights would double the bytes. Pallas lowers the kernel to a Triton custom call that XLA compiles and
captures in the decode step's command buffer like its own kernels.

A projection that follows an RMSNorm takes the norm's weight (`norm=`) and normalises x itself, so the step
has no separate norm kernels; the QKV projection hands its partial sums unsummed (`reduce=False`) to the
attention kernel (decode_attention.py), which adds them.

Off the GPU (tests) the same kernels run in Pallas' interpreter (`interpret=True`).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:  # the Triton backend's parameters (present in jax >= 0.4.31)
    from jax.experimental.pallas import triton as plt
except Exception:  # pragma: no cover
    plt = None


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    bn: int  # output columns per program (power of 2)
    bk: int  # reduction rows per loop iteration (power of 2)
    splits: int  # programs along the reduction dimension
    warps: int = 4
    stages: int = 3


# The fastest tiling per shape (Kd, N, transposed), measured by scripts/gpu_gemv_tune.py on an H200
# (bench/results/2026-11-26_NVIDIA-H200_gemv-tune); other shapes get `default_config`'s heuristic.
TUNED: dict[tuple[int, int, bool], GemvConfig] = {
    (4096, 12288, False): GemvConfig(bn=256, bk=16, splits=16, warps=4, stages=3),  # 7B wqkv
    (4096, 4096, False): GemvConfig(bn=64, bk=64, splits=16, warps=4, stages=3),  # 7B wo
    (4096, 22016, False): GemvConfig(bn=128, bk=16, splits=8, warps=4, stages=4),  # 7B w13
    (11008, 4096, False): GemvConfig(bn=128, bk=16, splits=43, warps=4, stages=2),  # 7B w2
    (4096, 32000, False): GemvConfig(bn=256, bk=32, splits=4, warps=8, stages=4),  # 7B lm_head
}


# Where the projection kernels apply the RMSNorm's scalar scale (see _kernel): before the product, rounding
# x as the model does (measured on an H200, session 3), or, when True, after it, so that the weight loads
# do not wait for the mean square. True is tested on the CPU only: an experiment for the next GPU run
# (scripts/gpu_gemv_tune.py --modes pallas,pallas_epilogue), not the default until measured.
NORM_IN_EPILOGUE = False


def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of 2 <= cap dividing n (1 if n is odd)."""
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def default_config(kd: int, n: int, transposed: bool = False, target_programs: int = 256) -> GemvConfig | None:
    """A reasonable shape for the kernel, or None where the shape does not suit it (use XLA)."""
    tuned = TUNED.get((kd, n, transposed))
    if tuned is not None:
        return tuned
    if transposed:  # W [N, Kd]: a tile is bn rows of bk contiguous elements
        bk = _pow2_divisor(kd, 128)
        bn = _pow2_divisor(n, 32)
    else:  # W [Kd, N]: a tile is bk rows of bn contiguous elements
        bn = _pow2_divisor(n, 128)
        bk = _pow2_divisor(kd, 64)
    if bn < 16 or bk < 16:
        return None
    cols = n // bn
    # Split the reduction so that about `target_programs` programs run (any divisor of the chunk count,
    # each split at least 4 chunks long), narrowing bk where the chunks are too few.
    best = None
    while bk >= 16:
        chunks = kd // bk
        divs = [d for d in range(1, chunks + 1) if chunks % d == 0 and chunks // d >= 4] or [1]
        splits = next((d for d in divs if cols * d >= target_programs), divs[-1])
        if best is None or cols * splits > cols * best[1]:
            best = (bk, splits)
        if cols * splits >= target_programs or bk == 16 or kd % (bk // 2):
            break
        bk //= 2
    bk, splits = best
    return GemvConfig(bn=bn, bk=bk, splits=splits)


def supported(kd: int, n: int, transposed: bool = False) -> bool:
    return default_config(kd, n, transposed) is not None


def _kernel(*refs, layer, rows, cfg: GemvConfig, transposed: bool, norm: bool, norm_layer, eps: float):
    if norm:
        x_ref, nw_ref, w_ref, o_ref = refs
    else:
        x_ref, w_ref, o_ref = refs
    j = pl.program_id(0)
    s = pl.program_id(1)
    bn, bk = cfg.bn, cfg.bk
    n0 = pl.multiple_of(j * bn, bn)
    k_start = s * rows
    lead = () if layer is None else (layer,)
    f32 = jnp.float32
    if norm:
        nlead = () if norm_layer is None else (norm_layer,)

    def mean_square_scale():  # rsqrt(mean(x^2) + eps): every program reads all of x (a few KB, from L2)
        kd = x_ref.shape[0]
        nb = _pow2_divisor(kd, 4096)

        def sq(i, a):
            xs = x_ref[pl.ds(pl.multiple_of(i * nb, nb), nb)].astype(f32)
            return a + jnp.sum(xs * xs)

        return jax.lax.rsqrt(jax.lax.fori_loop(0, kd // nb, sq, jnp.zeros((), f32)) / kd + eps)

    # RMSNorm: as a prologue, x is scaled and rounded to its dtype before the product, as `model.rms_norm`
    # does; as an epilogue (NORM_IN_EPILOGUE), the loop runs on norm_weight * x and the scalar scale
    # multiplies the result, so the weight loads start at once (float32 throughout: XLA's own fusion may
    # skip that rounding too).
    epilogue = norm and NORM_IN_EPILOGUE
    r = mean_square_scale() if norm and not epilogue else None

    def body(i, acc):
        k = pl.multiple_of(k_start + i * bk, bk)
        xs = x_ref[pl.ds(k, bk)]
        if epilogue:
            xs = nw_ref[nlead + (pl.ds(k, bk),)].astype(f32) * xs.astype(f32)
        elif norm:
            xs = nw_ref[nlead + (pl.ds(k, bk),)] * (xs.astype(f32) * r).astype(xs.dtype)
        xs = xs.astype(f32)
        if transposed:
            w = w_ref[lead + (pl.ds(n0, bn), pl.ds(k, bk))].astype(f32)  # [bn, bk]
            return acc + w * xs[None, :]
        w = w_ref[lead + (pl.ds(k, bk), pl.ds(n0, bn))].astype(f32)  # [bk, bn]
        return acc + w * xs[:, None]

    shape = (bn, bk) if transposed else (bk, bn)
    acc = jax.lax.fori_loop(0, rows // bk, body, jnp.zeros(shape, f32))
    out = jnp.sum(acc, axis=1 if transposed else 0)
    o_ref[s, pl.ds(n0, bn)] = out * mean_square_scale() if epilogue else out


def gemv(x: jax.Array, w: jax.Array, layer: int | None = None, *, transposed: bool = False,
         cfg: GemvConfig | None = None, norm: jax.Array | None = None, eps: float = 1e-6, reduce: bool = True,
         interpret: bool = False) -> jax.Array:
    """float32 [N] = x @ W, or `rms_norm(x) @ W` with `norm` given.

    x: [Kd]. W: [Kd, N] (or [N, Kd] if `transposed`), or stacked [L, ...] with `layer` the static index of the
    matrix to use. norm: the RMSNorm weight [Kd], or stacked [L, Kd] (its row `layer` is used), applied to x
    inside the kernel as `model.rms_norm(x, norm, eps)` computes it. With `reduce=False` the float32 partial
    sums [splits, N] are returned unsummed (for a consumer that adds them itself). The result equals XLA's
    up to the order of the float32 additions.
    """
    if w.ndim == 3:
        if layer is None:
            raise ValueError("a stacked weight needs a layer index")
        mat_shape = w.shape[1:]
    elif w.ndim == 2:
        if layer is not None:
            raise ValueError("layer given for an unstacked weight")
        mat_shape = w.shape
    else:
        raise ValueError(f"weight must be 2-D or stacked 3-D, got shape {w.shape}")
    n, kd = mat_shape if transposed else mat_shape[::-1]
    if x.shape != (kd,):
        raise ValueError(f"x has shape {x.shape}, the weight {w.shape} needs ({kd},)")
    norm_layer = None
    if norm is not None:
        if norm.shape == (kd,):
            pass
        elif norm.ndim == 2 and norm.shape[1] == kd and layer is not None and layer < norm.shape[0]:
            norm_layer = layer
        else:
            raise ValueError(f"norm weight has shape {norm.shape}; it must be ({kd},) or stacked [L, {kd}] "
                             f"with the weight's layer index")
    cfg = cfg or default_config(kd, n, transposed)
    if cfg is None:
        raise ValueError(f"no kernel shape for a {kd} x {n} matrix (call `supported` first)")
    if n % cfg.bn or kd % (cfg.splits * cfg.bk):
        raise ValueError(f"{cfg} does not tile a {kd} x {n} matrix")
    rows = kd // cfg.splits
    kernel = functools.partial(_kernel, layer=layer, rows=rows, cfg=cfg, transposed=transposed,
                               norm=norm is not None, norm_layer=norm_layer, eps=float(eps))
    params = {}
    if plt is not None and not interpret:
        params["compiler_params"] = plt.CompilerParams(num_warps=cfg.warps, num_stages=cfg.stages)
    args = (x, w) if norm is None else (x, norm, w)
    partial = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((cfg.splits, n), jnp.float32),
        grid=(n // cfg.bn, cfg.splits),
        interpret=interpret,
        name=f"gemv_{kd}x{n}{'_t' if transposed else ''}{'_norm' if norm is not None else ''}",
        **params,
    )(*args)
    if not reduce:
        return partial
    return partial[0] if cfg.splits == 1 else jnp.sum(partial, axis=0)
