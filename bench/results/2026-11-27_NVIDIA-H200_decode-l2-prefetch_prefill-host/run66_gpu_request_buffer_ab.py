"""TTFT with the prefill's request buffer freed before the next one is transferred (the runtime's
`reuse_request_buffers`, on by default) against a new buffer every request (issue 5, runs 64-66 of
docs/ENGINEERING_LOG.md).

  PYTHONPATH=. python3 scripts/gpu_request_buffer_ab.py --out $OUT/rb [--shape llama2-7b] [--lengths 10,100]

Two engines on the same random weights (7B shape, bf16), every bucket compiled, one process; requests through
`generate` (the prefill, then --new-tokens decode steps, so the allocator sees what a server's does),
alternated between the engines, --reps per length. TTFT p50 / p90 per engine and length, and whether both
engines' tokens agree.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

from hybrid_jax import weights  # noqa: E402
from hybrid_jax.config import PRESETS, LlamaConfig  # noqa: E402
from hybrid_jax.engine import Engine, generate  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--lengths", default="10,100")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    cfg = PRESETS.get(args.shape) or LlamaConfig(vocab_size=512, dim=256, n_layers=2, n_heads=8, n_kv_heads=2,
                                                 ffn_dim=512, dtype="bfloat16")
    params = weights.init_random(cfg, jax.random.PRNGKey(0))
    jax.block_until_ready(params)
    lengths = [int(x) for x in args.lengths.split(",")]
    buckets = tuple(sorted({16} | {max(16, 1 << (n - 1).bit_length()) for n in lengths}))
    engines = {}
    for name, reuse in (("reuse", True), ("new", False)):
        e = engines[name] = Engine(cfg, params, max_seq_len=1024, prefill_buckets=buckets, compile_sampling=False,
                                   background_compiles=False, reuse_request_buffers=reuse)
        e.warmup()
    rng = np.random.RandomState(0)
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "command": " ".join(sys.argv),
           "ttft_ms": {}, "tokens_agree": True}
    for n in lengths:
        prompts = [[int(t) for t in rng.randint(3, cfg.vocab_size, size=n)] for _ in range(args.reps)]
        t = {name: [] for name in engines}
        for i, p in enumerate(prompts):
            order = list(engines) if i % 2 == 0 else list(engines)[::-1]
            toks = {}
            for name in order:
                g = generate(engines[name], p, max_new_tokens=args.new_tokens, ignore_eos=True)
                t[name].append(g.timings.ttft_s * 1e3)
                toks[name] = g.token_ids
            res["tokens_agree"] &= toks["reuse"] == toks["new"]
        res["ttft_ms"][n] = t
    with open(os.path.join(args.out, "request_buffer_ab.json"), "w") as f:
        json.dump(res, f, indent=1)
    for e in engines.values():
        e.close()
    print(f"\n{res['device']}, jax {res['jax']}; tokens agree: {res['tokens_agree']}")
    print("| prompt | reuse TTFT p50 / p90 (ms) | new buffer TTFT p50 / p90 (ms) |")
    print("|---|---|---|")
    for n, t in res["ttft_ms"].items():
        print(f"| {n} | " + " | ".join(f"{np.percentile(t[k], 50):.3f} / {np.percentile(t[k], 90):.3f}"
                                        for k in ("reuse", "new")) + " |")


if __name__ == "__main__":
    main()
