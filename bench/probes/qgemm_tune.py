"""Quantized prefill products on the GPU (issue 25): tile qgemv.gemm (codes dequantized tile by tile inside the
matmul) per layer matrix, scheme and row count, against the path a chunk of that many rows takes today (XLA's
matmul over the dequantized matrix) and a bf16 matmul of the same shape; then the TTFT of the model shape with the
winners installed (qgemv.TUNED_ROWS) and the kernel at every bucket, against today's default, in the same process.

  python3 -m bench.probes.qgemm_tune --out $OUT [--shape llama2-7b] [--schemes int8,int4-g32-asym] [--rows 64,128,512]
  JAX_PLATFORMS=cpu python3 -m bench.probes.qgemm_tune --shape tiny --rows 32 --out /tmp/qg   (a dry run, interpreted)

Per (matrix, scheme, rows): Lw copies of random codes and scales (Lw so that the set exceeds the L2 cache), each
product for all Lw back to back (wall clock over 30 calls after warm-up). Every candidate is first checked against
XLA's product (relative error). Writes qgemm_tune.json and prints a table.
"""
from __future__ import annotations

import contextlib
import itertools
import os

import numpy as np

import jax
import jax.numpy as jnp

from bench.probes.harness import layer_matrices, parse, parser, run_record, shape_config, timed, write_json
from bench.probes.qgemv_tune import code_set, try_candidates
from hybrid_jax import gemv as G
from hybrid_jax import qgemv as Q
from hybrid_jax import quant


def candidates(kd: int, n: int, t: int, scheme) -> list[tuple[G.GemvConfig, int]]:
    """(tiling, rows of x a program) to try: column tiles of 32-128, reduction steps of 64-256 inputs (whole
    groups), row tiles of 32-128 (at most the rows), 8 warps for the largest tiles."""
    out = []
    tp = G.rows_padded(t)
    for bn, bk, bt in itertools.product((32, 64, 128), (64, 128, 256), (32, 64, 128)):
        if n % bn or kd % bk or bk > kd or bt > tp or (scheme.group and bk % scheme.group):
            continue
        c = G.GemvConfig(bn=bn, bk=bk, splits=1, warps=8 if bt * bn >= 128 * 64 else 4, stages=3)
        if Q._tiles(c, scheme):
            out.append((c, bt))
    return out


def xla_product(qm, l, scheme, x):
    """The product as model._project_quantized computes a chunk above qgemv.gemm_rows_max rows."""
    if scheme.bits == 8 and scheme.group is None:
        return jnp.dot(x, qm["q"][l].astype(x.dtype).T, preferred_element_type=jnp.float32) * \
            qm["scale"][l][:, 0].astype(jnp.float32)
    return jnp.dot(x, quant.dequantize(qm, l, scheme, x.dtype).T, preferred_element_type=jnp.float32)


def tune(cfg, schemes, rows_list, interpret, set_bytes=256e6):
    rows, best = [], {}
    for (name, kd, n), sname, t in itertools.product(layer_matrices(cfg), schemes, rows_list):
        scheme = quant.parse(sname)
        if not Q.gemm_supported(kd, n, scheme):
            continue
        _, lw, qm = code_set(kd, n, scheme, set_bytes)
        x = jax.random.normal(jax.random.PRNGKey(t), (t, kd), jnp.bfloat16)
        key = {"matrix": name, "scheme": sname, "kd": kd, "n": n, "rows": t}

        xla = jax.jit(lambda qm, x, scheme=scheme, lw=lw: [xla_product(qm, l, scheme, x) for l in range(lw)])
        ref = np.asarray(jnp.stack(xla(qm, x)), np.float32)
        rows.append({**key, "impl": "xla", "us": timed(xla, (qm, x)) / lw * 1e6})
        wb = jax.random.normal(jax.random.PRNGKey(2), (2, n, kd), jnp.bfloat16)
        bf16 = jax.jit(lambda w, x: [jnp.dot(x, w[l].T, preferred_element_type=jnp.float32) for l in range(2)])
        rows.append({**key, "impl": "bf16", "us": timed(bf16, (wb, x)) / 2 * 1e6})
        del wb

        def make(cb, qm=qm, x=x, scheme=scheme, lw=lw):
            c, bt = cb
            fn = jax.jit(lambda qm, x: [Q.gemm(x, qm, l, scheme, cfg=c, bt=bt, interpret=interpret)
                                        for l in range(lw)])
            return fn.lower(qm, x).compile()

        cands = candidates(kd, n, t, scheme)[: 2 if interpret else None]
        default = (Q.rows_config(kd, n, scheme), Q.rows_tile(t))
        if default not in cands:
            cands.append(default)
        mine = try_candidates(cands, make, (qm, x), ref, lw, 1 if interpret else 12,
                              lambda cb, key=key, default=default: {**key, "impl": "qgemm", "cfg": cb[0].__dict__,
                                                                     "bt": cb[1], "default": cb == default})
        rows += mine
        ok = [r for r in mine if "us" in r]
        if ok:
            b = min(ok, key=lambda r: r["us"])
            best[(kd, n, sname, G.rows_padded(t))] = (b["cfg"], b["bt"])
    return rows, best


def main(argv=None) -> None:
    ap = parser(__doc__, shape="llama2-7b")
    ap.add_argument("--schemes", default="int8,int4-g32-asym")
    ap.add_argument("--rows", default="64,128,512", help="rows of x (prefill buckets) to tile for")
    ap.add_argument("--lengths", default="10,60,100,500", help="TTFT prompt lengths of the A/B after the tiling")
    ap.add_argument("--no-ttft", action="store_true", help="kernels only")
    args = parse(ap, argv)
    from bench.probes import quant_check
    from hybrid_jax.options import KernelOptions

    interpret = jax.default_backend() == "cpu"
    cfg = shape_config(args.shape, "float32" if interpret else "bfloat16")
    schemes = args.schemes.split(",")
    rows_list = [int(r) for r in args.rows.split(",")]
    rec = {"run": run_record(), "args": vars(args)}
    path = os.path.join(args.out, "qgemm_tune.json")
    rows, best = tune(cfg, schemes, rows_list, interpret)
    rec["kernels"] = rows
    rec["best"] = [{"kd": k[0], "n": k[1], "scheme": k[2], "rows": k[3], "cfg": v[0], "bt": v[1]}
                   for k, v in best.items()]
    write_json(path, rec)
    print(f"\n{rec['run']['device']}, {args.shape}: us a product (best tiling)")
    print("matrix  scheme          rows   bf16     xla   default   best   best tiling")
    for (name, kd, n), s, t in itertools.product(layer_matrices(cfg), schemes, rows_list):
        mine = [r for r in rows if (r["matrix"], r["scheme"], r["rows"]) == (name, s, t) and "us" in r]
        if not mine:
            continue
        get = {i: min((r["us"] for r in mine if r["impl"] == i), default=float("nan")) for i in ("bf16", "xla")}
        dflt = min((r["us"] for r in mine if r.get("default")), default=float("nan"))
        q = [r for r in mine if r["impl"] == "qgemm"]
        b = min(q, key=lambda r: r["us"]) if q else None
        cs = f"bn={b['cfg']['bn']} bk={b['cfg']['bk']} bt={b['bt']} w={b['cfg']['warps']}" if b else ""
        print(f"{name:7s} {s:15s} {t:4d} {get['bf16']:7.1f} {get['xla']:7.1f} {dflt:8.1f} "
              f"{b['us'] if b else float('nan'):7.1f}   {cs}")
    if args.no_ttft:
        return
    # TTFT: today's default (the kernel up to qgemv.gemm_rows_max rows, default tiles) against the tuned tiles at
    # every bucket, bf16 first; same process
    lengths = [int(x) for x in args.lengths.split(",")]
    on_acc = not interpret
    kern = {} if on_acc else {"gemv": "interpret", "decode_attention": "interpret", "quant_prefill": "interpret"}
    ttft = []
    for label in ["none"] + [f"{s}{v}" for s in schemes for v in ("", ":tuned")]:
        s = label.split(":")[0]
        tuned = {k: (G.GemvConfig(**c), bt) for k, (c, bt) in best.items()}
        with quant_check.gemm_at_every_bucket(tuned) if label.endswith(":tuned") else contextlib.nullcontext():
            r = quant_check.one(cfg.replace(quant=None if s == "none" else quant.parse(s).name), 20 if on_acc else 2,
                                lengths, 5 if on_acc else 1, KernelOptions(**kern))
        ttft.append({"label": label, "ttft_ms": r["ttft_ms"], "decode_ms": r["decode_ms"]})
        rec["ttft"] = ttft
        write_json(path, rec)
    print("\nTTFT ms   " + "  ".join(f"@{n:<6d}" for n in lengths))
    for r in ttft:
        print(f"{r['label']:22s} " + "  ".join(f"{v:7.2f}" for v in r["ttft_ms"].values()))


if __name__ == "__main__":
    main()
