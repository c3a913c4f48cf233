"""Does the runtime work on this device? A smoke check to run first on a new card or a new jax.

  python3 -m bench.probes.runtime_check --out $OUT [--shape llama2-7b]
  JAX_PLATFORMS=cpu python3 -m bench.probes.runtime_check --shape tiny --out /tmp/rc

1. correctness: a tiny float32 model (random weights) through the runtime with its default kernels on this
   device: the greedy tokens of prompts of 1-100 tokens (inside, at and across bucket edges) equal the argmax
   of a full forward over prompt + generated tokens;
2. the engine of --shape (random weights): build time, compiles, one request's TTFT and TPOT, the pipelined
   decode step, and that the timed request compiled nothing.
Writes runtime_check.json. The latency suite (bench.latency) is the measurement; this only says it can run.
(Issue 3's first form of this check, with plain jit and command buffers off, is run 1 of the engineering log.)
"""
from __future__ import annotations

import os
import time

import numpy as np

from bench.probes import harness as H


def correctness() -> dict:
    from hybrid_jax.engine import generate
    cfg = H.shape_config("tiny", dtype="float32")
    eng, _ = H.random_engine(cfg, max_seq_len=256)
    rng = np.random.RandomState(1)
    out = {}
    try:
        for n in (1, 15, 16, 17, 33, 100):
            ids = [int(i) for i in rng.randint(3, cfg.vocab_size, size=n)]
            r = generate(eng, ids, max_new_tokens=40, ignore_eos=True)
            ref = [int(i) for i in np.argmax(eng.logits(ids + r.token_ids)[n - 1:-1], axis=-1)]
            out[n] = ref == r.token_ids
    finally:
        eng.close()
    return out


def engine_check(shape: str) -> dict:
    from hybrid_jax.engine import generate
    cfg = H.shape_config(shape)
    params = H.random_params(cfg)
    t0 = time.perf_counter()
    eng, _ = H.random_engine(cfg, params, lengths=(10,))
    build_s = time.perf_counter() - t0
    try:
        eng.wait_background()
        ids = list(range(3, 13))
        generate(eng, ids, max_new_tokens=16, ignore_eos=True)  # warm-up
        before = eng.stats().get("compiles")
        r = generate(eng, ids, max_new_tokens=64, ignore_eos=True)
        return {"shape": shape, "build_s": build_s, "ttft_ms": r.timings.ttft_s * 1e3,
                "tpot_ms": r.timings.tpot_s * 1e3, "pipelined_step_ms": eng.pipelined_step_seconds(100) * 1e3,
                "compiles_in_timed": (eng.stats().get("compiles") or 0) - (before or 0), "stats": eng.stats()}
    finally:
        eng.close()


def main():
    args = H.parse(H.parser(__doc__))
    res = {**H.run_record(), "correct": correctness()}
    print("greedy tokens == argmax of the full forward, per prompt length:", res["correct"], flush=True)
    if args.shape != "tiny":
        res["engine"] = engine_check(args.shape)
        e = res["engine"]
        print(f"{args.shape}: built in {e['build_s']:.1f} s, TTFT(10) {e['ttft_ms']:.2f} ms, TPOT {e['tpot_ms']:.3f} ms, "
              f"pipelined step {e['pipelined_step_ms']:.3f} ms, compiles while timed {e['compiles_in_timed']}")
    H.write_json(os.path.join(args.out, "runtime_check.json"), res)
    if not all(res["correct"].values()):
        raise SystemExit("the runtime's greedy tokens differ from the full forward's argmax")


if __name__ == "__main__":
    main()
