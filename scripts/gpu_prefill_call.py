"""How much of the prefill call's ~1.2 ms of host time (run 63) is the request's host->device transfer, and how
much the executable's own launch? (issue 5, docs/ENGINEERING_LOG.md session 10)

  PYTHONPATH=. python3 scripts/gpu_prefill_call.py --out $OUT/call [--shape llama2-7b] [--lengths 10,100]

One engine (7B shape, random bf16 weights), the prompt's own bucket compiled. With the device idle before each
call (the previous call's outputs waited for), the host time of one call of the prefill executable, passing
the packed request (runtime.pack_request) as:
  numpy      a numpy array, as Runtime.prefill does (jaxlib transfers it inside the call)
  put        a device array transferred (and waited for) before the call: a new buffer every call
  same       the same device array every call (its address never changes)
  reuse      a device array transferred before the call, the previous call's deleted first (does the
             allocator hand the same block back?)
and the host time of `jax.device_put` of the request alone; then the decode step's call for comparison, and
the prefill's device time back to back. Median of --reps calls each.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

from hybrid_jax import gemv as G  # noqa: E402
from hybrid_jax import weights  # noqa: E402
from shapes import shape_config  # noqa: E402  (scripts/ is this script's folder)
from hybrid_jax.engine import Engine  # noqa: E402
from hybrid_jax.runtime import pack_request  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--lengths", default="10,100")
    ap.add_argument("--reps", type=int, default=60)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    cfg = shape_config(args.shape)
    params = weights.init_random(cfg, jax.random.PRNGKey(0))
    jax.block_until_ready(params)
    lengths = [int(x) for x in args.lengths.split(",")]
    buckets = sorted({16} | {G.rows_padded(n) for n in lengths})  # each prompt's own bucket
    eng = Engine(cfg, params, max_seq_len=1024, prefill_buckets=tuple(buckets), compile_sampling=False,
                 background_compiles=False)
    eng.warmup()  # every bucket compiled: each prompt runs as one call of its own bucket
    rt = eng.runtime
    dev = jax.devices()[0]
    res = {"device": dev.device_kind, "jax": jax.__version__, "command": " ".join(sys.argv), "lengths": {}}
    rng = np.random.RandomState(0)
    for n in lengths:
        (spec, k), = rt.plan_prefill(n)
        ex = rt._get(spec)
        T = spec[1]
        toks = rng.randint(3, cfg.vocab_size, size=n).astype(np.int32)
        req = pack_request(toks, T, (0, 0.0, None, None))
        same = jax.device_put(req, dev)
        r = {"bucket": T}

        def call(arg):
            t0 = time.perf_counter()
            rt.state, nxt = ex(rt.params, rt.state, arg)
            dt = time.perf_counter() - t0
            nxt.block_until_ready()
            time.sleep(0.002)
            return dt

        for _ in range(5):
            call(req)
        for name in ("numpy", "put", "same", "reuse", "numpy"):
            ts, addrs, prev = [], set(), None
            for _ in range(args.reps):
                if name in ("put", "reuse"):
                    if name == "reuse" and prev is not None:
                        prev.delete()  # its prefill has finished (call() waits for it)
                    a = prev = jax.device_put(req, dev)
                    a.block_until_ready()
                    addrs.add(a.unsafe_buffer_pointer())
                else:
                    a = same if name == "same" else req
                ts.append(call(a))
            r.setdefault(f"call_ms_{name}", []).append(float(np.median(ts) * 1e3))
            if addrs:
                r[f"addresses_{name}"] = len(addrs)
        ts = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            a = jax.device_put(req, dev)
            ts.append(time.perf_counter() - t0)
            a.block_until_ready()
        r["device_put_ms"] = float(np.median(ts) * 1e3)
        # first token as the host sees it, request by request (prefill call, read)
        ts = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            rt.state, nxt = ex(rt.params, rt.state, req)
            int(nxt)
            ts.append(time.perf_counter() - t0)
            time.sleep(0.002)
        r["call_and_read_ms"] = float(np.median(ts) * 1e3)
        # device time, back to back
        jax.block_until_ready(rt.state)
        t0 = time.perf_counter()
        for _ in range(20):
            rt.state, nxt = ex(rt.params, rt.state, same)
        nxt.block_until_ready()
        r["back_to_back_ms"] = (time.perf_counter() - t0) / 20 * 1e3
        res["lengths"][n] = r
        print(json.dumps({n: r}), flush=True)
    spec = rt.decode_spec(100, False)
    dex = rt._get(spec)
    ts = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        rt.state, tok = dex(rt.params, rt.state)
        ts.append(time.perf_counter() - t0)
        tok.block_until_ready()
        time.sleep(0.002)
    res["decode_call_ms"] = float(np.median(ts) * 1e3)
    with open(os.path.join(args.out, "prefill_call.json"), "w") as f:
        json.dump(res, f, indent=1)
    eng.close()
    print(f"\n{res['device']}, jax {res['jax']}; decode step call {res['decode_call_ms']:.3f} ms (host)")
    print("| prompt | bucket | call: numpy | put (addresses) | same | reuse (addresses) | numpy again | device_put alone "
          "| call + read | back to back |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, r in res["lengths"].items():
        print(f"| {n} | {r['bucket']} | {r['call_ms_numpy'][0]:.3f} | {r['call_ms_put'][0]:.3f} ({r['addresses_put']}) | "
              f"{r['call_ms_same'][0]:.3f} | {r['call_ms_reuse'][0]:.3f} ({r['addresses_reuse']}) | "
              f"{r['call_ms_numpy'][1]:.3f} | {r['device_put_ms']:.3f} | "
              f"{r['call_and_read_ms']:.3f} | {r['back_to_back_ms']:.3f} |")


if __name__ == "__main__":
    main()
