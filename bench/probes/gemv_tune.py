"""Decode GEMV on the GPU (issue 5): tune the Pallas kernels of hybrid_jax/gemv.py per weight shape against
XLA's fusion and PyTorch's cuBLAS product, check them, then time the decode step of the LLaMA-2-7B shape
with the tuned kernels against XLA's fusions, same process, same weights.

  python3 -m bench.probes.gemv_tune --out $OUT [--shape llama2-7b] [--phase check,tune,engine,ab,rows]
  JAX_PLATFORMS=cpu python3 -m bench.probes.gemv_tune --shape tiny --phase check,tune --out /tmp/gt

Phase `tune`: for each matrix shape of the model, Lw copies of bf16 random weights (the layer matrices
output-major [Lw, N, Kd], the untied LM head [Lw, Kd, N]; Lw so that the set exceeds the L2 cache), x
random; time Lw products back to back (jit, wall clock over 30 calls after warm-up; the calls queue on the
device, so the time is the device's), each layer matrix as the model runs it (EPILOGUES: its RMSNorm in
the prologue, its consumer in the epilogue); bandwidth = bytes / time. Every candidate tiling is checked
against a float32 HIGHEST-precision product first (its consumer computed from it). Writes gemv_tune.json with the best
tiling per shape (the table for gemv.TUNED).
Phase `ab`: the decode step with gemv.TUNED as in the code against `--ab-base`'s tilings over it, two
engines, one process, alternated.
Phase `engine`: Engine(gemv="pallas") with the tuned table, then Engine(gemv="xla"), same random weights:
decode step time (pipelined, no host reads), streaming TPOT p50/p99, TTFT at 10 tokens, the first 32
greedy tokens of each (they may part where two logits nearly tie in bf16), and the decode executable's
HLO: how many command buffers and kernels outside them.
Phase `rows`: the few-rows kernel `gemv.gemm` (the prefill's output projection, KernelOptions.prefill_wo) per
layer matrix (--row-matrices, default wo) and row count T (--rows): XLA's product against every candidate
tiling (checked first against a float32 product), Lw copies back to back. Writes the best tiling per
(Kd, N, T) into gemv_tune.json's tuned_rows (the table for gemv.TUNED_ROWS).
On the CPU (`--shape tiny`) every phase is a dry run with the kernels in the interpreter.
"""
from __future__ import annotations

import concurrent.futures as cf
import functools
import itertools
import json
import math
import os
import tempfile
import time

import numpy as np

import jax
import jax.numpy as jnp

from bench.probes.harness import hlo_counts, interpret_kernels_on_cpu, layer_matrices, parse, parser, random_params, \
    run_record, shape_config, timed, torch_seconds
from hybrid_jax import gemv as G
from hybrid_jax.model import rms_norm
from hybrid_jax.options import KernelOptions, resolve


def model_shapes(cfg):
    """(name, kd, n, transposed) of every matrix the decode step multiplies by: the layer matrices are
    stored output-major ([N, Kd], weights.py), the untied LM head input-major."""
    return ([(name, kd, n, True) for name, kd, n in layer_matrices(cfg)]
            + [("lm_head", cfg.dim, cfg.vocab_size, cfg.tie_embeddings)])


# Each layer matrix's product as the model runs it (model.attention_block, mlp_block): the RMSNorm before
# it in the kernel's prologue (`norm`) and its consumer in the epilogue (`gated`, `residual`).
EPILOGUES = {"wqkv": {"norm": True}, "w13": {"norm": True, "gated": True}, "wo": {"residual": True},
             "w2": {"residual": True}}


def unsplit_candidates(kd, n):
    """Tilings of a transposed matrix [N, Kd] whose programs each walk a whole row block (splits = 1)."""
    out = []
    # up to whole rows of 4096 per load: the access of XLA's row reduction, which read these matrices at
    # 4.0-4.36 TB/s against 3.1-3.7 for the tilings of run 40 (runs 67-68)
    for bn, bk in itertools.product((1, 2, 4, 8, 16, 32), (128, 256, 512, 1024, 2048, 4096)):
        if kd % bk or n % bn or not 1024 <= bn * bk <= 16384 or n // bn < 128 or (bn == 1 and bk <= 512):
            continue
        out.append(G.GemvConfig(bn, bk, 1, warps=4 if bn * bk <= 4096 else 8, stages=3 if bk < kd else 1))
    for bk in (128, 256, 512):  # one output row per program (the gated kernel reads two rows per output)
        if kd % bk == 0 and n >= 256:
            out.append(G.GemvConfig(1, bk, 1, warps=4, stages=3))
    return out


def candidates(kd, n, transposed):
    out = []
    for bn, bk in itertools.product((16, 32, 64, 128, 256), (16, 32, 64, 128, 256)):
        if not (2048 <= bn * bk <= 16384) or n % bn:
            continue
        if (bn if not transposed else bk) < 32:  # the contiguous side of a tile: at least 64 bytes
            continue
        chunks = kd // bk
        if kd % bk:
            continue
        for s in range(1, min(chunks, 128) + 1):
            if chunks % s:
                continue
            progs = (n // bn) * s
            if 100 <= progs <= 4096 or (s == 1 and progs >= 100):
                out.append(G.GemvConfig(bn, bk, s, warps=4 if bn * bk <= 8192 else 8, stages=3))
    return out


def tune(cfg, out_dir, results, set_bytes=512e6, matrices=None):
    tuned = {}
    table = []
    for name, kd, n, tr in model_shapes(cfg):
        if matrices is not None and name not in matrices:
            continue
        mat_bytes = kd * n * 2
        Lw = min(64, max(2, math.ceil(set_bytes / mat_bytes)))
        shape = (Lw, n, kd) if tr else (Lw, kd, n)
        k1, k2 = jax.random.split(jax.random.PRNGKey(kd + n))
        w = jax.random.normal(k1, shape, jnp.bfloat16)
        x = jax.random.normal(k2, (kd,), jnp.bfloat16)
        # each layer matrix is timed as the model runs it: with its norm and its consumer (run 44 found the
        # gate/up kernel 5 us slower in the step than the plain kernel's tuning predicted)
        epi = EPILOGUES.get(name, {}) if tr else {}
        res = jnp.zeros((n,), jnp.bfloat16) if epi.get("residual") else None
        nw = (1 + 0.1 * jax.random.normal(jax.random.PRNGKey(n), (Lw, kd))).astype(jnp.bfloat16) \
            if epi.get("norm") else None
        xs = [x if nw is None else rms_norm(x, nw[l], cfg.norm_eps) for l in range(Lw)]
        ref = jnp.stack([jnp.dot(xs[l].astype(jnp.float32), (w[l].T if tr else w[l]).astype(jnp.float32),
                                 precision=jax.lax.Precision.HIGHEST) for l in range(Lw)])
        tol = 1e-4 if nw is None else 2e-3  # the norm's float32 mean may round x's bf16 scaling differently
        if epi.get("gated") or epi.get("residual"):  # the reference's consumer, rounded as the kernels round it
            y = jnp.asarray(ref)
            ref = G.finish(y[:, : n // 2], jnp.bfloat16, up=y[:, n // 2:]) if epi.get("gated") else \
                G.finish(y, jnp.bfloat16, residual=jnp.zeros_like(y))
            tol = 2e-2  # a bf16 result: a sum's rounding may differ by one unit
        ref = np.asarray(ref, np.float32)

        def xla_fn(x, w):
            return [jnp.dot(x[None], (w[l].T if tr else w[l]))[0] for l in range(Lw)]

        # output-major: whole rows per program (no split: the consumer runs in the epilogue) and split ones
        cands = (unsplit_candidates(kd, n) if tr else []) + candidates(kd, n, tr)

        def make(c):
            fn = jax.jit(lambda x, w: [G.gemv(x, w, l, transposed=tr, cfg=c, residual=res, norm=nw, eps=cfg.norm_eps,
                                              gated=epi.get("gated", False)) for l in range(Lw)])
            return fn, fn.lower(x, w).compile()

        rows, compile_s = [], []

        def measure(configs):
            """Compile `configs` concurrently, then check and time each; rows of the fastest correct first."""
            t0 = time.perf_counter()
            with cf.ThreadPoolExecutor(8) as pool:
                compiled = list(pool.map(lambda c: (c, *_try(make, c)), configs))
            compile_s.append(time.perf_counter() - t0)
            for c, fn, err in compiled:
                if fn is None:
                    rows.append({"cfg": c.__dict__, "error": err[:300]})
                    continue
                got = np.stack([np.asarray(a, np.float32) for a in fn(x, w)])
                e = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
                t = timed(fn, (x, w)) / Lw
                rows.append({"cfg": c.__dict__, "rel_err": e, "s": t, "TBps": mat_bytes / t / 1e12})
            return sorted([r for r in rows if "s" in r and r["rel_err"] < tol], key=lambda r: r["s"])

        t_xla = timed(jax.jit(xla_fn), (x, w)) / Lw
        ok = measure(cands)
        t_compile = compile_s[0]  # the first sweep's compiles
        # refine the best three: warps and pipelining depth
        refine = []
        for r in ok[:3]:
            for wp, st in itertools.product((2, 4, 8), (2, 3, 4, 5)):
                c = G.GemvConfig(r["cfg"]["bn"], r["cfg"]["bk"], r["cfg"]["splits"], wp, st)
                if c.__dict__ != r["cfg"]:
                    refine.append(c)
        ok = measure(refine)
        torch_s = _torch_gemv(kd, n, tr, Lw)
        best = ok[0] if ok else None
        entry = {"name": name, "kd": kd, "n": n, "transposed": tr, "Lw": Lw, "mat_bytes": mat_bytes,
                 "xla_s": t_xla, "xla_TBps": mat_bytes / t_xla / 1e12, "torch_s": torch_s,
                 "torch_TBps": mat_bytes / torch_s / 1e12 if torch_s else None,
                 "best": best, "n_candidates": len(rows), "n_errors": sum("error" in r for r in rows),
                 "compile_s": t_compile, "rows": rows}
        results["tune"].append(entry)
        if best:
            tuned[(kd, n, tr)] = G.GemvConfig(**best["cfg"])
        table.append(f"| {name} | {kd}x{n}{'T' if tr else ''} | {t_xla*1e6:.1f} ({entry['xla_TBps']:.2f}) | "
                     f"{(best['s']*1e6) if best else float('nan'):.1f} ({best['TBps'] if best else float('nan'):.2f}) | "
                     f"{(torch_s or float('nan'))*1e6:.1f} ({entry['torch_TBps'] or float('nan'):.2f}) | "
                     f"{best['cfg'] if best else entry['n_errors']} |")
        print(table[-1], flush=True)
        _save(out_dir, results)
        del w, ref
    results["tuned_table"] = {f"{k[0]},{k[1]},{k[2]}": v.__dict__ for k, v in tuned.items()}
    results["tune_table_md"] = ["| matrix | shape | XLA us (TB/s) | Pallas us (TB/s) | torch us (TB/s) | best |",
                                "|---|---|---|---|---|---|"] + table
    _save(out_dir, results)
    return tuned


def load_tuned(path: str) -> dict:
    """The tuned table of an earlier run's gemv_tune.json: {(kd, n, transposed): GemvConfig} for gemv.TUNED."""
    with open(path) as f:
        table = json.load(f)["tuned_table"]
    out = {}
    for k, v in table.items():
        kd, n, tr = k.split(",")
        out[(int(kd), int(n), tr == "True")] = G.GemvConfig(**v)
    return out


def _try(make, c):
    try:
        fn, _ = make(c)
        return fn, None
    except Exception as e:  # a tiling Triton rejects
        return None, f"{type(e).__name__}: {e}"


def _torch_gemv(kd, n, tr, Lw):
    try:
        import torch
        if not torch.cuda.is_available():
            return None
        ws = [torch.randn((n, kd) if tr else (kd, n), dtype=torch.bfloat16, device="cuda") for _ in range(Lw)]
        x = torch.randn(1, kd, dtype=torch.bfloat16, device="cuda")

        def run():
            for w in ws:
                (x @ (w.t() if tr else w))
        t = torch_seconds(run, 20) / Lw
        del ws
        torch.cuda.empty_cache()
        return t
    except Exception as e:  # noqa: BLE001
        print("torch gemv failed:", e, flush=True)
        return None


def hlo_summary(runtime):
    ex = runtime.executable(runtime.decode_spec(1, False))
    txt = ex.as_text() or ""
    cache = "[" + ",".join(map(str, runtime.state.cache.k.shape)) + "]"
    # a copy of the stacked cache per step would double the attention's bytes (the kernel writes in place)
    cache_copies = sum(1 for ln in txt.splitlines() if cache in ln.split("=", 1)[-1][:80] and
                       (" copy(" in ln or "copy-start(" in ln))
    # copies of a weight's layer slice, as XLA makes for cuBLAS (run 32): each adds the weight's bytes again
    counts = hlo_counts(txt)
    return {"command_buffer_calls": txt.count("command_buffer"), "triton_custom_calls": txt.count("__gpu$xla.gpu.triton"),
            "custom_calls": txt.count("custom-call("), "fusions": txt.count(" fusion("), "cache_copies": cache_copies,
            "weight_slice_copies": counts["slice_copies"], "cublas_calls": counts["cublas_calls"],
            "hlo_chars": len(txt)}


MODES = {"pallas": ("pallas", "pallas", "pallas"), "pallas_gemv": ("pallas_gemv", "pallas", "xla"),
         "xla": ("xla", "xla", "xla")}
# pallas_pN: the attention kernel's rows split for about N programs at a full cache (default 256)
MODES.update({f"pallas_p{n}": (f"pallas_p{n}", "pallas", "pallas") for n in (128, 512, 1024, 2048)})


def engine_phase(cfg, tuned, out_dir, results, new_tokens=128, reps=5, modes=tuple(MODES.values())):
    from hybrid_jax.engine import Engine, generate
    params = random_params(cfg)
    G.TUNED.update(tuned)
    rng = np.random.RandomState(0)
    prompt = [int(t) for t in rng.randint(3, cfg.vocab_size, size=10)]
    from hybrid_jax import decode_attention as A
    partition_rows = A.partition_rows
    for mode, gemv, attn in modes:
        n = mode[len("pallas_p"):] if mode.startswith("pallas_p") else ""
        A.partition_rows = (functools.partial(partition_rows, target_programs=int(n)) if n.isdigit()
                            else partition_rows)
        t0 = time.perf_counter()
        eng = Engine(cfg, params, max_seq_len=1024, cache_dir=tempfile.mkdtemp(), prefill_buckets=(16, 128, 512, 1024),
                     compile_sampling=False, kv_reuse=False, options=KernelOptions(gemv=gemv, decode_attention=attn))
        build = time.perf_counter() - t0
        r = {"mode": mode, "gemv": eng.runtime.options.gemv, "attn": eng.runtime.options.decode_attention,
             "build_s": build,
             "attn_rows": A.partition_rows(eng.runtime.cache_len, cfg.n_kv_heads, A.block_rows(eng.runtime.cache_len))}
        try:
            r["hlo"] = hlo_summary(eng.runtime)
        except Exception as e:  # noqa: BLE001
            r["hlo"] = {"error": str(e)[:300]}
        for _ in range(3):
            generate(eng, prompt, max_new_tokens=16, ignore_eos=True)
        eng.wait_background()
        r["tokens"] = generate(eng, prompt, max_new_tokens=32, ignore_eos=True).token_ids
        r["step_s"] = [eng.pipelined_step_seconds(200) for _ in range(3)]
        long_prompt = [int(t) for t in rng.randint(3, cfg.vocab_size, size=700)]
        generate(eng, long_prompt, max_new_tokens=4, ignore_eos=True)
        eng.wait_background()
        itl = generate(eng, long_prompt, max_new_tokens=128, ignore_eos=True).timings.itl_s
        r["tpot_at_700_p50_ms"] = float(np.percentile(itl, 50) * 1e3)
        ttft, itl = [], []
        for _ in range(reps):
            g = generate(eng, prompt, max_new_tokens=new_tokens, ignore_eos=True)
            ttft.append(g.timings.ttft_s)
            itl += g.timings.itl_s
        r["ttft_p50_ms"] = float(np.percentile(ttft, 50) * 1e3)
        r["tpot_p50_ms"] = float(np.percentile(itl, 50) * 1e3)
        r["tpot_p99_ms"] = float(np.percentile(itl, 99) * 1e3)
        r["step_ms"] = float(min(r["step_s"]) * 1e3)
        results["engine"].append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "tokens"}), flush=True)
        _save(out_dir, results)
        eng.close()
        del eng
    e = results["engine"]
    results["greedy_tokens_agree_prefix"] = {
        r["mode"]: next((i for i, (a, b) in enumerate(zip(e[0]["tokens"], r["tokens"])) if a != b), len(r["tokens"]))
        for r in e[1:]}
    _save(out_dir, results)


def ab_phase(cfg, base_path, out_dir, results, rounds=5, steps=200):
    """The decode step with gemv.TUNED as in the code (A) against the tilings of `base_path`'s tuned table
    laid over it (B): two engines on the same weights, one process, pipelined steps alternated."""
    from hybrid_jax.engine import Engine
    params = random_params(cfg)
    code = dict(G.TUNED)
    engines = {}
    for name, table in (("code", code), ("base", {**code, **load_tuned(base_path)})):
        G.TUNED.clear()
        G.TUNED.update(table)
        e = engines[name] = Engine(cfg, params, max_seq_len=1024, cache_dir=tempfile.mkdtemp(), prefill_buckets=(16,),
                                   compile_sampling=False, kv_reuse=False)
        # the first prefill queues its bucket's compile in the background: XLA's autotuning on the device and
        # the tracing's host time slow the steps beside it (runs 44 and 46), so wait for it before timing
        e.pipelined_step_seconds(10)
        e.wait_background()
    G.TUNED.clear()
    G.TUNED.update(code)
    times = {n: [] for n in engines}
    for _ in range(rounds):
        for n, e in engines.items():
            times[n].append(e.pipelined_step_seconds(steps))
    results["ab"] = {"base": base_path, "code_table": {str(k): v.__dict__ for k, v in code.items()},
                     "step_ms": {n: [t * 1e3 for t in v] for n, v in times.items()}}
    _save(out_dir, results)
    for n, v in times.items():
        print(f"ab {n}: step min {min(v) * 1e3:.3f} ms, median {np.median(v) * 1e3:.3f} ms", flush=True)
    for e in engines.values():
        e.close()


def small_check(results):
    """Model-level check on the device: decode logits with the kernels equal XLA's (f32 and bf16)."""
    from hybrid_jax import kv_cache, model, weights
    from hybrid_jax.config import LlamaConfig
    out = []
    for dt, tied, name in (("float32", False, "gqa"), ("bfloat16", True, "gqa"), ("bfloat16", False, "7b-2layers")):
        if name == "gqa":
            cfg = LlamaConfig(vocab_size=4096, dim=1024, n_layers=3, n_heads=16, n_kv_heads=4, ffn_dim=2816,
                              dtype=dt, tie_embeddings=tied)
        else:  # the 7B's heads and matrices (G = 1, Dh = 128, the tuned tilings), two layers
            cfg = LlamaConfig(vocab_size=32000, dim=4096, n_layers=2, n_heads=32, n_kv_heads=32, ffn_dim=11008,
                              dtype=dt, tie_embeddings=tied)
        p = weights.init_random(cfg, jax.random.PRNGKey(1))
        for T in (8, 700):
            cache = kv_cache.zeros(cfg, 1040)
            toks = jnp.arange(5, 5 + T, dtype=jnp.int32) % cfg.vocab_size
            _, cache = jax.jit(lambda p, c: model.forward(cfg, p, c, toks, jnp.arange(T, dtype=jnp.int32)))(p, cache)
            kern = {None: None, "pallas": resolve(KernelOptions(gemv="pallas"), cfg, jax.devices()[:1], None)}
            f = {m: jax.jit(lambda p, c, m=m: model.forward(cfg, p, c, jnp.asarray([7], jnp.int32),
                                                            jnp.asarray([T], jnp.int32), opts=kern[m]))
                 for m in (None, "pallas")}
            (a, ca), (b, cb) = f[None](p, cache), f["pallas"](p, cache)
            a, b = np.asarray(a), np.asarray(b)
            ka, kb = np.asarray(ca.k, np.float32), np.asarray(cb.k, np.float32)
            va, vb = np.asarray(ca.v, np.float32), np.asarray(cb.v, np.float32)
            top2 = np.sort(a.ravel())[-2:]
            out.append({"model": name, "dtype": dt, "tied": tied, "pos": T, "top2_margin": float(top2[1] - top2[0]), "rel_err": float(np.linalg.norm(a - b) / np.linalg.norm(a)),
                        "argmax_equal": bool(a.argmax() == b.argmax()),
                        # the row the kernel wrote in place, against XLA's dynamic-update-slice
                        "k_row_rel_err": float(np.linalg.norm(ka[:, T] - kb[:, T]) / np.linalg.norm(ka[:, T])),
                        "v_row_rel_err": float(np.linalg.norm(va[:, T] - vb[:, T]) / np.linalg.norm(va[:, T])),
                        "other_rows_equal": bool(np.array_equal(np.delete(ka, T, axis=1), np.delete(kb, T, axis=1)))})
    results["small_check"] = out
    print("small check", out, flush=True)


# ---- phase rows: the few-rows kernel `gemm` (the prefill's output projection) -------------------------

ROWS = (16, 32, 64, 128)


def rows_candidates(kd, n, t):
    out = {G.rows_config(kd, n, t, transposed=True)}
    for bn, bk, s in itertools.product((16, 32, 64, 128), (32, 64, 128, 256), (1, 2, 4, 8)):
        if n % bn or kd % (bk * s) or not 4096 <= bn * bk * 2 <= 32768:
            continue
        if (n // bn) * s < 64 or 4 * s * t / kd > 0.25 or t * bn > 16384 or (t + bn) * bk * 2 * 3 > 160e3:
            continue
        out.add(G.GemvConfig(bn, bk, s, warps=8 if (t * bn >= 8192 or bn * bk * 2 >= 32768) else 4, stages=3))
    return [c for c in out if c is not None]


def tune_rows(cfg, out_dir, results, rows=ROWS, set_bytes=512e6, matrices=("wo",)):
    """Per layer matrix and T rows: XLA's product (x @ W.T, bf16 out, as the model's einsum) against every
    candidate tiling of `gemm`; the best per (Kd, N, T, True) -> results["tuned_rows"] (gemv.TUNED_ROWS)."""
    table, tuned = [], {}
    results.setdefault("tune_rows", [])
    for (name, kd, n), t in itertools.product([s for s in layer_matrices(cfg) if s[0] in matrices], rows):
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
            built = list(pool.map(make, rows_candidates(kd, n, t)))
        compile_s = time.perf_counter() - t0
        cand = []
        for c, fn, err in built:
            if fn is None:
                cand.append({"cfg": c.__dict__, "error": err})
                continue
            got = np.asarray(fn(x, w)[Lw - 1])
            e = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
            sec = timed(fn, (x, w)) / Lw
            cand.append({"cfg": c.__dict__, "rel_err": e, "s": sec, "TBps": mat_bytes / sec / 1e12})
        ok = sorted([r for r in cand if "s" in r and r["rel_err"] < 1e-3], key=lambda r: r["s"])
        default = G.rows_config(kd, n, t, transposed=True).__dict__
        d = next((r for r in cand if r["cfg"] == default and "s" in r), None)
        best = ok[0] if ok else None
        entry = {"name": name, "kd": kd, "n": n, "T": t, "Lw": Lw, "xla_s": t_xla, "xla_TBps": mat_bytes / t_xla / 1e12,
                 "default": d, "best": best, "compile_s": compile_s, "n_candidates": len(cand),
                 "n_errors": sum("error" in r for r in cand), "rows": cand}
        results["tune_rows"].append(entry)
        if best:
            tuned[(kd, n, t, True)] = G.GemvConfig(**best["cfg"])
        f = lambda r: f"{r['s']*1e6:.1f} ({r['TBps']:.2f})" if r else "-"  # noqa: E731
        table.append(f"| {name} | {kd}x{n} | {t} | {t_xla*1e6:.1f} ({entry['xla_TBps']:.2f}) | {f(d)} | {f(best)} | "
                     f"{best['cfg'] if best else entry['n_errors']} |")
        print(table[-1], flush=True)
        results["tuned_rows"] = {",".join(map(str, k)): v.__dict__ for k, v in tuned.items()}
        _save(out_dir, results)
        del w
    results["tune_rows_table_md"] = ["| matrix | shape | T | XLA us (TB/s) | gemm default us (TB/s) | gemm best | best tiling |",
                                     "|---|---|---|---|---|---|---|"] + table
    _save(out_dir, results)
    return tuned


def _save(out_dir, results):
    with open(os.path.join(out_dir, "gemv_tune.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)


def main():
    ap = parser(__doc__)
    ap.add_argument("--phase", default="check,tune,engine", help="any of check, tune, ab, engine, rows")
    ap.add_argument("--tuned", help="gemv_tune.json of an earlier run: skip tuning")
    ap.add_argument("--modes", default="pallas,pallas_gemv,xla", help=f"engine phase: any of {','.join(MODES)}")
    ap.add_argument("--ab-base", help="phase ab: a gemv_tune.json whose tuned table is B against the code's A")
    ap.add_argument("--matrices", help="tune phase: only these (of wqkv, wo, w13, w2, lm_head)")
    ap.add_argument("--rows", default=",".join(map(str, ROWS)), help="rows phase: the row counts T")
    ap.add_argument("--row-matrices", default="wo", help="rows phase: which layer matrices")
    args = parse(ap)
    cfg = shape_config(args.shape)
    cpu = interpret_kernels_on_cpu()  # a dry run of the probe: the kernels in the interpreter
    phases = args.phase.split(",")
    results = {**run_record(), "shape": args.shape, "tune": [], "engine": []}
    if "check" in phases:
        small_check(results)
        _save(args.out, results)
    tuned = load_tuned(args.tuned) if args.tuned else {}
    if "tune" in phases:
        tuned = tune(cfg, args.out, results, 1e6 if cpu else 512e6,
                     matrices=args.matrices.split(",") if args.matrices else None)
    if "ab" in phases:
        ab_phase(cfg, args.ab_base, args.out, results)
    if "engine" in phases:
        engine_phase(cfg, tuned, args.out, results, modes=[MODES[m] for m in args.modes.split(",")])
    if "rows" in phases:
        tune_rows(cfg, args.out, results, rows=tuple(int(r) for r in args.rows.split(",")),
                  set_bytes=1e6 if cpu else 512e6, matrices=tuple(args.row_matrices.split(",")))
        print("\n".join(results["tune_rows_table_md"]))
    print("\n".join(results.get("tune_table_md", [])))
    for r in results["engine"]:
        print(f"| {r['mode']} rows {r.get('attn_rows')} | step {r['step_ms']:.3f} ms | TPOT p50 {r['tpot_p50_ms']:.3f} p99 {r['tpot_p99_ms']:.3f} | "
              f"TPOT at 700 {r['tpot_at_700_p50_ms']:.3f} | "
              f"TTFT(10) {r['ttft_p50_ms']:.2f} | build {r['build_s']:.0f} s | {r['hlo']} |")
    print("greedy agree prefix:", results.get("greedy_tokens_agree_prefix"))


if __name__ == "__main__":
    main()
