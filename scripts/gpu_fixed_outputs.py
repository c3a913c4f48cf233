"""Does a fresh output buffer cost the host its command-buffer updates? (issue 5, docs/ENGINEERING_LOG.md session 12)

  PYTHONPATH=. python3 scripts/gpu_fixed_outputs.py --out $OUT/fixed [--shape llama2-7b]

Run 76 (scripts/gpu_host_timeline.py with XLA's logging) showed every decode step re-pointing ~130 CUDA-graph
nodes, and every prefill ~70, before the graph launches. On the CPU, XLA's buffer assignment of the same step puts
the norms' rsqrt scalars (and other 4-byte temporaries) into the allocation of the step's one fresh output, the
next token (s32[]); that buffer is new at every call, so every node touching those scalars is updated at every
call. The variants of the decode step and the 16-row prefill, each returning the next token differently:
  base     as Runtime compiles it: (state, token), the token a new device buffer
  noout    the state only (the token stays in it): the floor of the call's host time; the host cannot read it
  pinned   the token in pinned host memory (out_shardings memory_kind="pinned_host"): a new buffer each call,
           but in another memory space than every temporary
  ring     the token written into a donated s32[1] buffer, two loaded instances of one compiled executable,
           each always given the same buffer (a and b, alternating); the prefill its own
Per variant: host time of one call with the device idle before it (return / token ready), the streaming loop as
Engine runs it (step n+1 enqueued before token n is read; ms per token), and the greedy tokens (equal to base's).
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
import jax.numpy as jnp  # noqa: E402

from hybrid_jax import gemv as G  # noqa: E402
from hybrid_jax import weights  # noqa: E402
from hybrid_jax.engine import Engine  # noqa: E402
from hybrid_jax.runtime import PREFILL_MATMULS, REQ_FIELDS, _decode_step, _prefill_step, pack_request  # noqa: E402
from shapes import shape_config  # noqa: E402  (scripts/ is this script's folder)

VARIANTS = ("base", "noout", "pinned", "ring")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--length", type=int, default=10)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    from jax.experimental import serialize_executable as se

    cfg = shape_config(args.shape)
    params = weights.init_random(cfg, jax.random.PRNGKey(0))
    jax.block_until_ready(params)
    T = max(16, G.rows_padded(args.length))
    eng = Engine(cfg, params, max_seq_len=1024, prefill_buckets=(T,), compile_sampling=False,
                 background_compiles=False)
    eng.warmup()
    rt = eng.runtime
    dev = jax.devices()[0]
    on_gpu = dev.platform == "gpu"
    dspec = rt.decode_spec(100, False)
    kvb = dspec[1]
    pspec = ("prefill", T, T)
    abs_req = rt._small((T + REQ_FIELDS,), jnp.int32)
    abs_buf = rt._small((1,), jnp.int32)
    st_sh = jax.tree.map(lambda a: a.sharding, rt.state)
    pinned = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host" if on_gpu else "unpinned_host")
    popts = PREFILL_MATMULS[rt.step_options(pspec).prefill_matmuls]

    def dec(p, s, *buf):
        st, nxt = _decode_step(cfg, kvb, False, p, s, rt.step_options(dspec))
        return st, nxt.reshape(1)

    def pre(p, s, req, *buf):
        st, nxt = _prefill_step(cfg, T, p, s, req, rt.step_options(pspec))
        return st, nxt.reshape(1)

    built = {}
    for v in args.variants.split(","):
        t0 = time.perf_counter()
        if v == "base":
            built[v] = (rt._get(pspec), rt._get(dspec))
        elif v == "noout":
            d = jax.jit(lambda p, s: dec(p, s)[0], donate_argnums=(1,)).lower(rt._abs_params, rt._abs_state).compile()
            f = jax.jit(lambda p, s, r: pre(p, s, r)[0], donate_argnums=(1,)).lower(
                rt._abs_params, rt._abs_state, abs_req).compile(compiler_options=popts)
            built[v] = (f, d)
        elif v == "pinned":
            d = jax.jit(dec, donate_argnums=(1,), out_shardings=(st_sh, pinned)).lower(
                rt._abs_params, rt._abs_state).compile()
            f = jax.jit(pre, donate_argnums=(1,), out_shardings=(st_sh, pinned)).lower(
                rt._abs_params, rt._abs_state, abs_req).compile(compiler_options=popts)
            built[v] = (f, d)
        elif v == "ring":
            d = jax.jit(dec, donate_argnums=(1, 2)).lower(rt._abs_params, rt._abs_state, abs_buf).compile()
            f = jax.jit(pre, donate_argnums=(1, 3)).lower(rt._abs_params, rt._abs_state, abs_req, abs_buf).compile(
                compiler_options=popts)
            blob = se.serialize(d)
            d2 = [se.deserialize_and_load(*blob, execution_devices=[dev]) for _ in range(2)]
            built[v] = (f, d2)
        print(f"built {v}: {time.perf_counter() - t0:.1f} s", flush=True)

    rng = np.random.RandomState(0)
    toks = rng.randint(3, cfg.vocab_size, size=args.length).astype(np.int32)
    req = pack_request(toks, T, (0, 0.0, None, None))
    res = {"device": dev.device_kind, "jax": jax.__version__, "command": " ".join(sys.argv), "shape": args.shape,
           "variants": {}}

    class Runner:
        """One variant's prefill and decode calls, with the token buffers the variant needs."""

        def __init__(self, v):
            self.v = v
            self.f, self.d = built[v]
            if v == "ring":
                self.bufs = [jax.device_put(np.zeros((1,), np.int32), dev) for _ in range(3)]  # a, b, prefill's
                self.i = 0

        def prefill(self, state):
            if self.v == "ring":
                state, self.bufs[2] = self.f(rt.params, state, req, self.bufs[2])
                return state, self.bufs[2]
            out = self.f(rt.params, state, req)
            return (out, None) if self.v == "noout" else out

        def decode(self, state):
            if self.v == "ring":
                i = self.i
                state, self.bufs[i] = self.d[i](rt.params, state, self.bufs[i])
                self.i ^= 1
                return state, self.bufs[i]
            out = self.d(rt.params, state)
            return (out, None) if self.v == "noout" else out

    for v in built:
        r = Runner(v)
        row = {}
        state = rt.state

        def idle_call(fn):
            nonlocal state
            rets, reads = [], []
            for _ in range(args.reps):
                time.sleep(0.003)
                t0 = time.perf_counter()
                state, tok = fn(state)
                t1 = time.perf_counter()
                jax.block_until_ready(state.token if tok is None else tok)
                t2 = time.perf_counter()
                rets.append(t1 - t0)
                reads.append(t2 - t0)
            return float(np.median(rets) * 1e3), float(np.median(reads) * 1e3)

        for _ in range(3):
            state, _ = r.prefill(state)
            state, _ = r.decode(state)
        jax.block_until_ready(state)
        row["prefill_return_ms"], row["prefill_ready_ms"] = idle_call(r.prefill)
        row["decode_return_ms"], row["decode_ready_ms"] = idle_call(r.decode)
        # greedy tokens and the streaming loop (depth 2, as Engine): prefill, then --steps decode steps
        streams = []
        for rep in range(3):
            jax.block_until_ready(state)
            t0 = time.perf_counter()
            state, tok = r.prefill(state)
            pending, out = [tok], []
            first = None
            for n in range(args.steps):
                state, tok = r.decode(state)
                pending.append(tok)
                t = pending.pop(0)
                out.append(-1 if t is None else int(np.asarray(t).reshape(-1)[0]))
                if first is None:
                    first = time.perf_counter() - t0
            last = pending.pop(0)
            out.append(-1 if last is None else int(np.asarray(last).reshape(-1)[0]))
            jax.block_until_ready(state)
            dt = time.perf_counter() - t0
            streams.append(((dt - first) / (args.steps - 1) * 1e3, first * 1e3))
        row["stream_ms_per_token"] = float(np.median([s[0] for s in streams]))
        row["stream_first_token_ms"] = float(np.median([s[1] for s in streams]))
        row["tokens"] = out[:16]
        # device time per step, back to back
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, tok = r.decode(state)
        jax.block_until_ready(state)
        row["pipelined_step_ms"] = (time.perf_counter() - t0) / args.steps * 1e3
        rt.state = state
        res["variants"][v] = row
        print(json.dumps({v: row}), flush=True)
    eng.close()
    with open(os.path.join(args.out, f"fixed_outputs_{args.shape}.json"), "w") as f:
        json.dump(res, f, indent=1)
    base = res["variants"].get("base", {}).get("tokens")
    print(f"\n{res['device']}, jax {res['jax']}, {args.shape}, prompt {args.length} (bucket {T}); host ms with the "
          f"device idle before each call (median of {args.reps})")
    print("| variant | prefill: return / ready | decode: return / ready | stream ms/token | stream first token "
          "| pipelined step | tokens = base |")
    print("|---|---|---|---|---|---|---|")
    for v, row in res["variants"].items():
        same = "n/a" if v == "noout" or base is None else str(row["tokens"] == base)
        print(f"| {v} | {row['prefill_return_ms']:.3f} / {row['prefill_ready_ms']:.3f} | {row['decode_return_ms']:.3f}"
              f" / {row['decode_ready_ms']:.3f} | {row['stream_ms_per_token']:.3f} | {row['stream_first_token_ms']:.3f}"
              f" | {row['pipelined_step_ms']:.3f} | {same} |")


if __name__ == "__main__":
    main()
