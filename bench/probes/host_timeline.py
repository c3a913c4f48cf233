"""Where the host time of a prefill call goes before its graph starts (issue 5, docs/ENGINEERING_LOG.md session 12).

  python3 -m bench.probes.host_timeline --out $OUT/host [--shape llama2-7b] [--lengths 10,100]
      [--variants default,cudnn_all,xla_attn,cublas]
  python3 -m bench.probes.host_timeline --parse LOG [--summary]     # a run's stderr, cut per call

Runs 63-64 measured ~1.0 ms of host time in a 10-token prefill call with the device idle, of which a plain
448-kernel command buffer costs ~0.1 ms (run 26); run 27 added ~0.5 ms with the 32 cuDNN attention calls. One
engine per variant on the same weights, every length its own bucket (VARIANTS: the runtime's defaults; cuDNN's
attention at every bucket; XLA's attention at every bucket; cuBLAS's matmuls), and for each length and variant, with the device
idle before every call (the previous outputs waited for, then a 3 ms sleep):
  prefill   the call as Runtime.prefill makes it (a numpy request); host time to return, and to the token read
  same      the same device request buffer every call
  decode    one greedy decode step
  tiny      a jitted x + 1 on 16 floats (what any call costs here)
Median of --reps calls. Each call is bracketed by `MARK` lines on stderr (time of day, microseconds) so that a
run with XLA's runtime logging on (TF_CPP_VMODULE, TF_CPP_MIN_LOG_LEVEL=0) can be cut into per-call host
timelines by --parse, or summed up one line per call (host times, graph nodes re-pointed) by --parse --summary.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import sys
import time

import numpy as np

from bench.probes import harness as H


def mark(label: str) -> None:
    now = datetime.datetime.now()
    sys.stderr.write(f"MARK {now.strftime('%H:%M:%S.%f')} {label}\n")
    sys.stderr.flush()


VARIANTS = {  # name -> KernelOptions fields (default: the runtime's defaults)
    "default": {},
    "cudnn_all": {"prefill_attention": "cudnn"},  # cuDNN's attention in every own bucket (before session 13)
    "xla_attn": {"prefill_attention": None},  # XLA's attention in every bucket
    "cublas": {"prefill_matmuls": "cublas"},  # cuBLAS's heuristics for the prefill's matmuls, nothing autotuned
}


def run(args) -> None:
    import jax
    import jax.numpy as jnp

    from hybrid_jax import gemv as G
    from hybrid_jax.engine import Engine
    from hybrid_jax.runtime import pack_request

    cfg = H.shape_config(args.shape)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    params = H.random_params(cfg)
    lengths = [int(x) for x in args.lengths.split(",")]
    buckets = {n: max(16, G.rows_padded(n)) for n in lengths}
    dev = jax.devices()[0]
    res = {"device": dev.device_kind, "jax": jax.__version__, "command": " ".join(sys.argv), "shape": args.shape,
           "env": {k: v for k, v in os.environ.items() if k.startswith(("TF_CPP", "XLA_FLAGS", "HYBRID_JAX"))},
           "buckets": buckets, "variants": {}}
    engines = {}
    own = sorted(set(buckets.values()))
    for name in names:
        t0 = time.perf_counter()
        from hybrid_jax.options import KernelOptions
        eng = Engine(cfg, params, max_seq_len=1024, prefill_buckets=own, compile_sampling=False, kv_reuse=False,
                     background_compiles=False, options=KernelOptions(**VARIANTS[name]))
        for f in [eng.runtime.compile_async(("prefill", b, b)) for b in own]:
            if f is not None:  # the buckets concurrently (the runtime's compile pool), no sampling step
                f.result()
        engines[name] = eng
        print(f"{name}: engine built in {time.perf_counter() - t0:.1f} s", flush=True)
    tiny = jax.jit(lambda x: x + 1)
    xs = jnp.zeros((16,), jnp.float32)
    tiny(xs).block_until_ready()
    rng = np.random.RandomState(0)
    mark("begin")
    for n in lengths:
        T = buckets[n]
        toks = rng.randint(3, cfg.vocab_size, size=n).astype(np.int32)
        for name, eng in engines.items():
            rt = eng.runtime
            (spec, _), = rt.plan_prefill(n)
            assert spec == ("prefill", T, T), spec
            ex = rt.executable(spec)
            dex = rt.executable(rt.decode_spec(n + 10, False))
            req = pack_request(toks, T, (0, 0.0, None, None))
            same = jax.device_put(req, dev)
            r = {}

            def timed(label, fn):
                rets, reads = [], []
                for i in range(args.reps):
                    time.sleep(0.003)
                    mark(f"{name}/{n}/{label}/{i} call")
                    t0 = time.perf_counter()
                    out = fn()
                    t1 = time.perf_counter()
                    mark(f"{name}/{n}/{label}/{i} returned")
                    jax.block_until_ready(out)
                    t2 = time.perf_counter()
                    mark(f"{name}/{n}/{label}/{i} ready")
                    rets.append(t1 - t0)
                    reads.append(t2 - t0)
                r[label] = {"return_ms": float(np.median(rets) * 1e3), "ready_ms": float(np.median(reads) * 1e3),
                            "ready_p90_ms": float(np.percentile(reads, 90) * 1e3),
                            "return_ms_all": [round(x * 1e3, 4) for x in rets],
                            "ready_ms_all": [round(x * 1e3, 4) for x in reads]}

            def prefill(arg):
                def f():
                    rt.state, nxt = ex(rt.params, rt.state, arg)
                    return nxt
                return f

            def decode():
                rt.state, tok = dex(rt.params, rt.state)
                return tok

            for _ in range(5):
                jax.block_until_ready(prefill(req)())
                jax.block_until_ready(decode())
            r["first_token"] = int(prefill(req)())
            timed("prefill", prefill(req))
            timed("same", prefill(same))
            timed("decode", decode)
            timed("tiny", lambda: tiny(xs))
            # the device's own time, back to back
            jax.block_until_ready(rt.state)
            t0 = time.perf_counter()
            for _ in range(20):
                rt.state, nxt = ex(rt.params, rt.state, same)
            nxt.block_until_ready()
            r["prefill_back_to_back_ms"] = (time.perf_counter() - t0) / 20 * 1e3
            res["variants"].setdefault(name, {})[str(n)] = r
            with open(os.path.join(args.out, f"host_timeline{args.tag}.json"), "w") as f:
                json.dump(res, f, indent=1)
    mark("end")
    for eng in engines.values():
        eng.close()
    print(f"\n{res['device']}, jax {res['jax']}, {args.shape}; host ms, median of {args.reps}, device idle before "
          f"each call; ready = the token read (TTFT without Python's generate)")
    print("| tokens (bucket) | variant | prefill: return / ready (p90) | same buffer: return / ready | decode: return / "
          "ready | tiny jit | prefill back to back | first token |")
    print("|---|---|---|---|---|---|---|---|")
    for n in lengths:
        for name in names:
            r = res["variants"][name][str(n)]
            print(f"| {n} ({buckets[n]}) | {name} | {r['prefill']['return_ms']:.3f} / {r['prefill']['ready_ms']:.3f} "
                  f"({r['prefill']['ready_p90_ms']:.3f}) | {r['same']['return_ms']:.3f} / {r['same']['ready_ms']:.3f} | "
                  f"{r['decode']['return_ms']:.3f} / {r['decode']['ready_ms']:.3f} | {r['tiny']['return_ms']:.3f} | "
                  f"{r['prefill_back_to_back_ms']:.3f} | {r['first_token']} |")


_GLOG = re.compile(r"^[IWEF]\d{4} (\d\d):(\d\d):(\d\d)\.(\d{6})\s+\d+ ([^\]]+)\] ?(.*)$")
_MARK = re.compile(r"^MARK (\d\d):(\d\d):(\d\d)\.(\d{6}) (.*)$")


def _us(h, m, s, u) -> int:
    return ((int(h) * 60 + int(m)) * 60 + int(s)) * 1_000_000 + int(u)


def parse(path: str, calls: list[str], window_us: int) -> None:
    """Per named call (e.g. default/prefill/3), the log lines from its `call` mark to `window_us` after it, with
    microseconds since the mark."""
    lines = []
    with open(path, errors="replace") as f:
        for ln in f:
            ln = ln.rstrip("\n")
            m = _MARK.match(ln)
            if m:
                lines.append((_us(*m.groups()[:4]), "MARK", m.group(5)))
                continue
            g = _GLOG.match(ln)
            if g:
                lines.append((_us(*g.groups()[:4]), g.group(5), g.group(6)[:160]))
    for c in calls:
        t0 = next((t for t, src, msg in lines if src == "MARK" and msg == f"{c} call"), None)
        if t0 is None:
            print(f"## {c}: no mark")
            continue
        print(f"## {c}")
        for t, src, msg in lines:
            if t0 <= t <= t0 + window_us:
                print(f"{t - t0:8d} us  {src:40.40s} {msg}")


def summary(path: str) -> None:
    """Per call (every `call` mark): host microseconds to `returned` and to `ready`, and the CUDA-graph nodes
    re-pointed in between (XLA's `Set ... node params` lines; cuda_command_buffer's logging on): are the slow
    calls the ones whose graph was re-pointed?"""
    marks, sets = [], []
    with open(path, errors="replace") as f:
        for ln in f:
            m = _MARK.match(ln.rstrip("\n"))
            if m:
                marks.append((_us(*m.groups()[:4]), m.group(5)))
            elif "node params" in ln:
                g = _GLOG.match(ln.rstrip("\n"))
                if g:
                    sets.append(_us(*g.groups()[:4]))
    sets.sort()
    import bisect
    rows = {}
    for t, label in marks:
        name, _, what = label.rpartition(" ")
        rows.setdefault(name, {})[what] = t
    print("| call | returned us | ready us | nodes re-pointed |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        if "call" not in r or "returned" not in r:
            continue
        n = bisect.bisect_right(sets, r["returned"]) - bisect.bisect_left(sets, r["call"])
        ready = r.get("ready", r["returned"]) - r["call"]
        print(f"| {name} | {r['returned'] - r['call']} | {ready} | {n} |")


def main():
    ap = H.parser(__doc__)
    ap.add_argument("--lengths", default="10", help="prompt lengths, comma-separated (each its own bucket)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--variants", default="default,xla_attn", help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--tag", default="")
    ap.add_argument("--parse", help="a stderr log of a run: print the per-call timelines of --calls")
    ap.add_argument("--calls", default="default/10/prefill/3,default/10/decode/3,default/10/tiny/3")
    ap.add_argument("--window-us", type=int, default=8000)
    ap.add_argument("--summary", action="store_true", help="with --parse: one line per call (times, nodes re-pointed)")
    args = H.parse(ap)
    if args.parse and args.summary:
        summary(args.parse)
    elif args.parse:
        parse(args.parse, args.calls.split(","), args.window_us)
    else:
        run(args)


if __name__ == "__main__":
    main()
