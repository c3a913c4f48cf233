"""The decode step with the attention kernel reading the output projection's weights into L2
(decode_attention.PREFETCH_BYTES) against without (issue 5, docs/ENGINEERING_LOG.md session 10).

  PYTHONPATH=. python3 scripts/gpu_prefetch_ab.py --out $OUT/pf [--shape llama2-7b] [--variants off,8,16,32,16L]

One engine per variant on the same random weights, in one process (a variant is "off", or the megabytes of
each layer's wo read while the attention runs, with "L" for Triton's evict_last policy on those loads).
Per round and variant, in rotated order: the pipelined decode step (no host reads) after a prompt of each
`--contexts` length. Every variant's first 32 greedy tokens must equal "off"'s (the prefetch changes no
arithmetic). Then a CUPTI profile of `--profile` variants: device time per kernel family per step.
Background compiles are off (no timing beside a compile); the engines share one executable cache, so the
prefill (which the switch does not change) compiles once. `--shape tiny --kernels interpret` is a CPU dry run.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

from gpu_decode_profile import kernel_table  # noqa: E402  (scripts/ is this script's folder)
from hybrid_jax import decode_attention as A  # noqa: E402
from hybrid_jax import weights  # noqa: E402
from hybrid_jax.config import PRESETS, LlamaConfig  # noqa: E402
from hybrid_jax.engine import Engine, generate  # noqa: E402


def parse_variant(v: str) -> tuple[int, str | None]:
    if v == "off":
        return 0, None
    evict = "evict_last" if v.endswith("L") else None
    return int(float(v.rstrip("L")) * 2 ** 20), evict


def step_seconds(eng: Engine, ctx: int, n: int) -> float:
    """Device time per decode step, pipelined (no host reads), from position ctx on."""
    rt = eng.runtime
    state, _ = rt.prefill(rt.reset_state(rt.state.cache), [3 + i % 100 for i in range(ctx)])
    spec = rt.decode_spec(ctx + n + 2, False)
    state, tok = rt.decode(state, spec)
    tok.block_until_ready()
    t0 = time.perf_counter()
    for _ in range(n):
        state, tok = rt.decode(state, spec)
    tok.block_until_ready()
    dt = (time.perf_counter() - t0) / n
    rt.state = state
    return dt


def family(name: str) -> str:
    return re.sub(r"_l\d+$", "", re.sub(r"\d+$", "", name))


def profile(eng: Engine, steps: int) -> dict:
    rt = eng.runtime
    state, _ = rt.prefill(rt.reset_state(rt.state.cache), [1, 2, 3])
    spec = rt.decode_spec(200, False)
    for _ in range(5):
        state, tok = rt.decode(state, spec)
    tok.block_until_ready()
    d = tempfile.mkdtemp()
    with jax.profiler.trace(d, create_perfetto_trace=True):
        for _ in range(steps):
            state, tok = rt.decode(state, spec)
        tok.block_until_ready()
        time.sleep(0.2)
    rt.state = state
    tab = kernel_table(glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)[0], steps)
    fam = collections.defaultdict(lambda: [0.0, 0.0])
    for r in tab.pop("top"):
        f = fam[family(r["name"])]
        f[0] += r["us"]
        f[1] += r["count"]
    tab["families"] = {k: {"us": round(v[0], 1), "count": round(v[1], 1)} for k, v in
                       sorted(fam.items(), key=lambda kv: -kv[1][0])}
    return tab


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--variants", default="off,8,16,32,16L")
    ap.add_argument("--contexts", default="1,500")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--profile", default="off,16", help="variants to profile (CUPTI), '' for none")
    ap.add_argument("--kernels", default="auto", help="gemv / decode_attention mode (interpret: CPU dry run)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    cfg = PRESETS.get(args.shape) or LlamaConfig(vocab_size=512, dim=256, n_layers=2, n_heads=8, n_kv_heads=2,
                                                 ffn_dim=512, dtype="bfloat16")
    params = weights.init_random(cfg, jax.random.PRNGKey(0))
    jax.block_until_ready(params)
    variants = args.variants.split(",")
    contexts = [int(c) for c in args.contexts.split(",")]
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "shape": args.shape,
           "command": " ".join(sys.argv), "variants": {}}
    cache_dir = tempfile.mkdtemp()
    engines = {}
    for v in variants:
        A.PREFETCH_BYTES, A.PREFETCH_EVICT = parse_variant(v)
        t0 = time.perf_counter()
        eng = Engine(cfg, params, max_seq_len=1024, cache_dir=cache_dir, prefill_buckets=(16,),
                     compile_sampling=False, background_compiles=False, gemv=args.kernels,
                     decode_attention=args.kernels)
        r = res["variants"][v] = {"bytes": A.PREFETCH_BYTES, "evict": A.PREFETCH_EVICT,
                                  "build_s": round(time.perf_counter() - t0, 1), "gemv": eng.runtime.gemv,
                                  "attn": eng.runtime.attn}
        wo_shape = (cfg.dim, cfg.n_heads * cfg.hd)
        r["plan"] = A.prefetch_plan(wo_shape, 2 if cfg.dtype == "bfloat16" else 4, cfg.n_kv_heads, A.PREFETCH_BYTES)
        r["tokens"] = generate(eng, [5, 6, 7, 8, 9, 10, 11, 12, 13, 14], max_new_tokens=32,
                               ignore_eos=True).token_ids
        print(f"built {v}: {r['build_s']} s, plan {r['plan']}", flush=True)
        engines[v] = eng
    A.PREFETCH_BYTES, A.PREFETCH_EVICT = 0, None
    base = res["variants"][variants[0]]["tokens"]
    res["tokens_equal"] = {v: res["variants"][v]["tokens"] == base for v in variants}
    times = {(v, c): [] for v in variants for c in contexts}
    for rnd in range(args.rounds):
        order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
        for v in order:
            for c in contexts:
                times[(v, c)].append(step_seconds(engines[v], c, args.steps))
    for (v, c), ts in times.items():
        res["variants"][v][f"step_ms_ctx{c}"] = [round(t * 1e3, 4) for t in ts]
    with open(os.path.join(args.out, "prefetch_ab.json"), "w") as f:
        json.dump(res, f, indent=1)
    for v in [p for p in args.profile.split(",") if p in engines]:
        try:
            res["variants"][v]["profile"] = profile(engines[v], 20)
        except Exception as e:  # noqa: BLE001
            res["variants"][v]["profile"] = {"error": f"{type(e).__name__}: {e}"}
        with open(os.path.join(args.out, "prefetch_ab.json"), "w") as f:
            json.dump(res, f, indent=1)
    for e in engines.values():
        e.close()
    print(f"\n{res['device']}, jax {res['jax']}, {args.shape}; tokens equal to {variants[0]}: {res['tokens_equal']}")
    print("| variant | plan (programs/head, rows, cols) | " + " | ".join(
        f"step ms at {c} (median, min)" for c in contexts) + " | vs first (median) |")
    print("|---|---|" + "---|" * len(contexts) + "---|")
    for v in variants:
        r = res["variants"][v]
        meds = [np.median(r[f"step_ms_ctx{c}"]) for c in contexts]
        ref = [np.median(res["variants"][variants[0]][f"step_ms_ctx{c}"]) for c in contexts]
        print(f"| {v} | {r['plan']} | " + " | ".join(f"{m:.3f}, {min(r[f'step_ms_ctx{c}']):.3f}"
                                                   for m, c in zip(meds, contexts))
              + " | " + ", ".join(f"{m - b:+.3f}" for m, b in zip(meds, ref)) + " |")
    for v in [p for p in args.profile.split(",") if p in engines]:
        p = res["variants"][v].get("profile", {})
        print(f"profile {v}: busy {p.get('busy_us_per_step', 0):.0f} us/step, kernels {p.get('kernels_per_step')}, "
              f"{p.get('error', '')}")
        for k, f in list(p.get("families", {}).items())[:10]:
            print(f"   {f['us']:8.1f} us x{f['count']:5.1f}  {k[:80]}")


if __name__ == "__main__":
    main()
