"""Why is streaming TPOT p99 1.2x its p50 (run 42)? How the host waits for each token, A/B in one process.

  PYTHONPATH=. python3 scripts/gpu_itl_jitter.py --out $OUT [--shape llama2-7b] [--rounds 3] [--reps 4]

Archived (session 8, runs 45-47): it sets Engine.read_ahead and Engine.spin, which read_modes.diff beside it
adds to hybrid_jax/engine.py (reverted: no variant changed the tail). Apply the diff at commit fcf9625's
engine.py and copy this script to scripts/ to run it again.

Run 42's inter-token intervals of hybrid had std 0.32 ms around a 3.9 ms step with lag-1 autocorrelation
-0.49: a late read is followed by a short interval, so the device is steady and the host sees each token
late by a varying time. One engine (random weights), then rounds of `reps` generations of 128 tokens from
a 10-token prompt per variant, variants alternated within each round:

  block        the engine's default read: np.asarray(token) blocks until the token's copy is done
  read_ahead   token.copy_to_host_async() right after its step is enqueued (the read only waits)
  spin         poll token.is_ready() before the read (no sleep in the blocking read)
  ahead_spin   both
  ahead_yield  both, the poll giving up the GIL and the CPU between polls (time.sleep(0))
  gc_off       block, with Python's garbage collector off during the generation

Per variant: the intervals' mean, p10/p50/p90/p99, std, lag-1 autocorrelation, and TTFT p50; plus the
pipelined step (no host reads) as the device's rate. Writes itl_jitter.json; prints a table.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

VARIANTS = {"block": dict(read_ahead=False, spin=False), "read_ahead": dict(read_ahead=True, spin=False),
            "spin": dict(read_ahead=False, spin=True), "ahead_spin": dict(read_ahead=True, spin=True),
            "ahead_yield": dict(read_ahead=True, spin="yield"),
            "gc_off": dict(read_ahead=False, spin=False, gc_off=True)}


def summary(itl: np.ndarray, per_gen: list[np.ndarray]) -> dict:
    ms = itl * 1e3
    lag = []
    for a in per_gen:
        d = a - a.mean()
        if len(d) > 2 and np.sum(d * d) > 0:
            lag.append(float(np.sum(d[1:] * d[:-1]) / np.sum(d * d)))
    p = np.percentile(ms, [10, 50, 90, 99])
    return {"n": int(ms.size), "mean_ms": float(ms.mean()), "p10_ms": float(p[0]), "p50_ms": float(p[1]),
            "p90_ms": float(p[2]), "p99_ms": float(p[3]), "max_ms": float(ms.max()), "std_ms": float(ms.std()),
            "p99_over_p50": float(p[3] / p[1]), "lag1_autocorr": float(np.mean(lag)) if lag else None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    from hybrid_jax import weights
    from hybrid_jax.config import PRESETS, LlamaConfig
    from hybrid_jax.engine import Engine, generate
    cfg = PRESETS.get(args.shape) or LlamaConfig(vocab_size=512, dim=256, n_layers=2, n_heads=8, n_kv_heads=2,
                                                 ffn_dim=512, dtype="bfloat16")  # "tiny": a dry run
    params = weights.init_random(cfg, jax.random.PRNGKey(0))
    jax.block_until_ready(params)
    eng = Engine(cfg, params, max_seq_len=1024, cache_dir=tempfile.mkdtemp(), prefill_buckets=(16, 128, 512, 1024))
    eng.wait_background()
    rng = np.random.RandomState(0)
    prompt = [int(t) for t in rng.randint(3, cfg.vocab_size, size=10)]
    names = args.variants.split(",")
    for name in names:  # warm every path once
        eng.read_ahead, eng.spin = VARIANTS[name]["read_ahead"], VARIANTS[name]["spin"]
        generate(eng, prompt, max_new_tokens=16, ignore_eos=True)
    # the first prompt queued its own bucket's compile in the background, which slows the steps beside it
    # (XLA's autotuning on the device, the tracing's host time: runs 44-46): time only after it
    eng.wait_background()
    generate(eng, prompt, max_new_tokens=16, ignore_eos=True)
    step = eng.pipelined_step_seconds(200)
    itl = {n: [] for n in names}
    ttft = {n: [] for n in names}
    for _ in range(args.rounds):
        for name in names:
            v = VARIANTS[name]
            eng.read_ahead, eng.spin = v["read_ahead"], v["spin"]
            for _ in range(args.reps):
                if v.get("gc_off"):
                    gc.collect()
                    gc.disable()
                try:
                    g = generate(eng, prompt, max_new_tokens=args.new_tokens, ignore_eos=True)
                finally:
                    gc.enable()
                itl[name].append(np.asarray(g.timings.itl_s))
                ttft[name].append(g.timings.ttft_s)
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "shape": args.shape,
           "pipelined_step_ms": step * 1e3, "rounds": args.rounds, "reps": args.reps, "variants": {}}
    for name in names:
        s = summary(np.concatenate(itl[name]), itl[name])
        s["ttft_p50_ms"] = float(np.percentile(ttft[name], 50) * 1e3)
        s["itl_s"] = [a.tolist() for a in itl[name]]
        out["variants"][name] = s
    with open(os.path.join(args.out, "itl_jitter.json"), "w") as f:
        json.dump(out, f)
    print(f"pipelined step {step * 1e3:.3f} ms ({out['device']})")
    print("| variant | mean | p10 | p50 | p90 | p99 | max | std | p99/p50 | lag-1 | TTFT p50 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        s = out["variants"][name]
        print(f"| {name} | {s['mean_ms']:.3f} | {s['p10_ms']:.3f} | {s['p50_ms']:.3f} | {s['p90_ms']:.3f} | "
              f"{s['p99_ms']:.3f} | {s['max_ms']:.3f} | {s['std_ms']:.3f} | {s['p99_over_p50']:.3f} | "
              f"{s['lag1_autocorr']:.2f} | {s['ttft_p50_ms']:.2f} |")
    eng.close()


if __name__ == "__main__":
    main()
