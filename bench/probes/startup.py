"""Start-up: process start to the first token, with an empty and a warm executable cache, and `warmup`'s time.

    python3 -m bench.probes.startup --model DIR --out $OUT       # a converted model, through the command line
    python3 -m bench.probes.startup --shape llama2-7b --out $OUT  # random weights of a shape, made on the device

--model times what a user runs: `hybrid-jax generate --model DIR --max-new-tokens 1 --stats` in a new process
with an empty executable cache (a folder of its own), then `hybrid-jax warmup` into another empty cache, then
`generate` again --warm-runs times from that warm cache. --shape does the same in a child process that makes the
weights on the device (no checkpoint to read): build the engine, one token, then (the empty-cache child only)
`engine.warmup()`. Each run's wall clock is from before the process is spawned to its exit (--model) or to its
first token on the host (--shape), with the child's own stamps (imports, weights, engine ready, TTFT). Writes
startup.json and prints a table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from bench.probes.cpu_first_answer import _cli
from bench.probes.harness import parse, parser, write_json

# The --shape child: stamps relative to the spawn time passed in argv[1], as one JSON line on stdout.
CHILD = r"""
import json, sys, time
t_spawn = float(sys.argv[1])
st = {"python_s": time.time() - t_spawn}
import jax
from hybrid_jax import weights as W
from hybrid_jax.engine import Engine, generate
from bench.probes.harness import shape_config
st["imports_s"] = time.time() - t_spawn
cfg = shape_config(sys.argv[2])
params = jax.block_until_ready(W.init_random(cfg, jax.random.PRNGKey(0)))
st["weights_s"] = time.time() - t_spawn
eng = Engine(cfg, params, max_seq_len=int(sys.argv[4]), cache_dir=sys.argv[3])
st["ready_s"] = time.time() - t_spawn
r = generate(eng, [1] * 10, max_new_tokens=1, ignore_eos=True)
st["first_token_s"] = time.time() - t_spawn
st["ttft_ms"] = r.timings.ttft_s * 1e3
s = eng.stats()
st["compiles"], st["cache_hits"] = s["compiles"], s["cache_hits"]
if sys.argv[5] == "warmup":
    t0 = time.perf_counter()
    eng.warmup(progress=False)
    st["warmup_s"] = time.perf_counter() - t0
    st["warmup_compiles"] = eng.stats()["compiles"] - s["compiles"]
eng.close()
print("STARTUP " + json.dumps(st), flush=True)
"""


def _run(cmd: list[str], env: dict, timeout: float) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed ({r.returncode}): {r.stderr[-3000:]}")
    return time.perf_counter() - t0, r


def cli_runs(model: str, warm_runs: int, timeout: float) -> dict:
    """The command line on a converted model: generate with an empty cache, warmup into another, then
    generate from it."""
    env = dict(os.environ)

    def one(cache: str) -> dict:
        return _cli(env, ("--model", model, "--max-new-tokens", "1", "--cache-dir", cache), timeout)

    with tempfile.TemporaryDirectory() as d:
        out = {"empty": one(os.path.join(d, "empty"))}
        wall, r = _run([sys.executable, "-m", "hybrid_jax", "warmup", "--model", model, "--no-progress",
                        "--cache-dir", os.path.join(d, "warm")], env, timeout)
        out["warmup"] = {"wall_s": round(wall, 2), "says": r.stdout.strip().splitlines()[-1] if r.stdout else ""}
        out["warm"] = [one(os.path.join(d, "warm")) for _ in range(warm_runs)]
    return out


def shape_runs(shape: str, max_seq_len: int, warm_runs: int, timeout: float) -> dict:
    """Random weights of `shape` in a child process: empty cache (then warmup), warm cache."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)}

    def one(cache: str, then: str) -> dict:
        t = time.time()
        wall, r = _run([sys.executable, "-c", CHILD, repr(t), shape, cache, str(max_seq_len), then], env, timeout)
        line = next(x for x in r.stdout.splitlines() if x.startswith("STARTUP "))
        st = json.loads(line[len("STARTUP "):])
        st["process_s"] = round(wall, 2)
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in st.items()}

    with tempfile.TemporaryDirectory() as d:
        cache = os.path.join(d, "cache")
        return {"empty": one(cache, "warmup"), "warm": [one(cache, "-") for _ in range(warm_runs)]}


def _device() -> dict:
    """The device and versions, from a process of their own (this one must leave the GPU's memory to the runs)."""
    code = ("import json, jax; print(json.dumps({'device': jax.devices()[0].device_kind, 'jax': jax.__version__}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {"device": None}


def main(argv=None) -> None:
    ap = parser(__doc__, shape=None)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="a converted model folder (the command line's runs)")
    g.add_argument("--shape", help="random weights of this shape (bench.probes.harness.shape_config)")
    ap.add_argument("--max-seq-len", type=int, default=2048, help="--shape: the engine's cache length")
    ap.add_argument("--warm-runs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=900, help="seconds a process may take")
    args = parse(ap, argv)
    rec = {"run": {**_device(), "xla_flags": os.environ.get("XLA_FLAGS", "")}, "args": vars(args)}
    if args.model:
        rec["cli"] = cli_runs(args.model, args.warm_runs, args.timeout)
    else:
        rec["shape"] = shape_runs(args.shape, args.max_seq_len, args.warm_runs, args.timeout)
    write_json(os.path.join(args.out, "startup.json"), rec)

    print(f"\n{rec['run'].get('device')}: {args.model or args.shape}")
    if args.model:
        c = rec["cli"]
        print(f"{'run':10s} {'process s':>10s} {'ready s':>8s} {'TTFT ms':>8s}")
        for name, r in [("empty", c["empty"])] + [(f"warm {i}", r) for i, r in enumerate(c["warm"])]:
            print(f"{name:10s} {r['wall_s']:10.2f} {r['ready_s'] or 0:8.2f} {r['ttft_ms'] or 0:8.2f}")
        print(f"hybrid-jax warmup (empty cache): {c['warmup']['wall_s']:.1f} s; {c['warmup']['says']}")
        return
    s = rec["shape"]
    print(f"{'run':10s} {'imports':>8s} {'weights':>8s} {'ready':>8s} {'1st tok':>8s} {'TTFT ms':>8s} {'compiled':>8s}")
    for name, r in [("empty", s["empty"])] + [(f"warm {i}", r) for i, r in enumerate(s["warm"])]:
        print(f"{name:10s} {r['imports_s']:8.2f} {r['weights_s']:8.2f} {r['ready_s']:8.2f} {r['first_token_s']:8.2f} "
              f"{r['ttft_ms']:8.2f} {r['compiles']:8d}")
    print(f"engine.warmup() after the empty start: {s['empty']['warmup_s']:.1f} s, "
          f"{s['empty']['warmup_compiles']} compiles")


if __name__ == "__main__":
    main()
