"""Where the host time of a prefill call goes before its graph starts (issue 5, docs/ENGINEERING_LOG.md session 12).

  PYTHONPATH=. python3 scripts/gpu_host_timeline.py --out $OUT/host [--shape llama2-7b] [--length 10]

Runs 63-64 measured ~1.0 ms of host time in a 10-token prefill call with the device idle, of which a plain
448-kernel command buffer costs ~0.1 ms (run 26); run 27 added ~0.5 ms with the 32 cuDNN attention calls. One
engine per variant on the same weights (default: cuDNN attention for the prompt's own bucket; `xla_attn`:
XLA's attention), and for each, with the device idle before every call (the previous outputs waited for, then
a 3 ms sleep):
  prefill   the call as Runtime.prefill makes it (numpy request); host time to return, and to the token read
  same      the same device request buffer every call
  decode    one greedy decode step
  tiny      a jitted x + 1 on 16 floats (what any call costs here)
Median of --reps calls. Each call is bracketed by `MARK` lines on stderr (time of day, microseconds) so that a
run with XLA's runtime logging on (TF_CPP_VMODULE, TF_CPP_MIN_LOG_LEVEL=0) can be cut into per-call host
timelines by --parse, or summed up one line per call (host times, graph nodes re-pointed) by --parse --summary.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def mark(label: str) -> None:
    now = datetime.datetime.now()
    sys.stderr.write(f"MARK {now.strftime('%H:%M:%S.%f')} {label}\n")
    sys.stderr.flush()


def run(args) -> None:
    import jax
    import jax.numpy as jnp

    from hybrid_jax import gemv as G
    from hybrid_jax import weights
    from hybrid_jax.engine import Engine
    from hybrid_jax.runtime import pack_request
    from shapes import shape_config  # scripts/ is this script's folder

    os.makedirs(args.out, exist_ok=True)
    cfg = shape_config(args.shape)
    params = weights.init_random(cfg, jax.random.PRNGKey(0))
    jax.block_until_ready(params)
    T = max(16, G.rows_padded(args.length))
    dev = jax.devices()[0]
    res = {"device": dev.device_kind, "jax": jax.__version__, "command": " ".join(sys.argv),
           "env": {k: v for k, v in os.environ.items() if k.startswith(("TF_CPP", "XLA_FLAGS", "HYBRID_JAX"))},
           "variants": {}}
    engines = {}
    for name in args.variants.split(","):
        kw = {"prefill_attention": None} if name == "xla_attn" else {}
        eng = Engine(cfg, params, max_seq_len=1024, prefill_buckets=(T,), compile_sampling=False,
                     background_compiles=False, **kw)
        eng.warmup()
        engines[name] = eng
    tiny = jax.jit(lambda x: x + 1)
    xs = jnp.zeros((16,), jnp.float32)
    tiny(xs).block_until_ready()
    rng = np.random.RandomState(0)
    toks = rng.randint(3, cfg.vocab_size, size=args.length).astype(np.int32)
    mark("begin")
    for name, eng in engines.items():
        rt = eng.runtime
        (spec, _), = rt.plan_prefill(args.length)
        ex = rt._get(spec)
        dex = rt._get(rt.decode_spec(100, False))
        req = pack_request(toks, T, (0, 0.0, None, None))
        same = jax.device_put(req, dev)
        r = {}

        def timed(label, fn):
            rets, reads = [], []
            for i in range(args.reps):
                time.sleep(0.003)
                mark(f"{name}/{label}/{i} call")
                t0 = time.perf_counter()
                out = fn()
                t1 = time.perf_counter()
                mark(f"{name}/{label}/{i} returned")
                jax.block_until_ready(out)
                t2 = time.perf_counter()
                mark(f"{name}/{label}/{i} ready")
                rets.append(t1 - t0)
                reads.append(t2 - t0)
            r[label] = {"return_ms": float(np.median(rets) * 1e3), "ready_ms": float(np.median(reads) * 1e3),
                        "return_ms_all": [round(x * 1e3, 4) for x in rets]}

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
        res["variants"][name] = r
    mark("end")
    for eng in engines.values():
        eng.close()
    with open(os.path.join(args.out, f"host_timeline{args.tag}.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"\n{res['device']}, jax {res['jax']}, {args.shape}, {args.length} tokens (bucket {T}); host ms, median "
          f"of {args.reps}, device idle before each call")
    print("| variant | prefill: return / ready | same buffer: return / ready | decode: return / ready "
          "| tiny jit: return | prefill back to back |")
    print("|---|---|---|---|---|---|")
    for name, r in res["variants"].items():
        print(f"| {name} | {r['prefill']['return_ms']:.3f} / {r['prefill']['ready_ms']:.3f} | "
              f"{r['same']['return_ms']:.3f} / {r['same']['ready_ms']:.3f} | "
              f"{r['decode']['return_ms']:.3f} / {r['decode']['ready_ms']:.3f} | {r['tiny']['return_ms']:.3f} | "
              f"{r['prefill_back_to_back_ms']:.3f} |")


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
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--length", type=int, default=10)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--variants", default="default,xla_attn")
    ap.add_argument("--tag", default="")
    ap.add_argument("--parse", help="a stderr log of a run: print the per-call timelines of --calls")
    ap.add_argument("--calls", default="default/prefill/3,default/decode/3,default/tiny/3")
    ap.add_argument("--window-us", type=int, default=8000)
    ap.add_argument("--summary", action="store_true", help="with --parse: one line per call (times, nodes re-pointed)")
    args = ap.parse_args()
    if args.parse and args.summary:
        summary(args.parse)
    elif args.parse:
        parse(args.parse, args.calls.split(","), args.window_us)
    else:
        run(args)


if __name__ == "__main__":
    main()
