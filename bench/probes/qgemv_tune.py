"""Quantized decode GEMV on the GPU (issue 25): tile hybrid_jax/qgemv.py's kernels per layer matrix and scheme
against XLA's row reduction over the codes (quant.matvec); then the decode step of the model shape with the best tilings installed.

  python3 -m bench.probes.qgemv_tune --out $OUT [--shape llama2-7b] [--schemes int8,int4-g32-sym,int4-g32-asym]
  JAX_PLATFORMS=cpu python3 -m bench.probes.qgemv_tune --shape tiny --out /tmp/qt   (a dry run, interpreted)

Per (matrix, scheme): Lw copies of random codes and scales ([Lw, N, ...], Lw so that the set exceeds the L2
cache), each product as the model runs it (its norm and consumer, bench.probes.gemv_tune.EPILOGUES), Lw of them
back to back (wall clock over 30 calls after warm-up); bandwidth = stored bytes / time. Every candidate is first
checked against quant.matvec. Then, with qgemv.TUNED set to the winners, the decode step per scheme (bench.probes.quant_check):
XLA's row reductions against the kernels and mixes of them (--variants), bf16 first. Writes qgemv_tune.json and prints a table.
"""
from __future__ import annotations

import concurrent.futures as cf
import itertools
import math
import os

import numpy as np

import jax
import jax.numpy as jnp

from bench.probes.gemv_tune import EPILOGUES
from bench.probes.harness import layer_matrices, parse, parser, run_record, shape_config, timed, write_json
from hybrid_jax import gemv as G
from hybrid_jax import qgemv as Q
from hybrid_jax import quant
from hybrid_jax.model import rms_norm


def candidates(kd, n, scheme):
    out = []
    for bn, bk in itertools.product((1, 2, 4, 8, 16, 32), (256, 512, 1024, 2048, 4096)):
        tile = bn * bk * scheme.bits // 8  # code bytes an iteration
        if bk > kd or n % bn or not 1024 <= tile <= 16384 or n // bn < 128 or (scheme.group and bk % scheme.group):
            continue
        for warps in ((4, 8) if tile >= 4096 else (4,)):
            out.append(G.GemvConfig(bn, bk, 1, warps=warps, stages=3))
    return out


def random_codes(key, lw, n, kd, scheme):
    k1, k2, k3 = jax.random.split(key, 3)
    if scheme.bits == 8:
        q = jax.random.randint(k1, (lw, n, kd), -127, 128, jnp.int32).astype(jnp.int8)
    else:
        q = jax.random.randint(k1, (lw, n, kd // 2), 0, 256, jnp.int32).astype(jnp.uint8)
    g = scheme.groups(kd)
    qm = {"q": q, "scale": (0.01 * jax.random.uniform(k2, (lw, n, g), jnp.float32, 0.5, 1.5)).astype(jnp.float16)}
    if scheme.asym:
        qm["zero"] = (-0.08 * jax.random.uniform(k3, (lw, n, g), jnp.float32, 0.5, 1.5)).astype(jnp.float16)
    return qm


def code_set(kd, n, scheme, set_bytes=256e6):
    """(stored bytes of one matrix, Lw, Lw random copies of its codes and scales): Lw so that the set exceeds the
    L2 cache, and the products read it from memory."""
    nbytes = n * kd * scheme.bits // 8 + n * scheme.groups(kd) * 2 * (2 if scheme.asym else 1)
    lw = min(64, max(2, math.ceil(set_bytes / nbytes)))
    return nbytes, lw, random_codes(jax.random.PRNGKey(kd + n), lw, n, kd, scheme)


def try_candidates(cands, make, args, ref, lw, threads, row_of) -> list[dict]:
    """One row per candidate tiling (`row_of(candidate)`): compiled by `make(candidate)` in `threads` threads (a
    tiling the compiler rejects gets its error), its Lw products `exe(*args)` checked against `ref` (relative error
    at most 2e-2, else "wrong result"), then timed: "us" a product."""
    def attempt(c):
        try:
            return make(c)
        except Exception as e:  # a tiling Triton rejects
            return f"{type(e).__name__}: {e}"[:300]

    with cf.ThreadPoolExecutor(threads) as pool:
        exes = list(pool.map(attempt, cands))
    rows = []
    for c, exe in zip(cands, exes):
        row = row_of(c)
        if isinstance(exe, str):
            rows.append({**row, "error": exe})
            continue
        out = np.asarray(jnp.stack(exe(*args)), np.float32)
        row["rel_err"] = float(np.max(np.abs(out - ref)) / (np.max(np.abs(ref)) + 1e-9))
        if row["rel_err"] > 2e-2:
            rows.append({**row, "error": "wrong result"})
            continue
        rows.append({**row, "us": timed(exe, args) / lw * 1e6})
    return rows


def tune(cfg, schemes, interpret, set_bytes=256e6):
    rows, best = [], {}
    for (name, kd, n), sname in itertools.product(layer_matrices(cfg), schemes):
        scheme = quant.parse(sname)
        if not Q.supported(kd, n, scheme):
            continue
        nbytes, lw, qm = code_set(kd, n, scheme, set_bytes)
        x = jax.random.normal(jax.random.PRNGKey(1), (kd,), jnp.bfloat16)
        epi = EPILOGUES[name]
        nw = (1 + 0.1 * jax.random.normal(jax.random.PRNGKey(n), (lw, kd))).astype(jnp.bfloat16) if epi.get("norm") else None
        res = jnp.zeros((n,), jnp.bfloat16) if epi.get("residual") else None
        gated = epi.get("gated", False)

        def ref_one(l, qm=qm, x=x, nw=nw, res=res, gated=gated, scheme=scheme, n=n):
            h = x if nw is None else rms_norm(x, nw[l], cfg.norm_eps)
            y = quant.matvec(qm, l, scheme, h)
            if gated:
                return G.finish(y[: n // 2], jnp.bfloat16, up=y[n // 2:])
            return G.finish(y, jnp.bfloat16, residual=res) if res is not None else y

        xla = jax.jit(lambda qm, x: [ref_one(l, qm, x) for l in range(lw)])
        ref = np.asarray(jnp.stack(xla(qm, x)), np.float32)
        t_xla = timed(xla, (qm, x))
        rows.append({"matrix": name, "scheme": sname, "kd": kd, "n": n, "impl": "xla", "us": t_xla / lw * 1e6,
                     "TBps": nbytes * lw / t_xla / 1e12})

        def make(c, qm=qm, x=x, nw=nw, res=res, gated=gated, scheme=scheme):
            fn = jax.jit(lambda qm, x: [Q.gemv(x, qm, l, scheme, cfg=c, norm=nw, eps=cfg.norm_eps, residual=res,
                                               gated=gated, interpret=interpret) for l in range(lw)])
            return fn.lower(qm, x).compile()

        cands = candidates(kd, n, scheme)[: 2 if interpret else None]
        mine = try_candidates(cands, make, (qm, x), ref, lw, 1 if interpret else 8,
                              lambda c: {"matrix": name, "scheme": sname, "kd": kd, "n": n, "impl": "qgemv",
                                         "cfg": c.__dict__})
        for r in mine:
            if "us" in r:
                r["TBps"] = nbytes / (r["us"] * 1e-6) / 1e12
        rows += mine
        ok = [r for r in mine if "us" in r]
        if ok:
            best[(kd, n, sname)] = min(ok, key=lambda r: r["us"])["cfg"]
    return rows, best


def main(argv=None) -> None:
    ap = parser(__doc__, shape="llama2-7b")
    ap.add_argument("--schemes", default="int8,int4-g32-sym,int4-g32-asym")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--no-step", action="store_true", help="kernels only")
    ap.add_argument("--variants", default="xla,qgemv", help="the decode steps per scheme: xla (every projection an "
                    "XLA row reduction), qgemv (every one the kernel), xla-NAME-NAME... (those through XLA)")
    args = parse(ap, argv)
    from bench import floors
    from bench.probes import quant_check
    from hybrid_jax.options import KernelOptions

    interpret = jax.default_backend() == "cpu"
    cfg = shape_config(args.shape, "float32" if interpret else "bfloat16")
    schemes = args.schemes.split(",")
    rec = {"run": run_record(), "args": vars(args)}
    path = os.path.join(args.out, "qgemv_tune.json")
    rows, best = tune(cfg, schemes, interpret)
    rec["kernels"] = rows
    rec["best"] = [{"kd": k[0], "n": k[1], "scheme": k[2], "cfg": v} for k, v in best.items()]
    write_json(path, rec)
    steps = []
    if not args.no_step:
        for k, c in best.items():  # the winners
            Q.TUNED[k] = G.GemvConfig(**c)
        on_acc = not interpret
        bw = floors.copy_bandwidth(2 << 30 if on_acc else 64 << 20, cfg.dtype, reps=20 if on_acc else 3)["bw_Bps"]
        rec["copy_bw_Bps"] = bw
        variants = {"xla": frozenset({"wqkv", "wo", "w13", "w2"}), "qgemv": frozenset()}
        variants.update({v: frozenset(v.split("-")[1:]) for v in args.variants.split(",") if v.startswith("xla-")})
        labels = [("none", {})] + [(f"{s}:{v}", {"row_reduce": variants[v]}) for s in schemes
                                   for v in args.variants.split(",")]
        for label, kw in labels:
            s = label.split(":")[0]
            if interpret:
                kw = {**kw, "gemv": "interpret", "decode_attention": "interpret"}
            r = quant_check.one(cfg.replace(quant=None if s == "none" else s), args.steps if on_acc else 2,
                                [10, 100], 3 if on_acc else 1, KernelOptions(**kw))
            r.update(label=label, floor_ms=r["weight_bytes"] / bw * 1e3)
            r["over_floor"] = r["decode_ms"] / r["floor_ms"]
            steps.append(r)
            rec["steps"] = steps
            write_json(path, rec)
    print(f"\n{rec['run']['device']}, {args.shape}")
    print("matrix  scheme          impl          us      TB/s   best cfg")
    for (name, kd, n), s in itertools.product(layer_matrices(cfg), schemes):
        mine = [r for r in rows if r["matrix"] == name and r["scheme"] == s and "us" in r]
        for impl in ("xla", "qgemv"):
            rs = [r for r in mine if r["impl"] == impl]
            if rs:
                b = min(rs, key=lambda r: r["us"])
                c = b.get("cfg")
                cs = f"bn={c['bn']} bk={c['bk']} w={c['warps']}" if c else ""
                print(f"{name:7s} {s:15s} {impl:12s} {b['us']:7.1f}  {b['TBps']:5.2f}   {cs}")
    if steps:
        print("\nstep            GB     decode ms  floor ms  x floor  TTFT@10  TTFT@100")
        for r in steps:
            print(f"{r['label']:15s} {r['weight_bytes'] / 1e9:5.2f}  {r['decode_ms']:9.3f}  {r['floor_ms']:8.3f}  "
                  f"{r['over_floor']:7.3f}  " + "  ".join(f"{v:7.2f}" for v in r["ttft_ms"].values()))


if __name__ == "__main__":
    main()
