"""The attention of a chunk over the cache: decode_attention.attend_chunk against XLA's attention (`model.attention`,
scores over every cache row), in the steps that use it.

    python3 -m bench.probes.chunk_check --shape llama2-7b --out $OUT
    JAX_PLATFORMS=cpu python3 -m bench.probes.chunk_check --shape tiny --reps 2 --steps 3 --out /tmp/cc

Two engines over the same random weights, prompt lookup (K = 4) and KV reuse on, one with chunk_attention="xla",
one with "pallas" (the kernel). Per engine, medians of --reps:
- TTFT of fresh prompts of 10 and 50 ids (the 16- and 64-row buckets, their own rows only);
- TTFT of a turn after --history ids already in the cache: 50 new ids, a 64-row chunk over the whole cache
  (what KV reuse runs);
- the device's time per step (--steps enqueued back to back) of the decode step and of verify steps of K = 4
  and 8 (5 and 9 rows over the cache), after the history;
- the first 32 greedy tokens after the history (random weights: the two paths' bf16 sums may flip near-ties).
Writes chunk_check.json and prints a table.
"""
from __future__ import annotations

import os
import statistics
import time

from bench.probes.harness import parse, parser, random_params, run_record, shape_config, write_json


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--history", type=int, default=900)
    args = parse(ap, argv)
    import jax
    import numpy as np

    import hybrid_jax
    from hybrid_jax.engine import Engine
    from hybrid_jax.options import KernelOptions

    on_acc = jax.devices()[0].platform != "cpu"
    cfg = shape_config(args.shape, "bfloat16" if on_acc else "float32")
    params = random_params(cfg)
    rng = np.random.default_rng(0)

    def ids(n):
        return [int(t) for t in rng.integers(3, cfg.vocab_size, n)]

    short, mid, hist, new = ids(10), ids(50), ids(args.history), ids(50)
    rec = {"run": run_record(), "args": vars(args), "variants": {}}
    variants = {"xla": KernelOptions(chunk_attention="xla"), "kernel": KernelOptions(chunk_attention="pallas")}
    if not on_acc:  # a CPU dry run: the kernel in Pallas' interpreter
        variants["kernel"] = KernelOptions(chunk_attention="interpret")
    for name, opts in variants.items():
        t0 = time.perf_counter()
        eng = Engine(cfg, params, max_seq_len=1024, prefill_buckets=(16, 64), compile_sampling=False, kv_reuse=True,
                     speculative="ngram", num_speculative_tokens=4, options=opts)
        eng.warmup()
        out = {"options": eng.stats().get("options"), "start_s": round(time.perf_counter() - t0, 1)}

        def ttft(prompt, before=None, eng=eng):
            if before is not None:
                hybrid_jax.generate(eng, before, max_new_tokens=1, ignore_eos=True, speculative=False)
            r = hybrid_jax.generate(eng, prompt, max_new_tokens=1, ignore_eos=True, speculative=False)
            return r.timings.ttft_s * 1e3, r.timings.reused_tokens

        for label, prompt, before in (("fresh10", short, None), ("fresh50", mid, None), ("turn50", hist + new, hist)):
            rows = []
            for i in range(args.reps + 2):
                if before is None:  # a fresh prefill each time: another prompt in between clears the reuse
                    hybrid_jax.generate(eng, [3], max_new_tokens=1, ignore_eos=True, speculative=False)
                ms, reused = ttft(prompt, before)
                if i >= 2:
                    rows.append(ms)
            out[label] = round(statistics.median(rows), 3)
            out[label + "_reused"] = reused
        rt = eng.runtime
        specs = {"decode": ("decode", rt.cache_len, False), "verify_k4": (rt.verify_kind, rt.cache_len, 4, False),
                 "verify_k8": (rt.verify_kind, rt.cache_len, 8, False)}
        secs = [eng.step_seconds(list(specs.values()), args.steps, hist[:700]) for _ in range(3)]
        for j, k in enumerate(specs):
            out[k] = round(statistics.median(s[j] for s in secs) * 1e3, 4)
        for k in ("verify_k4", "verify_k8"):
            out[k + "_over_decode"] = round(out[k] / out["decode"], 3)
        out["tokens"] = hybrid_jax.generate(eng, hist, max_new_tokens=32, ignore_eos=True, speculative=False).token_ids
        eng.close()
        del eng
        rec["variants"][name] = out
        write_json(os.path.join(args.out, "chunk_check.json"), rec)
    a, b = rec["variants"]["xla"], rec["variants"]["kernel"]
    same = sum(x == y for x, y in zip(a["tokens"], b["tokens"]))
    rec["same_tokens"] = same
    write_json(os.path.join(args.out, "chunk_check.json"), rec)
    print(f"\n{rec['run']['device']}, {args.shape}; ms (medians); greedy tokens after the history equal: {same}/32")
    keys = ["fresh10", "fresh50", "turn50", "decode", "verify_k4", "verify_k8", "verify_k4_over_decode",
            "verify_k8_over_decode", "start_s"]
    print("variant  " + " ".join(f"{k:>11s}" for k in keys))
    for name, o in rec["variants"].items():
        print(f"{name:8s} " + " ".join(f"{o[k]:11.3f}" for k in keys))


if __name__ == "__main__":
    main()
