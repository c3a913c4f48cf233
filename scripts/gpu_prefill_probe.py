"""Prefill of short prompts on the GPU (issue 5, TTFT): the few-rows kernel `gemv.gemm` against XLA's
matmuls, per matrix and in the engine, LLaMA-2-7B shape, random bf16 weights.

  PYTHONPATH=. python3 scripts/gpu_prefill_probe.py --out $OUT [--phase check,tune,engine] [--tuned rows.json]

(The prefill's other projections through `gemm` lost their A/B and that path was deleted (issue 22): `check`
and `engine` now put the output projection alone through it, KernelOptions.prefill_wo.)
Phase `check`: model.forward of 16 and 100 tokens with the projections through `gemm` against XLA's, on the
device (f32 and bf16, a 2-layer model with the 7B's matrices): logits' relative error, argmax per row,
the cache rows written.
Phase `tune`: for each 7B matrix and T in ROWS (16 ... 256): Lw copies of [N, Kd] bf16 (the model's
output-major layout; the set exceeds the L2 cache), x [T, Kd]; XLA's product (x @ W.T, bf16 out, as the
model's einsum) against every candidate
tiling of `gemm` (checked first against a float32 product); time = Lw products back to back (wall clock
over 20 calls after warm-up: the calls queue on the device). Writes prefill_tune.json with the best tiling
per (Kd, N, T, True) (the table for gemv.TUNED_ROWS).
Phase `engine`: one Engine per mode (prefill through gemm / XLA's matmuls / gemm with the prefill compiled
without command buffers), same weights: TTFT p50 at 10 / 100 / 500 tokens as generate() measures it, the
prefill's device time (back-to-back prefills), the host time of the state reset and of the prefill call,
and the first tokens; plus the device time of the prefill's sampling (sort) against argmax.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import itertools
import json
import math
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gpu_gemv_tune import timed  # noqa: E402  (this folder: wall clock over calls queued on the device)
from gpu_prefill_host import back_to_back, reset_then_prefill  # noqa: E402  (this folder)
from hybrid_jax import gemv as G  # noqa: E402
from shapes import layer_matrices  # noqa: E402  (this folder)

ROWS = (16, 32, 64, 128, 256)


def candidates(kd, n, t):
    out = {G.rows_config(kd, n, t, transposed=True)}
    for bn, bk, s in itertools.product((16, 32, 64, 128), (32, 64, 128, 256), (1, 2, 4, 8)):
        if n % bn or kd % (bk * s) or not 4096 <= bn * bk * 2 <= 32768:
            continue
        if (n // bn) * s < 64 or 4 * s * t / kd > 0.25 or t * bn > 16384 or (t + bn) * bk * 2 * 3 > 160e3:
            continue
        out.add(G.GemvConfig(bn, bk, s, warps=8 if (t * bn >= 8192 or bn * bk * 2 >= 32768) else 4, stages=3))
    return [c for c in out if c is not None]


def _save(out_dir, results):
    with open(os.path.join(out_dir, "prefill_probe.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)


def tune(cfg, out_dir, results, rows=ROWS, set_bytes=512e6, matrices=None):
    table, tuned = [], {}
    for (name, kd, n), t in itertools.product([s for s in layer_matrices(cfg) if matrices is None or s[0] in matrices], rows):
        mat_bytes = kd * n * 2
        Lw = min(32, max(2, math.ceil(set_bytes / mat_bytes)))
        k1, k2 = jax.random.split(jax.random.PRNGKey(kd + n + t))
        w = jax.random.normal(k1, (Lw, n, kd), jnp.bfloat16)
        x = jax.random.normal(k2, (t, kd), jnp.bfloat16)
        ref = np.asarray(jnp.dot(x.astype(jnp.float32), w[Lw - 1].astype(jnp.float32).T,
                                 precision=jax.lax.Precision.HIGHEST))
        # one x per product: with a shared x XLA merges the dots into one fusion that can exceed shared memory
        xs = jnp.stack([x + jnp.asarray(l, x.dtype) for l in range(Lw)])
        t_xla = timed(jax.jit(lambda xs, w: [jnp.einsum("td,nd->tn", xs[l], w[l]) for l in range(Lw)]), (xs, w)) / Lw

        def make(c):
            try:
                fn = jax.jit(lambda x, w: [G.gemm(x, w, l, transposed=True, cfg=c) for l in range(Lw)])
                fn.lower(x, w).compile()
                return c, fn, None
            except Exception as e:  # noqa: BLE001  (a tiling Triton rejects)
                return c, None, f"{type(e).__name__}: {str(e)[:200]}"

        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(8) as pool:
            built = list(pool.map(make, candidates(kd, n, t)))
        compile_s = time.perf_counter() - t0
        cand = []
        for c, fn, err in built:
            if fn is None:
                cand.append({"cfg": c.__dict__, "error": err})
                continue
            got = np.asarray(fn(x, w)[Lw - 1])
            e = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
            s = timed(fn, (x, w)) / Lw
            cand.append({"cfg": c.__dict__, "rel_err": e, "s": s, "TBps": mat_bytes / s / 1e12})
        ok = sorted([r for r in cand if "s" in r and r["rel_err"] < 1e-3], key=lambda r: r["s"])
        default = G.rows_config(kd, n, t, transposed=True).__dict__
        d = next((r for r in cand if r["cfg"] == default and "s" in r), None)
        best = ok[0] if ok else None
        entry = {"name": name, "kd": kd, "n": n, "T": t, "Lw": Lw, "xla_s": t_xla, "xla_TBps": mat_bytes / t_xla / 1e12,
                 "default": d, "best": best, "compile_s": compile_s, "n_candidates": len(cand),
                 "n_errors": sum("error" in r for r in cand), "rows": cand}
        results["tune"].append(entry)
        if best:
            tuned[(kd, n, t, True)] = G.GemvConfig(**best["cfg"])
        f = lambda r: f"{r['s']*1e6:.1f} ({r['TBps']:.2f})" if r else "-"
        table.append(f"| {name} | {kd}x{n} | {t} | {t_xla*1e6:.1f} ({entry['xla_TBps']:.2f}) | {f(d)} | {f(best)} | "
                     f"{best['cfg'] if best else entry['n_errors']} |")
        print(table[-1], flush=True)
        results["tuned_rows"] = {",".join(map(str, k)): v.__dict__ for k, v in tuned.items()}
        _save(out_dir, results)
        del w
    results["tune_table_md"] = ["| matrix | shape | T | XLA us (TB/s) | gemm default us (TB/s) | gemm best | best tiling |",
                                "|---|---|---|---|---|---|---|"] + table
    _save(out_dir, results)
    return tuned


def check(results):
    from hybrid_jax import kv_cache, model, weights
    from hybrid_jax.config import LlamaConfig
    out = []
    for dt, name in (("float32", "gqa"), ("bfloat16", "gqa"), ("bfloat16", "7b-2layers")):
        if name == "gqa":
            cfg = LlamaConfig(vocab_size=4096, dim=1024, n_layers=3, n_heads=16, n_kv_heads=4, ffn_dim=2816, dtype=dt)
        else:
            cfg = LlamaConfig(vocab_size=32000, dim=4096, n_layers=2, n_heads=32, n_kv_heads=32, ffn_dim=11008, dtype=dt)
        p = weights.init_random(cfg, jax.random.PRNGKey(1))
        for T in (16, 100):
            toks = jnp.arange(5, 5 + T, dtype=jnp.int32) % cfg.vocab_size
            from hybrid_jax.options import KernelOptions
            wo = KernelOptions.xla(matmul_2d=False).replace(prefill_wo="pallas")
            f = {m: jax.jit(lambda p, c, m=m: model.forward(cfg, p, c, toks, jnp.arange(T, dtype=jnp.int32),
                                                            opts=wo if m else None))
                 for m in (None, "pallas")}
            (a, ca), (b, cb) = f[None](p, kv_cache.zeros(cfg, 128)), f["pallas"](p, kv_cache.zeros(cfg, 128))
            a, b = np.asarray(a), np.asarray(b)
            ka, kb = np.asarray(ca.k, np.float32), np.asarray(cb.k, np.float32)
            srt = np.sort(a, axis=-1)
            out.append({"model": name, "dtype": dt, "T": T, "rel_err": float(np.linalg.norm(a - b) / np.linalg.norm(a)),
                        "argmax_equal_rows": int((a.argmax(-1) == b.argmax(-1)).sum()),
                        "min_top2_margin": float((srt[:, -1] - srt[:, -2]).min()),
                        "k_rel_err": float(np.linalg.norm(ka - kb) / np.linalg.norm(ka))})
            print(out[-1], flush=True)
    results["check"] = out


def engine_phase(cfg, out_dir, results, modes, reps=12):
    from hybrid_jax import runtime as R
    from hybrid_jax import sampling, weights
    from hybrid_jax.engine import Engine, generate
    from hybrid_jax.options import KernelOptions
    params = weights.init_random(cfg, jax.random.PRNGKey(0))
    jax.block_until_ready(params)
    rng = np.random.RandomState(0)
    prompts = {n: [int(t) for t in rng.randint(3, cfg.vocab_size, size=n)] for n in (10, 100, 500)}
    cache_dir = tempfile.mkdtemp()  # the decode steps are shared between modes (their key omits the prefill's)
    build = R.Runtime._build
    for mode in modes:
        if mode == "gemm_nocb":  # the prefill executables without command buffers (kernels launched one by one)
            def nocb_build(self, spec, _b=build):
                if spec[0] != "prefill":
                    return _b(self, spec)
                return self._lower(spec).compile(compiler_options={"xla_gpu_enable_command_buffer": ""})
            R.Runtime._build = nocb_build
        else:
            R.Runtime._build = build
        r = {"mode": mode}
        try:
            t0 = time.perf_counter()
            eng = Engine(cfg, params, max_seq_len=1024, cache_dir=cache_dir, compile_sampling=False,
                         prefill_buckets=(16, 32, 64, 128, 256, 512, 1024),
                         options=KernelOptions(prefill_wo="xla" if mode == "xla" else "pallas"))
            for b in (16, 128, 512):
                eng.runtime._get_async(("prefill", b, b))
            eng.wait_background()
            r["build_s"] = time.perf_counter() - t0
            r["prefill_wo"] = eng.runtime.options.prefill_wo
            rt = eng.runtime
            for n, ids in prompts.items():
                for _ in range(3):
                    generate(eng, ids, max_new_tokens=4, ignore_eos=True)
                ttft = [generate(eng, ids, max_new_tokens=8, ignore_eos=True).timings.ttft_s for _ in range(reps)]
                packed = []
                host = [reset_then_prefill(rt, ids) for _ in range(reps)]  # a separate reset (sessions 1-3)
                for _ in range(reps):  # the request packed into the prefill's one argument (generate's path)
                    a = time.perf_counter()
                    st, tok = rt.prefill(rt.state, ids, request=(0, 0.0, None, None))
                    c = time.perf_counter()
                    int(np.asarray(tok))
                    rt.state = st
                    packed.append((c - a, time.perf_counter() - a))
                b2b = back_to_back(rt, ids, 10)  # the device's time per prefill (host work overlaps)
                r[str(n)] = {"ttft_p50_ms": float(np.median(ttft) * 1e3), "ttft_p99_ms": float(np.percentile(ttft, 99) * 1e3),
                             "host_reset_ms": float(np.median([h[0] for h in host]) * 1e3),
                             "host_prefill_call_ms": float(np.median([h[1] for h in host]) * 1e3),
                             "prefill_and_read_ms": float(np.median([h[2] for h in host]) * 1e3),
                             "host_packed_call_ms": float(np.median([h[0] for h in packed]) * 1e3),
                             "packed_prefill_and_read_ms": float(np.median([h[1] for h in packed]) * 1e3),
                             "prefill_back_to_back_ms": b2b * 1e3,
                             "tokens": generate(eng, ids, max_new_tokens=8, ignore_eos=True).token_ids}
                print(mode, n, {k_: v for k_, v in r[str(n)].items() if k_ != "tokens"}, flush=True)
            eng.close()
            del eng
        except Exception as e:  # noqa: BLE001
            r["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            print(mode, "failed:", r["error"], flush=True)
        results["engine"].append(r)
        _save(out_dir, results)
    R.Runtime._build = build
    # the prefill's sampling (a full sort of the vocabulary) against argmax, device time per call
    lg = jax.random.normal(jax.random.PRNGKey(3), (cfg.vocab_size,), jnp.float32)
    sp = sampling.make_params(0.0)
    key = jax.random.PRNGKey(0)
    f_s = jax.jit(lambda l, k: [sampling.sample(l + i, k, sp) for i in range(50)])
    f_g = jax.jit(lambda l: [sampling.greedy(l + i) for i in range(50)])
    results["sample_vs_greedy_us"] = {"sample": timed(f_s, (lg, key)) / 50 * 1e6, "greedy": timed(f_g, (lg,)) / 50 * 1e6}
    print("sampling", results["sample_vs_greedy_us"], flush=True)
    _save(out_dir, results)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--phase", default="check,tune,engine")
    ap.add_argument("--rows", default=",".join(map(str, ROWS)))
    ap.add_argument("--matrices", default="wqkv,wo,w13,w2", help="tune phase: which of the layer matrices")
    ap.add_argument("--tuned", help="prefill_probe.json of an earlier run: use its tuned_rows")
    ap.add_argument("--modes", default="gemm,xla,gemm_nocb")
    args = ap.parse_args()
    from shapes import shape_config  # scripts/ is this script's folder
    cfg = shape_config(args.shape)
    if jax.default_backend() == "cpu":  # a dry run: kernels in the interpreter
        from hybrid_jax import decode_attention as A
        og, oa, om = G.gemv, A.attend, G.gemm
        G.gemv = lambda *a, **k: og(*a, **{**k, "interpret": True})
        G.gemm = lambda *a, **k: om(*a, **{**k, "interpret": True})
        A.attend = lambda *a, **k: oa(*a, **{**k, "interpret": True})
    os.makedirs(args.out, exist_ok=True)
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "shape": args.shape,
               "xla_flags": os.environ.get("XLA_FLAGS", ""), "tune": [], "engine": []}
    phases = args.phase.split(",")
    if args.tuned:
        with open(args.tuned) as f:
            G.TUNED_ROWS.update({tuple(int(v) for v in k.split(",")[:3]) + (True,): G.GemvConfig(**c)
                                 for k, c in json.load(f)["tuned_rows"].items()})
    if "check" in phases:
        check(results)
        _save(args.out, results)
    if "tune" in phases:
        G.TUNED_ROWS.update(tune(cfg, args.out, results, rows=tuple(int(r) for r in args.rows.split(",")),
                                 set_bytes=512e6 if jax.default_backend() != "cpu" else 1e6,
                                 matrices=tuple(args.matrices.split(","))))
    if "engine" in phases:
        engine_phase(cfg, args.out, results, args.modes.split(","))
    print("\n".join(results.get("tune_table_md", [])))
    for r in results["engine"]:
        if "error" in r:
            print(f"| {r['mode']} | error {r['error'][:200]} |")
            continue
        print(f"| {r['mode']} | " + " | ".join(
            f"{n}: TTFT {r[n]['ttft_p50_ms']:.2f} (p99 {r[n]['ttft_p99_ms']:.2f}) dev {r[n]['prefill_back_to_back_ms']:.2f} "
            f"host {r[n]['host_reset_ms']:.2f}+{r[n]['host_prefill_call_ms']:.2f} (read {r[n]['prefill_and_read_ms']:.2f}) "
            f"packed {r[n]['host_packed_call_ms']:.2f} (read {r[n]['packed_prefill_and_read_ms']:.2f})"
            for n in ("10", "100", "500")) + " |")
    if results["engine"] and all("error" not in r for r in results["engine"]):
        e = results["engine"]
        print("first tokens equal to", e[0]["mode"], {r["mode"]: {n: r[n]["tokens"] == e[0][n]["tokens"] for n in ("10", "100", "500")}
                                                    for r in e[1:]})


if __name__ == "__main__":
    main()
