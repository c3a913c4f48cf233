"""GPU evidence for the hybrid runtime (issue 3): correctness on the device, compile/cold-start times,
TTFT and streaming TPOT of the runtime against plain jit (no AOT, no device-resident state) and, in a
subprocess, command buffers off. Writes JSON to $OUT and prints a table.

  PYTHONPATH=. python3 scripts/gpu_runtime_check.py --shape llama2-7b --out $OUT
  (worker mode: --worker NAME runs one system and prints one JSON line)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


def pct(xs, q):
    return float(np.percentile(np.asarray(xs) * 1e3, q)) if len(xs) else float("nan")


def compile_events():
    import jax
    box = {"n": 0}
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, dur, **kw: box.__setitem__("n", box["n"] + 1) if name == "/jax/core/compile/backend_compile_duration" else None)
    return box


def config_for(shape):
    from hybrid_jax.config import PRESETS, LlamaConfig
    return PRESETS[shape] if shape in PRESETS else LlamaConfig(
        vocab_size=512, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=512, dtype="float32")


def build_engine(shape, max_seq_len, cache_dir, extra=None):
    import jax
    from hybrid_jax import weights
    from hybrid_jax.engine import Engine
    cfg = config_for(shape)
    params = weights.init_random(cfg, jax.random.PRNGKey(0))
    jax.block_until_ready(params)
    t0 = time.perf_counter()
    eng = Engine(cfg, params, max_seq_len=max_seq_len, cache_dir=cache_dir, **(extra or {}))
    t_build = time.perf_counter() - t0
    return cfg, eng, t_build


def time_hybrid(eng, lengths, reps, new_tokens, events):
    from hybrid_jax.engine import generate
    rng = np.random.RandomState(0)
    out = {}
    for n in lengths:
        ids = list(rng.randint(3, eng.cfg.vocab_size, size=n))
        for _ in range(3):
            generate(eng, ids, max_new_tokens=new_tokens, ignore_eos=True)
        eng.runtime.wait_background()
        for _ in range(2):
            generate(eng, ids, max_new_tokens=new_tokens, ignore_eos=True)
        c0 = events["n"]
        ttft, itl = [], []
        for _ in range(reps):
            r = generate(eng, ids, max_new_tokens=new_tokens, ignore_eos=True)
            ttft.append(r.timings.ttft_s)
            itl += r.timings.itl_s
        out[n] = {"ttft": ttft, "itl": itl, "compiles_in_timed": events["n"] - c0}
    return out


def time_plain(cfg, params, max_seq_len, lengths, reps, new_tokens):
    """Plain jax.jit of the forward: cache passed in and returned (no donation), arrays built on the host
    each step, token read back each step."""
    import jax
    import jax.numpy as jnp
    from hybrid_jax import kv_cache, model
    fwd = jax.jit(lambda p, c, t, pos: model.forward(cfg, p, c, t, pos))
    rng = np.random.RandomState(0)
    out = {}
    for n in lengths:
        ids = np.asarray(rng.randint(3, cfg.vocab_size, size=n), np.int32)

        def run():
            c = kv_cache.zeros(cfg, max_seq_len)
            t0 = time.perf_counter()
            lg, c = fwd(params, c, jnp.asarray(ids), jnp.arange(n, dtype=jnp.int32))
            tok = int(jnp.argmax(lg[-1]))
            times = [time.perf_counter() - t0]
            last = time.perf_counter()
            pos = n
            for _ in range(new_tokens - 1):
                lg, c = fwd(params, c, jnp.asarray([tok], jnp.int32), jnp.asarray([pos], jnp.int32))
                tok = int(jnp.argmax(lg[-1]))
                pos += 1
                now = time.perf_counter()
                times.append(now - last)
                last = now
            return times
        for _ in range(3):
            run()
        ttft, itl = [], []
        for _ in range(reps):
            t = run()
            ttft.append(t[0])
            itl += t[1:]
        out[n] = {"ttft": ttft, "itl": itl}
    return out


def worker(args):
    import jax
    events = compile_events()
    res = {"system": args.worker, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "xla_flags": os.environ.get("XLA_FLAGS", "")}
    cache_dir = args.cache_dir or tempfile.mkdtemp()
    if args.worker == "plainjit":
        from hybrid_jax import weights
        cfg = config_for(args.shape)
        params = weights.init_random(cfg, jax.random.PRNGKey(0))
        res["points"] = time_plain(cfg, params, args.max_seq_len, args.lengths, args.reps, args.new_tokens)
    else:
        cfg, eng, t_build = build_engine(args.shape, args.max_seq_len, cache_dir,
                                         {"decode_kv_buckets": args.kv_buckets} if args.kv_buckets else None)
        res["build_s"] = t_build
        res["stats_after_build"] = eng.stats()
        if args.warmup_all:
            t0 = time.perf_counter()
            eng.warmup()
            res["warmup_s"] = time.perf_counter() - t0
        res["pipelined_step_s"] = [eng.pipelined_step_seconds(200) for _ in range(3)]
        res["points"] = time_hybrid(eng, args.lengths, args.reps, args.new_tokens, events)
        res["pipelined_step_s"] += [eng.pipelined_step_seconds(200) for _ in range(3)]
        res["stats"] = eng.stats()
        try:
            res["peak_bytes"] = jax.devices()[0].memory_stats().get("peak_bytes_in_use")
        except Exception:
            pass
    print("RESULT " + json.dumps(res), flush=True)


def correctness():
    """Tiny fp32 model on the device: the runtime's greedy tokens equal the argmax of a full forward."""
    from hybrid_jax.engine import generate
    cfg, eng, _ = build_engine("tiny", 256, tempfile.mkdtemp())
    rng = np.random.RandomState(1)
    ok = True
    for n in (1, 15, 16, 17, 33, 100):
        ids = list(rng.randint(3, cfg.vocab_size, size=n))
        r = generate(eng, ids, max_new_tokens=40, ignore_eos=True)
        lg = eng.logits(ids + r.token_ids)
        ref = list(np.argmax(lg[n - 1:-1], axis=-1))
        ok &= ref == r.token_ids
    return bool(ok)


def floors():
    """Device-to-device copy bandwidth (read + write bytes) and bf16 matmul rate, medians."""
    import jax
    import jax.numpy as jnp
    x = jax.random.normal(jax.random.PRNGKey(1), (512 * 2**20,), jnp.bfloat16)  # 1 GiB
    cp = jax.jit(lambda a: a * 1)
    a = jax.random.normal(jax.random.PRNGKey(2), (8192, 8192), jnp.bfloat16)
    mm = jax.jit(lambda u, v: u @ v)
    out = {}
    for name, f, args, work in (("copy_GBps", cp, (x,), 2 * x.size * 2), ("matmul_TFLOPs", mm, (a, a), 2 * 8192**3)):
        f(*args).block_until_ready()
        ts = []
        for _ in range(20):
            t0 = time.perf_counter()
            f(*args).block_until_ready()
            ts.append(time.perf_counter() - t0)
        out[name] = work / float(np.median(ts)) / (1e9 if name == "copy_GBps" else 1e12)
    return out


def summarize_dump(d, results):
    import glob
    files = glob.glob(os.path.join(d, "*decode_step*thunk_sequence_after_thunk_passes.txt"))
    info = []
    for fn in files:
        txt = open(fn).read()
        info.append({"file": os.path.basename(fn), "kCommandBuffer": txt.count("kCommandBuffer"),
                     "lines": txt.count("\n"), "head": txt[:1500]})
    results["dump"] = info
    subprocess.run(["tar", "czf", os.path.join(os.path.dirname(d), "dump.tgz"), "-C", d, "."])
    subprocess.run(["rm", "-rf", d])


def summary(r):
    pts = r["points"]
    ttft = ", ".join(f"{n}:{pct(v['ttft'], 50):.2f}" for n, v in pts.items())
    itl = sum((v["itl"] for v in pts.values()), [])
    pipe = r.get("pipelined_step_s")
    return (f"build {r.get('build_s', 0):.1f}s stats {r.get('stats', {})} TTFT p50 ms {ttft}; TPOT p50 {pct(itl, 50):.3f} "
            f"p99 {pct(itl, 99):.3f} ms; pipelined {np.median(pipe) * 1e3 if pipe else float('nan'):.3f} ms")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--lengths", default="10,100,500")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--kv-buckets", default="")
    ap.add_argument("--systems", default="hybrid,plainjit,hybrid_nocb")
    ap.add_argument("--worker", default=None)
    ap.add_argument("--warmup-all", action="store_true")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.kv_buckets = [int(x) for x in args.kv_buckets.split(",") if x]
    if args.worker:
        return worker(args)
    results = {"correct_tiny_gpu": correctness()}
    print("tiny-model device correctness:", results["correct_tiny_gpu"], flush=True)
    cache_dir = tempfile.mkdtemp()
    runs = []
    for system in args.systems.split(","):
        env = dict(os.environ)
        name = system
        if system == "hybrid_nocb":
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()
            name = "hybrid"
        if system == "hybrid_warm":
            name = "hybrid"
        if system == "dump":  # XLA dump of the decode step: is it one command buffer?
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_dump_to={args.out}/dump"
                                " --xla_dump_hlo_module_re=decode_step").strip()
            name = "hybrid"
        small = system == "dump"
        cmd = [sys.executable, __file__, "--worker", name, "--shape", args.shape, "--lengths",
               "10" if small else ",".join(map(str, args.lengths)), "--reps", "1" if small else str(args.reps),
               "--new-tokens", "8" if small else str(args.new_tokens),
               "--max-seq-len", str(args.max_seq_len), "--kv-buckets", ",".join(map(str, args.kv_buckets)),
               "--cache-dir", cache_dir if system in ("hybrid", "hybrid_warm") else tempfile.mkdtemp()]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        if not line:
            print(f"{system} FAILED rc={p.returncode}\n{p.stderr[-3000:]}", flush=True)
            continue
        r = json.loads(line[0][7:])
        r["label"] = system
        r["process_wall_s"] = wall
        runs.append(r)
        with open(os.path.join(args.out, f"runtime_check_{args.shape}_{system}.json"), "w") as f:
            json.dump(r, f)
        print(f"{system}: done in {wall:.0f}s; " + summary(r), flush=True)
    results["runs"] = runs
    results["floors"] = floors()
    if os.path.isdir(os.path.join(args.out, "dump")):
        summarize_dump(os.path.join(args.out, "dump"), results)
    with open(os.path.join(args.out, f"runtime_check_{args.shape}.json"), "w") as f:
        json.dump(results, f)
    print(json.dumps({k: v for k, v in results.items() if k != "runs"})[:3000])
    print("\n| system | build s | compiles | TTFT p50 ms (" + ",".join(map(str, args.lengths)) +
          ") | TPOT p50 ms | TPOT p99 ms | pipelined ms | compiles in timed |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        pts = r["points"]
        ttft = ", ".join(f"{pct(v['ttft'], 50):.2f}" for v in pts.values())
        itl = sum((v["itl"] for v in pts.values()), [])
        pipe = r.get("pipelined_step_s")
        cit = sum(v.get("compiles_in_timed", 0) for v in pts.values())
        print(f"| {r['label']} | {r.get('build_s', 0):.1f} | {r.get('stats', {}).get('compiles', '-')} | {ttft} | "
              f"{pct(itl, 50):.3f} | {pct(itl, 99):.3f} | {np.median(pipe) * 1e3 if pipe else float('nan'):.3f} | {cit} |")


if __name__ == "__main__":
    main()
