"""Batch-1 matrix-vector products as Pallas (Triton) kernels, for the decode step.

At batch 1 the decode step is a chain of matrix-vector products that read every weight once: its time is
the weight bytes over the rate they are read. XLA's own fusions for these products read at ~2.7 TB/s on an
H200 whose copy bandwidth is ~4.2 TB/s (docs/ENGINEERING_LOG.md). These kernels are written for that one
job. The model's layer matrices are stored output-major ([N, Kd], `transposed`; weights.py): each program
owns bn whole rows (outputs) and walks their Kd contiguous elements in [bn, bk] tiles, multiplying by the
matching slice of x in float32, so no program shares an output with another and the product's consumer
runs in the kernel's epilogue: the residual add after the output and down projections (`residual=`), and
silu(gate) x up after the gate/up projection (`gated=True`). On an H200 these unsplit kernels read the
7B's matrices at 3.2-3.8 TB/s, faster than the input-major layout's split-K kernels (run 40). For an
input-major matrix ([Kd, N]: the untied LM head) a program reads [bk, bn] tiles (rows of bn contiguous
elements) and the reduction is split over `splits` programs so that every multiprocessor is busy; the
float32 partial sums [splits, N] are added by XLA in whatever consumes them (and so is any epilogue where a
split is needed).

The weights stay stacked ([L, Kd, N]) and are passed whole, with the layer as a static index into the
kernel: a custom call cannot take a slice of an operand without XLA copying it, and copying a layer's
weights would double the bytes. Pallas lowers the kernel to a Triton custom call that XLA compiles and
captures in the decode step's command buffer like its own kernels.

A projection that follows an RMSNorm takes the norm's weight (`norm=`) and normalises x itself, so the step
has no separate norm kernels; the QKV projection hands its partial sums unsummed (`reduce=False`) to the
attention kernel (decode_attention.py), which adds them.

`gemm` is the same kernel for a few rows of x at once (the prefill's output projection of short prompts,
T <= ROWS_MAX): each program reads its weight tile once and multiplies all T rows by it with a tensor-core
dot, reading the stacked weight in place.

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


# The fastest tiling per shape (Kd, N, transposed), measured by bench/probes/gemv_tune.py on an H200 (a tiling
# is kept only when the whole decode step's A/B says so; see docs/performance.md, 'Defaults and why'); other
# shapes get `default_config`'s heuristic.
TUNED: dict[tuple[int, int, bool], GemvConfig] = {
    (4096, 12288, True): GemvConfig(bn=16, bk=256, splits=1, warps=4, stages=2),  # 7B wqkv: 26.6 us, 3.78 TB/s
    (4096, 4096, True): GemvConfig(bn=4, bk=1024, splits=1, warps=4, stages=4),  # 7B wo: 10.6 us, 3.18 TB/s
    (4096, 22016, True): GemvConfig(bn=8, bk=512, splits=1, warps=4, stages=3),  # 7B w13: 47.0 us, 3.84 TB/s
    (11008, 4096, True): GemvConfig(bn=4, bk=256, splits=1, warps=8, stages=3),  # 7B w2: 26.4 us, 3.41 TB/s
    (4096, 32000, False): GemvConfig(bn=256, bk=32, splits=4, warps=8, stages=4),  # 7B lm_head
}


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
        # Whole rows per program (no split, so the epilogue runs in the kernel) wherever bn >= 1 leaves enough
        # programs: bn as large as keeps ~768 of them (run 40's best tilings: 768-2752 programs, tiles of
        # 4096 elements), bk filling the tile.
        bn = 16
        while bn > 1 and (n % bn or n // bn < 768):
            bn //= 2
        bk = _pow2_divisor(kd, max(16, 4096 // bn))
        if n // bn >= 128 and bk >= 16:
            return GemvConfig(bn=bn, bk=bk, splits=1, warps=4, stages=3)
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


def _tile(refs, norm: bool, cfg: GemvConfig, rows: int):
    """A program's refs (x, the norm weight or None, w, out) and its tile of the (N / bn, splits) grid: the
    split s, its first output column n0 and its first reduction row k_start."""
    x_ref, nw_ref, w_ref, o_ref = refs if norm else (refs[0], None, *refs[1:])
    j = pl.program_id(0)
    s = pl.program_id(1)
    return x_ref, nw_ref, w_ref, o_ref, s, pl.multiple_of(j * cfg.bn, cfg.bn), s * rows


def _mean_square_scale(x_ref, nb: int, eps: float) -> jax.Array:
    """rsqrt(mean(x^2) + eps) over x's last axis (one per row), x read in slices of nb: every program reads
    all of x (a few KB, from L2)."""
    f32 = jnp.float32
    kd = x_ref.shape[-1]
    rows = (slice(None),) * (x_ref.ndim - 1)

    def sq(i, a):
        xs = x_ref[rows + (pl.ds(pl.multiple_of(i * nb, nb), nb),)].astype(f32)
        return a + jnp.sum(xs * xs, axis=-1)

    return jax.lax.rsqrt(jax.lax.fori_loop(0, kd // nb, sq, jnp.zeros(x_ref.shape[:-1], f32)) / kd + eps)


def finish(y: jax.Array, dtype, residual: jax.Array | None = None, up: jax.Array | None = None) -> jax.Array:
    """A product's consumer as model.py computes it, on the float32 sums y: rounded to `dtype`, then
    silu(y) * up (`up`: the up projection's float32 sums, for y the gate's) or residual + y, in `dtype`'s
    arithmetic (each operation's result rounded to it). Shared by the kernels' epilogue and XLA's."""
    f32 = jnp.float32

    def rnd(a):
        return a.astype(dtype).astype(f32)

    if up is not None:
        return (rnd(jax.nn.silu(rnd(y))) * rnd(up)).astype(dtype)
    return (residual.astype(f32) + rnd(y)).astype(dtype)


def _kernel(*refs, layer, rows, cfg: GemvConfig, transposed: bool, norm: bool, norm_layer, eps: float,
            residual: bool = False, gate_rows: int | None = None, dtype=None):
    """Program (column block j, split s). With an epilogue (splits == 1, transposed): `residual` adds the
    residual ref's slice, `gate_rows` (the up rows' offset) computes silu(gate) x up; the output is then
    [N] (or [gate_rows]) in `dtype`, else the float32 partial sums [splits, N]."""
    if residual:
        *refs, r_ref, o_ref = refs
        refs = (*refs, o_ref)
    x_ref, nw_ref, w_ref, o_ref, s, n0, k_start = _tile(refs, norm, cfg, rows)
    bn, bk = cfg.bn, cfg.bk
    lead = () if layer is None else (layer,)
    nlead = () if norm_layer is None else (norm_layer,)
    f32 = jnp.float32
    # RMSNorm as a prologue: x is scaled and rounded to its dtype before the product, as `model.rms_norm`
    # does (scaling the product instead measured slower: see docs/performance.md).
    scale = _mean_square_scale(x_ref, _pow2_divisor(x_ref.shape[-1], 4096), eps) if norm else None
    gated = gate_rows is not None

    def body(i, acc):
        k = pl.multiple_of(k_start + i * bk, bk)
        # the loads in the order the tilings were tuned with: x, the norm weight, then the weight tile
        xs = x_ref[pl.ds(k, bk)]
        if norm:
            xs = nw_ref[nlead + (pl.ds(k, bk),)] * (xs.astype(f32) * scale).astype(xs.dtype)
        xs = xs.astype(f32)
        if transposed:
            w = w_ref[lead + (pl.ds(n0, bn), pl.ds(k, bk))].astype(f32)  # [bn, bk]
            if gated:  # the up rows that pair with these gate rows
                u = w_ref[lead + (pl.ds(gate_rows + n0, bn), pl.ds(k, bk))].astype(f32)
                return acc[0] + w * xs[None, :], acc[1] + u * xs[None, :]
            return acc + w * xs[None, :]
        w = w_ref[lead + (pl.ds(k, bk), pl.ds(n0, bn))].astype(f32)  # [bk, bn]
        return acc + w * xs[:, None]

    zero = jnp.zeros((bn, bk) if transposed else (bk, bn), f32)
    acc = jax.lax.fori_loop(0, rows // bk, body, (zero, zero) if gated else zero)
    if gated:
        o_ref[pl.ds(n0, bn)] = finish(jnp.sum(acc[0], axis=1), dtype, up=jnp.sum(acc[1], axis=1))
        return
    out = jnp.sum(acc, axis=1 if transposed else 0)
    if residual:
        o_ref[pl.ds(n0, bn)] = finish(out, dtype, residual=r_ref[pl.ds(n0, bn)])
        return
    o_ref[s, pl.ds(n0, bn)] = out


def _matrix_shape(w: jax.Array, layer: int | None) -> tuple[int, int]:
    """The shape of the matrix `gemv` / `gemm` multiply by: w itself, or w[layer] of a stacked weight."""
    if w.ndim == 3:
        if layer is None:
            raise ValueError("a stacked weight needs a layer index")
        return w.shape[1:]
    if w.ndim == 2:
        if layer is not None:
            raise ValueError("layer given for an unstacked weight")
        return w.shape
    raise ValueError(f"weight must be 2-D or stacked 3-D, got shape {w.shape}")


def _norm_layer(norm: jax.Array | None, kd: int, layer: int | None) -> int | None:
    """The row of a stacked norm weight [L, Kd] to use (None for a single [Kd] weight, or no norm)."""
    if norm is None or norm.shape == (kd,):
        return None
    if norm.ndim == 2 and norm.shape[1] == kd and layer is not None and layer < norm.shape[0]:
        return layer
    raise ValueError(f"norm weight has shape {norm.shape}; it must be ({kd},) or stacked [L, {kd}] "
                     f"with the weight's layer index")


def gemv(x: jax.Array, w: jax.Array, layer: int | None = None, *, transposed: bool = False,
         cfg: GemvConfig | None = None, norm: jax.Array | None = None, eps: float = 1e-6, reduce: bool = True,
         residual: jax.Array | None = None, gated: bool = False, interpret: bool = False) -> jax.Array:
    """float32 [N] = x @ W, or `rms_norm(x) @ W` with `norm` given, or that product's consumer.

    x: [Kd]. W: [Kd, N] (or [N, Kd] if `transposed`), or stacked [L, ...] with `layer` the static index of the
    matrix to use. norm: the RMSNorm weight [Kd], or stacked [L, Kd] (its row `layer` is used), applied to x
    inside the kernel as `model.rms_norm(x, norm, eps)` computes it. With `reduce=False` the float32 partial
    sums [splits, N] are returned unsummed (for a consumer that adds them itself). The result equals XLA's
    up to the order of the float32 additions.

    Consumers (`finish`), in x's dtype: `residual` [N] returns residual + the product; `gated` takes W's N
    rows as [gate; up] halves and returns silu(gate) * up [N / 2]. They run in the kernel's epilogue where
    its tiling does not split the reduction (transposed W), else in XLA after the partial sums are added.
    """
    p = _plan(w, layer, transposed, cfg, norm, reduce, residual, gated)
    if x.shape != (p.kd,):
        raise ValueError(f"x has shape {x.shape}, the weight {w.shape} needs ({p.kd},)")
    if residual is not None and residual.shape != (p.n,):
        raise ValueError(f"residual has shape {residual.shape}, the product has ({p.n},)")
    out = _launch(p.kernel(eps, x.dtype), p.args(x, w, norm, residual), p.cfg, p.kd, p.n, p.out_shape, p.name, interpret,
                  finished=x.dtype if p.fused else None)
    return out if p.fused else p.after(out, x.dtype, residual)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A product's kernel: its tiling, and whether the consumer runs in the kernel's epilogue (`fused`)."""
    kd: int
    n: int
    cfg: GemvConfig
    transposed: bool
    layer: int | None
    norm_layer: int | None
    has_norm: bool
    reduce: bool
    residual: bool
    gated: bool
    fused: bool
    name: str

    @property
    def out_shape(self) -> tuple:
        return (self.n // 2 if self.gated else self.n,) if self.fused else (self.n,)

    def kernel(self, eps: float, dtype):
        if self.fused:
            return functools.partial(_kernel, layer=self.layer, rows=self.kd, cfg=self.cfg, transposed=True,
                                     norm=self.has_norm, norm_layer=self.norm_layer, eps=float(eps),
                                     residual=self.residual, gate_rows=self.out_shape[0] if self.gated else None,
                                     dtype=dtype)
        return functools.partial(_kernel, layer=self.layer, rows=self.kd // self.cfg.splits, cfg=self.cfg,
                                 transposed=self.transposed, norm=self.has_norm, norm_layer=self.norm_layer,
                                 eps=float(eps))

    def args(self, x, w, norm, residual) -> tuple:
        return ((x, w) if norm is None else (x, norm, w)) + ((residual,) if self.fused and self.residual else ())

    def after(self, partial: jax.Array, dtype, residual: jax.Array | None) -> jax.Array:
        """XLA's part after an unfused kernel: the partial sums [splits, N] added, then the consumer."""
        if not self.reduce:
            return partial
        y = partial[0] if self.cfg.splits == 1 else jnp.sum(partial, axis=0)
        if self.gated:
            return finish(y[: self.n // 2], dtype, up=y[self.n // 2:])
        if residual is not None:
            return finish(y, dtype, residual=residual)
        return y


def _plan(w: jax.Array, layer: int | None, transposed: bool, cfg: GemvConfig | None,
          norm: jax.Array | None, reduce: bool, residual: jax.Array | None, gated: bool) -> _Plan:
    """The checks and tiling of a `gemv` call."""
    mat_shape = _matrix_shape(w, layer)
    n, kd = mat_shape if transposed else mat_shape[::-1]
    if (residual is not None or gated) and not reduce:
        raise ValueError("residual= and gated= need the reduced product (reduce=True)")
    if residual is not None and gated:
        raise ValueError("a product takes one consumer: residual= or gated=, not both")
    if gated and n % 2:
        raise ValueError(f"gated=True needs [gate; up] rows, an even N, got {n}")
    norm_layer = _norm_layer(norm, kd, layer)
    cfg = cfg or default_config(kd, n, transposed)
    if cfg is None:
        raise ValueError(f"no kernel shape for a {kd} x {n} matrix (call `supported` first)")
    fused = transposed and cfg.splits == 1 and (residual is not None or (gated and (n // 2) % cfg.bn == 0))
    name = f"gemv_{kd}x{n}{'_t' if transposed else ''}{'_norm' if norm is not None else ''}"
    if fused:
        name += "_silu" if gated else "_residual"
    return _Plan(kd=kd, n=n, cfg=cfg, transposed=transposed, layer=layer, norm_layer=norm_layer,
                 has_norm=norm is not None, reduce=reduce, residual=residual is not None, gated=gated, fused=fused,
                 name=name)


def _launch(kernel, args: tuple, cfg: GemvConfig, kd: int, n: int, out_shape: tuple, name: str,
            interpret: bool, finished=None) -> jax.Array:
    """Run a projection kernel over its (N / bn, splits) grid: float32 partial sums [splits, *out_shape]; or,
    with `finished` (a dtype), a kernel that finishes its own rows (unsplit, the consumer in its epilogue):
    out_shape [N'] in that dtype, one program per bn of its N' outputs."""
    if n % cfg.bn or kd % (cfg.splits * cfg.bk):
        raise ValueError(f"{cfg} does not tile a {kd} x {n} matrix")
    params = {}
    if plt is not None and not interpret:
        params["compiler_params"] = plt.CompilerParams(num_warps=cfg.warps, num_stages=cfg.stages)
    if finished is not None:
        out, grid = jax.ShapeDtypeStruct(out_shape, finished), (out_shape[-1] // cfg.bn, 1)
    else:
        out, grid = jax.ShapeDtypeStruct((cfg.splits,) + out_shape, jnp.float32), (n // cfg.bn, cfg.splits)
    return pl.pallas_call(kernel, out_shape=out, grid=grid, interpret=interpret, name=name, **params)(*args)


# ---- a few rows at once (prefill of short prompts) ----------------------------------------------------

# Prompts of up to ROWS_MAX tokens (after padding to a power of 2 >= 16) take `gemm`; longer ones XLA's
# matmuls, which reach the matrix rate where the product stops being bound by the weight reads.
ROWS_MAX = 128

# The fastest tiling per (Kd, N, T, transposed) for bf16, measured on an H200 by `bench/probes/gemv_tune.py --phase
# rows` for the output-major layout the model uses; others get `rows_config`. Only the 7B's output projection is
# tuned: it is the one product the prefill runs through `gemm` (options.KernelOptions.prefill_wo).
TUNED_ROWS: dict[tuple[int, int, int, bool], GemvConfig] = {
    (4096, 4096, 16, True): GemvConfig(bn=32, bk=128, splits=4, warps=4, stages=3),  # 12.2 us (XLA's dot: 12.0)
    (4096, 4096, 32, True): GemvConfig(bn=32, bk=256, splits=2, warps=4, stages=3),  # 13.0 us (13.2)
    (4096, 4096, 64, True): GemvConfig(bn=64, bk=128, splits=4, warps=4, stages=3),  # 13.7 us (15.8)
    (4096, 4096, 128, True): GemvConfig(bn=64, bk=128, splits=2, warps=8, stages=3),  # 17.6 us (20.0)
}


def rows_padded(t: int) -> int:
    """Rows the kernel computes for t rows of x: a power of 2, at least 16 (the tensor-core dot's minimum)."""
    p = 16
    while p < t:
        p *= 2
    return p


def rows_config(kd: int, n: int, t: int, itemsize: int = 2, target_programs: int = 264,
                transposed: bool = False) -> GemvConfig | None:
    """A tiling for `gemm` of t (padded) rows of `itemsize`-byte elements, or None where the shape does not
    suit the kernel (the same heuristic for both layouts: a [bk, bn] or [bn, bk] weight tile).

    Each program walks bk rows of its [Kd, bn] column tile per iteration and multiplies the matching
    [T, bk] slice of x by it, so per stage it holds (T + bn) x bk elements in shared memory (kept near
    24 KB) and reads x's slice (from L2) once per bn weight columns: bn grows with T. The reduction is split
    only while the float32 partial sums [splits, T, N] stay small next to the weights (they are written and
    read back once), to reach about `target_programs` programs (2 per SM on an H100).
    """
    t = rows_padded(t)
    if itemsize == 2 and (kd, n, t, transposed) in TUNED_ROWS:
        return TUNED_ROWS[(kd, n, t, transposed)]
    bn = _pow2_divisor(n, max(64, t))
    while bn > max(16, t // 2) and (n // bn) < target_programs // 2:  # small matrices: more programs
        bn //= 2
    bk = _pow2_divisor(kd, max(16, 24576 // ((t + bn) * itemsize)))
    if bn < 16 or bk < 16:
        return None
    chunks = kd // bk
    cols = n // bn
    max_splits = max(1, int(0.03 * kd / t))  # partial sums' bytes (x2) <= ~12% of the weight's
    splits = 1
    for d in range(1, chunks + 1):
        if chunks % d == 0 and d <= max_splits and chunks // d >= 2:
            splits = d
            if cols * d >= target_programs:
                break
    return GemvConfig(bn=bn, bk=bk, splits=splits, warps=4 if t * bn <= 4096 else 8, stages=3)


def _rows_kernel(*refs, layer, rows, cfg: GemvConfig, norm: bool, norm_layer, eps: float, transposed: bool):
    x_ref, nw_ref, w_ref, o_ref, s, n0, k_start = _tile(refs, norm, cfg, rows)
    bn, bk = cfg.bn, cfg.bk
    t, kd = x_ref.shape
    lead = () if layer is None else (layer,)
    nlead = () if norm_layer is None else (norm_layer,)
    f32 = jnp.float32
    if norm:  # per row; every program reads all of x (T x Kd, from L2)
        r = _mean_square_scale(x_ref, _pow2_divisor(kd, max(16, 8192 // t)), eps)

    def body(i, acc):
        k = pl.multiple_of(k_start + i * bk, bk)
        xs = x_ref[:, pl.ds(k, bk)]  # [T, bk]
        if norm:  # as model.rms_norm: scaled in float32, rounded to x's dtype, times the norm weight
            xs = nw_ref[nlead + (pl.ds(k, bk),)][None, :] * (xs.astype(f32) * r[:, None]).astype(xs.dtype)
        if transposed:
            w = w_ref[lead + (pl.ds(n0, bn), pl.ds(k, bk))]  # [bn, bk]
            return acc + jax.lax.dot_general(xs.astype(w.dtype), w, (((1,), (1,)), ((), ())),
                                             preferred_element_type=f32)
        w = w_ref[lead + (pl.ds(k, bk), pl.ds(n0, bn))]  # [bk, bn]
        return acc + jnp.dot(xs.astype(w.dtype), w, preferred_element_type=f32)

    acc = jax.lax.fori_loop(0, rows // bk, body, jnp.zeros((t, bn), f32))
    o_ref[s, :, pl.ds(n0, bn)] = acc


def gemm_supported(kd: int, n: int, t: int, itemsize: int = 2, transposed: bool = False) -> bool:
    return (1 <= t and rows_padded(t) <= ROWS_MAX
            and rows_config(kd, n, t, itemsize, transposed=transposed) is not None)


def gemm(x: jax.Array, w: jax.Array, layer: int | None = None, *, transposed: bool = False,
         cfg: GemvConfig | None = None, norm: jax.Array | None = None, eps: float = 1e-6,
         interpret: bool = False) -> jax.Array:
    """float32 [T, N] = x @ W (or `rms_norm(x) @ W` with `norm`) for a few rows x [T, Kd].

    W: [Kd, N] (or [N, Kd] if `transposed`), or stacked [L, ...] with `layer` the static index of the matrix
    to use; norm: the RMSNorm
    weight [Kd] or stacked [L, Kd], as in `gemv`. x's rows are padded to `rows_padded(T)` (zero rows, whose
    results are dropped). The products run in x's dtype with float32 accumulation, as XLA's do.
    """
    mat_shape = _matrix_shape(w, layer)
    n, kd = mat_shape if transposed else mat_shape[::-1]
    if x.ndim != 2 or x.shape[1] != kd:
        raise ValueError(f"x has shape {x.shape}, the weight {w.shape} needs (T, {kd})")
    t = x.shape[0]
    tp = rows_padded(t)
    norm_layer = _norm_layer(norm, kd, layer)
    cfg = cfg or rows_config(kd, n, tp, jnp.dtype(x.dtype).itemsize, transposed=transposed)
    if cfg is None:
        raise ValueError(f"no kernel shape for a {kd} x {n} matrix (call `gemm_supported` first)")
    if tp != t:
        x = jnp.pad(x, ((0, tp - t), (0, 0)))
    kernel = functools.partial(_rows_kernel, layer=layer, rows=kd // cfg.splits, cfg=cfg, norm=norm is not None,
                               norm_layer=norm_layer, eps=float(eps), transposed=transposed)
    partial = _launch(kernel, (x, w) if norm is None else (x, norm, w), cfg, kd, n, (tp, n),
                      f"gemm{tp}_{kd}x{n}{'_t' if transposed else ''}{'_norm' if norm is not None else ''}",
                      interpret)
    out = partial[0] if cfg.splits == 1 else jnp.sum(partial, axis=0)
    return out[:t] if tp != t else out
