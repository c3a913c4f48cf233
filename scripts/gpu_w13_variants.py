"""Why is the decode step's gate/up kernel (RMSNorm in its prologue, silu(gate) x up in its epilogue) ~3.5 us
slower than the plain product of the same matrix (run 45: 50.5 vs 47.0 us on an H200)? Kernel structures
timed in isolation on the 7B's w13 (issue 5, docs/ENGINEERING_LOG.md session 10).

  PYTHONPATH=. python3 scripts/gpu_w13_variants.py --out $OUT/w13 [--shape llama2-7b]

Lw stacked copies of w13 (output-major [2F, D], more bytes than L2), each product reading its own layer, back
to back (wall clock over 30 calls: the device's time). Variants, each over a small grid of tilings:
  plain        gemv.gemv without norm or consumer ([2F] float32 sums): the reference rate
  model        gemv.gemv(norm=, gated=True): the step's kernel
  nonorm       gemv.gemv(gated=True) on an already normalised x
  normonly     gemv.gemv(norm=) without the consumer ([2F] float32 sums)
  late         this script's kernel: the mean square summed in the loop and applied to the sums at the end
               (no prologue before the first weight loads; rounds differently from model.rms_norm)
  reduce       this script's kernel: the prologue as `model`, the [bn] sums reduced every iteration
  late_reduce  both
Every variant's result is checked against a float32 reference first.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import itertools
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402

from gpu_gemv_tune import timed  # noqa: E402  (scripts/ is this script's folder)
from hybrid_jax import gemv as G  # noqa: E402
from shapes import shape_config  # noqa: E402  (scripts/ is this script's folder)
from hybrid_jax.model import rms_norm  # noqa: E402

try:
    from jax.experimental.pallas import triton as plt
except Exception:  # pragma: no cover
    plt = None


def _kernel(x_ref, nw_ref, w_ref, o_ref, *, layer, bn, bk, F, late, reduce_each, eps, dtype):
    f32 = jnp.float32
    n0 = pl.multiple_of(pl.program_id(0) * bn, bn)
    kd = x_ref.shape[0]
    r = None if late else G._mean_square_scale(x_ref, G._pow2_divisor(kd, 4096), eps)

    def body(i, c):
        k = pl.multiple_of(i * bk, bk)
        xs = x_ref[pl.ds(k, bk)]
        nw = nw_ref[layer, pl.ds(k, bk)]
        if late:
            xf = xs.astype(f32)
            h = nw.astype(f32) * xf
        else:
            h = (nw * (xs.astype(f32) * r).astype(xs.dtype)).astype(f32)
        g = w_ref[layer, pl.ds(n0, bn), pl.ds(k, bk)].astype(f32)
        u = w_ref[layer, pl.ds(F + n0, bn), pl.ds(k, bk)].astype(f32)
        if reduce_each:
            a0, a1 = c[0] + jnp.sum(g * h[None, :], axis=1), c[1] + jnp.sum(u * h[None, :], axis=1)
        else:
            a0, a1 = c[0] + g * h[None, :], c[1] + u * h[None, :]
        return (a0, a1, c[2] + jnp.sum(xf * xf)) if late else (a0, a1)

    shape = (bn,) if reduce_each else (bn, bk)
    init = (jnp.zeros(shape, f32), jnp.zeros(shape, f32))
    if late:
        init += (jnp.float32(0.0),)
    c = jax.lax.fori_loop(0, kd // bk, body, init)
    gate, up = (c[0], c[1]) if reduce_each else (jnp.sum(c[0], axis=1), jnp.sum(c[1], axis=1))
    if late:
        s = jax.lax.rsqrt(c[2] / kd + eps)
        gate, up = gate * s, up * s
    o_ref[pl.ds(n0, bn)] = G.finish(gate, dtype, up=up)


def custom(x, nw, w, layer, cfg: G.GemvConfig, *, late, reduce_each, eps, interpret=False):
    n, kd = w.shape[1:]
    F = n // 2
    kern = functools.partial(_kernel, layer=layer, bn=cfg.bn, bk=cfg.bk, F=F, late=late, reduce_each=reduce_each,
                             eps=eps, dtype=x.dtype)
    params = {} if (plt is None or interpret) else {
        "compiler_params": plt.CompilerParams(num_warps=cfg.warps, num_stages=cfg.stages)}
    return pl.pallas_call(kern, out_shape=jax.ShapeDtypeStruct((F,), x.dtype), grid=(F // cfg.bn,),
                          interpret=interpret, name=f"w13_{'late' if late else 'pro'}{'_red' if reduce_each else ''}",
                          **params)(x, nw, w)


VARIANTS = ("plain", "model", "nonorm", "normonly", "late", "reduce", "late_reduce")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--set-bytes", type=float, default=600e6)
    ap.add_argument("--interpret", action="store_true", help="CPU dry run")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    cfg = shape_config(args.shape)
    kd, F = cfg.dim, cfg.ffn_dim
    n = 2 * F
    mat_bytes = kd * n * 2
    Lw = max(2, int(np.ceil(args.set_bytes / mat_bytes)))
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    w = jax.random.normal(k1, (Lw, n, kd), jnp.bfloat16)
    x = jax.random.normal(k2, (kd,), jnp.bfloat16)
    nw = (1 + 0.1 * jax.random.normal(k3, (Lw, kd))).astype(jnp.bfloat16)
    eps = cfg.norm_eps
    xn = [rms_norm(x, nw[l], eps) for l in range(Lw)]
    ref_sums = np.stack([np.asarray(jnp.dot(xn[l].astype(jnp.float32), w[l].T.astype(jnp.float32),
                                            precision=jax.lax.Precision.HIGHEST)) for l in range(Lw)])
    ref_gated = np.asarray(G.finish(jnp.asarray(ref_sums[:, :F]), jnp.bfloat16, up=jnp.asarray(ref_sums[:, F:])),
                           np.float32)
    sums0 = jnp.asarray(np.stack([np.asarray(jnp.dot(xn[0].astype(jnp.float32), w[l].T.astype(jnp.float32),
                                                     precision=jax.lax.Precision.HIGHEST)) for l in range(Lw)]))
    ref_nonorm = np.asarray(G.finish(sums0[:, :F], jnp.bfloat16, up=sums0[:, F:]), np.float32)
    plain_ref = np.stack([np.asarray(jnp.dot(x.astype(jnp.float32), w[l].T.astype(jnp.float32),
                                             precision=jax.lax.Precision.HIGHEST)) for l in range(Lw)])
    it = args.interpret

    def fn_for(v, c):
        if v == "plain":
            return lambda x, w: [G.gemv(x, w, l, transposed=True, cfg=c, interpret=it) for l in range(Lw)], plain_ref
        if v == "model":
            return lambda x, w: [G.gemv(x, w, l, transposed=True, cfg=c, norm=nw, eps=eps, gated=True, interpret=it)
                                 for l in range(Lw)], ref_gated
        if v == "nonorm":  # x already normalised (the same x for every layer: layer 0's)
            return lambda x, w: [G.gemv(xn[0], w, l, transposed=True, cfg=c, gated=True, interpret=it)
                                 for l in range(Lw)], ref_nonorm
        if v == "normonly":
            return lambda x, w: [G.gemv(x, w, l, transposed=True, cfg=c, norm=nw, eps=eps, interpret=it)
                                 for l in range(Lw)], ref_sums
        late, red = v in ("late", "late_reduce"), v in ("reduce", "late_reduce")
        return lambda x, w: [custom(x, nw, w, l, c, late=late, reduce_each=red, eps=eps, interpret=it)
                             for l in range(Lw)], ref_gated

    tilings = [G.GemvConfig(bn, bk, 1, wp, st) for bn, bk, (wp, st) in
               itertools.product((4, 8, 16), (256, 512, 1024), ((4, 3), (4, 4), (8, 3)))
               if F % bn == 0 and kd % bk == 0 and bn * bk <= 8192]
    if it:
        tilings = [G.GemvConfig(4, 64, 1, 4, 3)]
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "Lw": Lw, "mat_bytes": mat_bytes,
           "command": " ".join(sys.argv), "rows": []}
    best = {}

    def build(vc):
        v, c = vc
        try:
            f, ref = fn_for(v, c)
            j = jax.jit(f)
            j.lower(x, w).compile()
            return v, c, j, ref, None
        except Exception as e:  # noqa: BLE001
            return v, c, None, None, f"{type(e).__name__}: {str(e)[:200]}"

    jobs = [(v, c) for v in args.variants.split(",") for c in tilings]
    with cf.ThreadPoolExecutor(8) as pool:
        built = list(pool.map(build, jobs))
    for v, c, j, ref, err in built:
        row = {"variant": v, "cfg": c.__dict__}
        if err:
            row["error"] = err
        else:
            got = np.stack([np.asarray(a, np.float32).reshape(-1) for a in j(x, w)])
            row["rel_err"] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
            row["us"] = timed(j, (x, w)) / Lw * 1e6
            row["TBps"] = mat_bytes / (row["us"] * 1e-6) / 1e12
            if row["rel_err"] < 3e-2 and (v not in best or row["us"] < best[v]["us"]):
                best[v] = row
        res["rows"].append(row)
    with open(os.path.join(args.out, "w13_variants.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"{res['device']}, jax {res['jax']}, w13 {n}x{kd}, Lw {Lw}")
    print("| variant | best us (TB/s) | tiling | rel err | at model's tiling us |")
    print("|---|---|---|---|---|")
    tuned = G.TUNED.get((kd, n, True))
    for v in args.variants.split(","):
        b = best.get(v)
        at = [r for r in res["rows"] if r["variant"] == v and tuned is not None and r["cfg"] == tuned.__dict__
              and "us" in r]
        errs = [r["error"] for r in res["rows"] if r["variant"] == v and "error" in r]
        if b is None:
            print(f"| {v} | - | - | - | {errs[:1]} |")
            continue
        print(f"| {v} | {b['us']:.1f} ({b['TBps']:.2f}) | {b['cfg']} | {b['rel_err']:.1e} | "
              f"{at[0]['us']:.1f} |" if at else f"| {v} | {b['us']:.1f} ({b['TBps']:.2f}) | {b['cfg']} | "
              f"{b['rel_err']:.1e} | - |")


if __name__ == "__main__":
    main()
