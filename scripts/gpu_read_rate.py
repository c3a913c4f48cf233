"""How fast can any kernel here read the 7B's layer matrices? (issue 5, docs/ENGINEERING_LOG.md session 10)

  PYTHONPATH=. python3 scripts/gpu_read_rate.py --out $OUT/read [--shape llama2-7b]

The decode step's GEMVs read at ~3.9 TB/s on an H200, and so does cuBLAS's (runs 40, 45, 60), against the
4.25 TB/s copy bandwidth that sets the decode floor (bytes read + written by a copy). Is ~3.9 TB/s this card's
rate for reading a matrix of this size once, or do some kernels read faster (so that a better GEMV could)?
Per matrix shape (Lw stacked copies, more bytes than L2, back to back, wall clock over 30 calls):
  xla_rowsum   jnp.sum(w[l], axis=1) in float32: XLA's row reduction (the GEMV's access pattern)
  xla_colsum   jnp.sum(w[l], axis=0)
  xla_dot      x @ w[l].T (XLA's own choice of kernel)
  xla_mulsum   jnp.sum(w[l] * x, axis=1) in float32: the same product as a row reduction
  pallas_gemv  gemv.gemv with the model's tiling (no norm, no consumer)
  torch_sum    torch.sum(w[l], dim=1) (PyTorch's reduction), torch_mv: torch.mv (cuBLAS)
and the suite's copy bandwidth (bench.floors.copy_bandwidth, 2 GiB) in the same process.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gpu_gemv_tune import EPILOGUES, timed, torch_seconds  # noqa: E402  (scripts/ is this script's folder)
from hybrid_jax import gemv as G  # noqa: E402
from shapes import layer_matrices, shape_config  # noqa: E402  (scripts/ is this script's folder)


def torch_rates(n, kd, Lw):
    try:
        import torch
        if not torch.cuda.is_available():
            return {}
    except Exception:  # noqa: BLE001
        return {}
    w = torch.randn((Lw, n, kd), device="cuda", dtype=torch.bfloat16)
    x = torch.randn((kd,), device="cuda", dtype=torch.bfloat16)
    out = {}
    for name, f in (("torch_sum", lambda l: torch.sum(w[l], dim=1, dtype=torch.float32)),
                    ("torch_mv", lambda l: torch.mv(w[l], x))):
        out[name] = torch_seconds(lambda: [f(l) for l in range(Lw)], 30) / Lw
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--set-bytes", type=float, default=600e6)
    ap.add_argument("--interpret", action="store_true", help="CPU dry run")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    cfg = shape_config(args.shape)
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "command": " ".join(sys.argv), "rows": []}
    from bench.floors import copy_bandwidth
    cb = copy_bandwidth(2 * 2 ** 30 if not args.interpret else 2 ** 20, reps=20 if not args.interpret else 2)
    res["copy_bandwidth"] = cb
    copy_GBps = cb["bw_Bps"] / 1e9
    for name, kd, n in layer_matrices(cfg):
        mat_bytes = kd * n * 2
        Lw = max(2, math.ceil(args.set_bytes / mat_bytes))
        w = jax.random.normal(jax.random.PRNGKey(n), (Lw, n, kd), jnp.bfloat16)
        x = jax.random.normal(jax.random.PRNGKey(kd), (kd,), jnp.bfloat16)
        cfg_g = G.default_config(kd, n, transposed=True)
        fns = {
            "xla_rowsum": jax.jit(lambda w: [jnp.sum(w[l].astype(jnp.float32), axis=1) for l in range(Lw)]),
            "xla_colsum": jax.jit(lambda w: [jnp.sum(w[l].astype(jnp.float32), axis=0) for l in range(Lw)]),
            "xla_dot": jax.jit(lambda w: [x @ w[l].T for l in range(Lw)]),
            # the product as XLA's row reduction of w * x (float32 products and sums, like the dot's)
            "xla_mulsum": jax.jit(lambda w: [jnp.sum(w[l].astype(jnp.float32) * x.astype(jnp.float32)[None, :], axis=1)
                                             for l in range(Lw)]),
            "pallas_gemv": jax.jit(lambda w: [G.gemv(x, w, l, transposed=True, cfg=cfg_g, interpret=args.interpret)
                                              for l in range(Lw)]),
        }
        # the kernel with whole rows (or half rows) per program, loaded in one go: the access of XLA's row
        # reduction (no tuning sweep went past 1024 columns per load before run 69); plain, and as the step
        # runs the matrix (its norm and consumer: gpu_gemv_tune.EPILOGUES)
        epi = EPILOGUES.get(name, {})
        nw = jnp.ones((Lw, kd), jnp.bfloat16) if epi.get("norm") else None
        resid = jnp.zeros((n,), jnp.bfloat16) if epi.get("residual") else None
        for bn, bk, wp, st in ((1, 4096, 4, 1), (1, 4096, 8, 1), (2, 4096, 4, 1), (2, 4096, 8, 1), (4, 4096, 8, 1),
                               (1, 2048, 4, 2), (2, 2048, 4, 2), (4, 2048, 8, 2)):
            if kd % bk or n % bn or (epi.get("gated") and (n // 2) % bn):
                continue
            c = G.GemvConfig(bn, bk, 1, wp, st)
            tag = f"bn{bn}_bk{bk}_w{wp}_s{st}"
            fns[f"pallas_{tag}"] = jax.jit(lambda w, c=c: [G.gemv(x, w, l, transposed=True, cfg=c,
                                                                  interpret=args.interpret) for l in range(Lw)])
            fns[f"model_{tag}"] = jax.jit(lambda w, c=c: [
                G.gemv(x, w, l, transposed=True, cfg=c, norm=nw, eps=1e-5, residual=resid,
                       gated=epi.get("gated", False), interpret=args.interpret) for l in range(Lw)])
        fns["model_tuned"] = jax.jit(lambda w: [
            G.gemv(x, w, l, transposed=True, cfg=cfg_g, norm=nw, eps=1e-5, residual=resid,
                   gated=epi.get("gated", False), interpret=args.interpret) for l in range(Lw)])
        row = {"matrix": name, "kd": kd, "n": n, "Lw": Lw, "mat_bytes": mat_bytes, "us": {}}
        for k, f in fns.items():
            try:
                row["us"][k] = timed(f, (w,)) / Lw * 1e6
            except Exception as e:  # noqa: BLE001  (a tiling Triton cannot compile)
                row.setdefault("errors", {})[k] = f"{type(e).__name__}: {str(e)[:200]}"
        del w
        for k, t in torch_rates(n, kd, Lw).items():
            row["us"][k] = t * 1e6
        row["TBps"] = {k: mat_bytes / (u * 1e-6) / 1e12 for k, u in row["us"].items()}
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
    with open(os.path.join(args.out, "read_rate.json"), "w") as f:
        json.dump(res, f, indent=1)
    kinds = ["xla_rowsum", "xla_mulsum", "pallas_gemv", "model_tuned", "torch_mv"]
    print("\nbest whole-row tilings per matrix (us):")
    for r in res["rows"]:
        for pre in ("pallas_", "model_"):
            cand = {k: u for k, u in r["us"].items() if k.startswith(pre + "bn")}
            if cand:
                b = min(cand, key=cand.get)
                print(f"  {r['matrix']} {pre[:-1]}: {b} {cand[b]:.1f} us ({r['mat_bytes'] / cand[b] / 1e6:.2f} TB/s)")
    print(f"\n{res['device']}, jax {res['jax']}; copy bandwidth (read + written) {copy_GBps:.0f} GB/s "
          f"({cb['copy_variant']}; all: {', '.join(f'{k} {v / 1e9:.0f}' for k, v in cb['copy_variants_Bps'].items())})")
    print("| matrix | MB | " + " | ".join(f"{k} us (TB/s)" for k in kinds) + " |")
    print("|---|---|" + "---|" * len(kinds))
    for r in res["rows"]:
        print(f"| {r['matrix']} | {r['mat_bytes'] / 1e6:.1f} | " + " | ".join(
            f"{r['us'][k]:.1f} ({r['TBps'][k]:.2f})" if k in r["us"] else "-" for k in kinds) + " |")


if __name__ == "__main__":
    main()
