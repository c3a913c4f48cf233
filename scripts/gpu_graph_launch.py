"""What does launching an executable of N small kernels cost the host (XLA command buffers = CUDA graphs),
and what makes it expensive? The 7B prefill call spends ~0.8-1.0 ms on the host before its graph runs
(runs 20, 24-25), about a decode step's worth of weights; its update of moved buffers was ruled out (run 25).

Each variant chains N Pallas kernels (x + 1 on 1024 floats; XLA cannot fuse custom calls) over a donated
state, and is called with the device idle, as a prefill is:
  stable     f(s) -> s                       every buffer at a fixed address
  fresh_out  f(s) -> (s, s[:8])              plus a new output buffer each call (the prefill's token)
  fresh_arg  f(s, x) -> s, x from the host   a new argument read by the first kernel (the prefill's request)
  arg_all    f(s, x) -> s                    the new argument read by every kernel
  sort       fresh_out + an argsort of 32000 floats after the chain (the prefill's sampling)
  argmax     fresh_out + an argmax of 32000 floats instead
Per variant and N: the host time of the call (median), and the time to the result.

  PYTHONPATH=. python3 scripts/gpu_graph_launch.py [--n 64,448] [--out $OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl


def add_one(s, x=None, interpret=False):
    if x is None:
        def k(s_ref, o_ref):
            o_ref[...] = s_ref[...] + 1.0
        return pl.pallas_call(k, out_shape=jax.ShapeDtypeStruct(s.shape, s.dtype), interpret=interpret)(s)

    def k2(s_ref, x_ref, o_ref):
        o_ref[...] = s_ref[...] + x_ref[...].astype(jnp.float32)
    return pl.pallas_call(k2, out_shape=jax.ShapeDtypeStruct(s.shape, s.dtype), interpret=interpret)(s, x)


def variant(name: str, n: int, interpret: bool):
    def chain(s, x=None, every=False):
        for i in range(n):
            s = add_one(s, x if (x is not None and (every or i == 0)) else None, interpret)
        return s

    if name == "stable":
        return jax.jit(lambda s: chain(s), donate_argnums=0), False
    if name == "fresh_out":
        return jax.jit(lambda s: (lambda t: (t, t[:8] * 2))(chain(s)), donate_argnums=0), False
    if name == "fresh_arg":
        return jax.jit(lambda s, x: chain(s, x), donate_argnums=0), True
    if name == "arg_all":
        return jax.jit(lambda s, x: chain(s, x, every=True), donate_argnums=0), True
    if name in ("sort", "argmax"):
        def f(s, v):
            t = chain(s)
            w = v * t[0]
            tok = jnp.argsort(-w)[0] if name == "sort" else jnp.argmax(w)
            return t, tok.astype(jnp.int32)
        return jax.jit(f, donate_argnums=0), "vocab"
    raise ValueError(name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", default="64,448")
    ap.add_argument("--calls", type=int, default=60)
    ap.add_argument("--variants", default="stable,fresh_out,fresh_arg,arg_all,sort,argmax")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    interpret = jax.devices()[0].platform == "cpu"
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "rows": []}
    v_host = np.random.RandomState(0).rand(32000).astype(np.float32)
    vocab = jax.device_put(v_host)
    for n in [int(v) for v in args.n.split(",")]:
        for name in args.variants.split(","):
            f, extra = variant(name, n, interpret)
            s = jnp.zeros((1024,), jnp.float32)
            calls, totals = [], []
            for i in range(args.calls + 5):
                x = np.full((1024,), i % 3, np.int32)
                t0 = time.perf_counter()
                if extra is True:
                    s = f(s, x)
                    r = s
                elif extra == "vocab":
                    s, r = f(s, vocab)
                else:
                    r = f(s)
                    s, r = (r if isinstance(r, tuple) else (r, r))
                t1 = time.perf_counter()
                jax.block_until_ready(r)
                jax.block_until_ready(s)
                t2 = time.perf_counter()
                if i >= 5:
                    calls.append((t1 - t0) * 1e6)
                    totals.append((t2 - t0) * 1e6)
            row = {"variant": name, "n": n, "call_us_p50": float(np.median(calls)), "call_us_p90": float(np.percentile(calls, 90)),
                   "total_us_p50": float(np.median(totals))}
            out["rows"].append(row)
            print(f"N={n:4d} {name:10s} call p50 {row['call_us_p50']:8.1f} us (p90 {row['call_us_p90']:8.1f}), "
                  f"to result {row['total_us_p50']:8.1f} us", flush=True)
            with open(os.path.join(args.out, "graph_launch.json"), "w") as fh:
                json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
