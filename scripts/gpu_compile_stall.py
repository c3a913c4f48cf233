"""Where does a background compile stall the thread that decodes? (issue 5, run 57)

  PYTHONPATH=. python3 scripts/gpu_compile_stall.py --out $OUT [--shape llama2-7b] [--lengths 384,96]

Runs 48 and 56 saw one 100-250 ms gap between tokens within the first second of every background compile.
Here no engine runs. For each length T, one 7B-shaped prefill (abstract weights: nothing is allocated) is
traced, lowered and compiled with the runtime's options for its length, while two threads tick every 0.5 ms:
  python  sleeps and wakes (it needs only the GIL)
  device  also runs a tiny jitted op and waits for it (it needs the GIL and the device: the CUDA driver)
For each phase (trace, lower, compile) the longest gaps of each ticker (and when, in the JSON): a gap in both
is the GIL; a gap in `device` alone is the driver or the device. Writes compile_stall.json; prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--lengths", default="384,96")
    ap.add_argument("--cache-len", type=int, default=1040)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    from hybrid_jax import kv_cache
    from hybrid_jax import weights as W
    from hybrid_jax.config import PRESETS
    from hybrid_jax.options import resolve
    from hybrid_jax.runtime import (PREFILL_MATMULS, REQ_FIELDS, DecodeState, SamplingParams, prefill_jit,
                                    prefill_matmuls_for)
    cfg = PRESETS[args.shape]
    devices = jax.devices()[:1]
    options = resolve(None, cfg, devices, None)  # the runtime's defaults
    p = W.abstract(cfg)
    i32, f32 = jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.float32)
    st = DecodeState(cache=kv_cache.abstract(cfg, args.cache_len, None), pos=i32, token=i32,
                     key=jax.ShapeDtypeStruct((2,), jnp.uint32), sp=SamplingParams(f32, i32, f32))
    tiny = jax.jit(lambda x: x + 1)
    x = jnp.zeros((8,), jnp.float32)
    tiny(x).block_until_ready()
    marks: dict[str, list] = {"python": [], "device": []}
    stop = threading.Event()

    def tick(name):
        last = time.perf_counter()
        y = x
        while not stop.is_set():
            time.sleep(0.0005)
            if name == "device":
                y = tiny(y)
                y.block_until_ready()
            now = time.perf_counter()
            marks[name].append((now, now - last))
            last = now

    threads = [threading.Thread(target=tick, args=(n,), daemon=True) for n in marks]
    for t in threads:
        t.start()
    time.sleep(0.5)
    rows = []
    for T in [int(v) for v in args.lengths.split(",")]:
        opts = PREFILL_MATMULS[prefill_matmuls_for("split", T, cfg.n_params, None)]  # the runtime's default
        req = jax.ShapeDtypeStruct((T + REQ_FIELDS,), jnp.int32)
        # as Runtime._lower builds a bucket's prefill (Runtime.step_options)
        o = options.replace(prefill_attention=options.prefill_attention if T >= options.prefill_attention_min_rows
                            else "off", prefill_attention_min_rows=0,
                            prefill_matmuls=prefill_matmuls_for("split", T, cfg.n_params, None))
        f = prefill_jit(cfg, T, o)
        t = [time.perf_counter()]
        traced = f.trace(p, st, req)
        t.append(time.perf_counter())
        low = traced.lower()
        t.append(time.perf_counter())
        low.compile(compiler_options=opts) if opts else low.compile()
        t.append(time.perf_counter())
        time.sleep(0.3)
        r = {"T": T, "matmuls": prefill_matmuls_for("split", T, cfg.n_params, None),
             "device": jax.devices()[0].device_kind, "jax": jax.__version__}
        for i, phase in enumerate(("trace", "lower", "compile")):
            r[f"{phase}_s"] = t[i + 1] - t[i]
            for name, m in marks.items():
                gaps = sorted((g, now - t[i]) for now, g in m if t[i] <= now <= t[i + 1] + 0.05)
                r[f"{phase}_{name}_top_ms"] = [round(g * 1e3, 1) for g, _ in gaps[-3:]]
                r[f"{phase}_{name}_top_at_s"] = [round(a, 3) for _, a in gaps[-3:]]  # when, from the phase's start
        rows.append(r)
        print(json.dumps(r), flush=True)
    stop.set()
    for t in threads:  # before the interpreter exits (a ticker still inside a jax call aborts the exit)
        t.join()
    with open(os.path.join(args.out, "compile_stall.json"), "w") as fh:
        json.dump(rows, fh)
    print("\n| T | matmuls | phase | seconds | longest gaps: python ticker (ms) | device ticker (ms) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        for phase in ("trace", "lower", "compile"):
            print(f"| {r['T']} | {r['matmuls']} | {phase} | {r[phase + '_s']:.2f} | {r[phase + '_python_top_ms']} | "
                  f"{r[phase + '_device_top_ms']} |")


if __name__ == "__main__":
    main()
