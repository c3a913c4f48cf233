"""The default model's streamed decode on this machine (the CPU), at the quick start's cache length: a chat's
short context and a long one.

    python -m bench.probes.cpu_chat_decode --out $OUT [--label NAME]

One process, no disk cache: load the embedded SmolLM2 (2048 positions, as `hybrid-jax generate` loads it), then
generate() 64 greedy tokens after a 37-id prompt (the quick start's question is 37 ids with the chat template)
three times, and 32 after an 1800-id prompt. Reports the median time between streamed tokens of each run, TTFT,
the load's time and compiles, and the first 16 ids (to compare trees: run it once per tree, alternating, with
PYTHONPATH at each tree). Appends one JSON line to cpu_chat_decode.jsonl in --out and prints it.
"""
from __future__ import annotations

import json
import os
import statistics
import time

from bench.probes.harness import parse, parser, run_record


def main(argv=None) -> None:
    ap = parser(__doc__, shape=None)
    ap.add_argument("--label", default="", help="a name for this tree in the record")
    args = parse(ap, argv)
    t0 = time.perf_counter()
    import hybrid_jax
    from hybrid_jax.default_model import default_model_dir

    eng = hybrid_jax.load(default_model_dir(), compile_sampling=False, use_disk_cache=False)
    load_s = time.perf_counter() - t0
    short = list(range(1, 38))
    hybrid_jax.generate(eng, short, max_new_tokens=70, ignore_eos=True)
    eng.runtime.wait_background()
    itl, ttft = [], []
    for _ in range(3):
        r = hybrid_jax.generate(eng, short, max_new_tokens=64, ignore_eos=True)
        itl.append(round(statistics.median(r.timings.itl_s) * 1e3, 1))
        ttft.append(round(r.timings.ttft_s * 1e3, 1))
    long = list(range(1, 1801))
    r2 = [hybrid_jax.generate(eng, long, max_new_tokens=32, ignore_eos=True) for _ in range(2)][-1]
    rec = {"label": args.label, "module": hybrid_jax.__file__, "cache_len": eng.runtime.cache_len,
           "load_s": round(load_s, 1), "itl_p50_ms_37": itl, "ttft_ms_37": ttft, "ids_37": r.token_ids[:16],
           "itl_p50_ms_1800": round(statistics.median(r2.timings.itl_s) * 1e3, 1), "ids_1800": r2.token_ids[:16],
           "compiled": [[list(s), round(t, 1)] for s, t in eng.stats()["compiled"]], **run_record()}
    eng.close()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cpu_chat_decode.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
