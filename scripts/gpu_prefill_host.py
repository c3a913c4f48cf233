"""Where does the prefill call's host time go (~0.8-1.0 ms before its graph starts, run 20), and is it the
command buffer's update when buffer addresses move between calls? Run once per XLA setting, each in its own
process (XLA_FLAGS and the allocator are read once):

  PYTHONPATH=. python3 scripts/gpu_prefill_host.py --tag default
  XLA_PYTHON_CLIENT_ALLOCATOR=vmm XLA_FLAGS=--xla_gpu_command_buffer_update_mode=SKIP_TEMP \
      PYTHONPATH=. python3 scripts/gpu_prefill_host.py --tag vmm_skip_temp

Per prompt length (10 / 100 / 500 tokens, the suite's prompts, one per rep): generate()'s TTFT, and a
request done by hand (prefill call, first decode step enqueued, first token read) with the host time of the
prefill call itself. Then the pipelined decode step (a setting must not slow it), and a profiler trace of a
few requests at 100 tokens, copied to $OUT with a summary of the host events inside the prefill calls.
Writes prefill_host_<tag>.json (and with --keep-trace trace_<tag>.json.gz) under --out.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import jax  # noqa: E402


def host_summary(trace_path: str, marker: str = "hj_prefill_call") -> dict:
    """Host events that lie inside the `marker` annotations, by name: total us per call and count per call;
    and per call the delay from the marker's start to the first device kernel that starts after it."""
    with gzip.open(trace_path) as f:
        tr = json.load(f)
    ev = tr["traceEvents"] if isinstance(tr, dict) else tr
    pname = {e["pid"]: e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {p for p, n in pname.items() if "gpu" in n.lower()}
    xs = [e for e in ev if e.get("ph") == "X"]
    calls = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in xs if e["name"] == marker)
    by = collections.defaultdict(lambda: [0.0, 0])
    for e in xs:
        if e["pid"] in gpu or e["name"] == marker:
            continue
        a = float(e["ts"])
        if any(s <= a < t for s, t in calls):
            by[e["name"]][0] += float(e.get("dur", 0))
            by[e["name"]][1] += 1
    kstarts = sorted(float(e["ts"]) for e in xs if e["pid"] in gpu)
    first = []
    for s, t in calls:
        k = next((k for k in kstarts if k >= s), None)
        first.append(None if k is None else round(k - s, 1))
    offsets = []  # per call: when (us after the call starts) each of these host events first starts
    keys = ("DevicePut", "Thunks::Initialize", "command_buffer::update", "command_buffer::execute", "cuGraphLaunch")
    for s, t in calls:
        inside = sorted((float(e["ts"]) - s, e["name"]) for e in xs
                        if e["pid"] not in gpu and s <= float(e["ts"]) < t)
        offsets.append({k: next((round(o, 1) for o, nm in inside if nm.startswith(k)), None) for k in keys})
    n = max(len(calls), 1)
    top = sorted(by.items(), key=lambda kv: -kv[1][0])[:40]
    return {"calls": len(calls), "call_us": [round(t - s, 1) for s, t in calls], "first_kernel_after_us": first,
            "first_start_after_us": offsets,
            "top": [{"name": k[:120], "us_per_call": round(v[0] / n, 1), "count_per_call": round(v[1] / n, 2)}
                    for k, v in top]}


def random_engine(shape: str, lengths, params=None, cache_dir=None, **engine_kw):
    """(cfg, params, engine) for a preset shape ("tiny": a 2-layer dry run for the CPU) with random weights
    (or `params`), max_seq_len 1024, an executable cache in `cache_dir` (default a fresh folder), and each
    length's own prefill bucket compiled."""
    from hybrid_jax import weights
    from hybrid_jax.config import PRESETS, LlamaConfig
    from hybrid_jax.engine import Engine
    cfg = PRESETS.get(shape) or LlamaConfig(vocab_size=512, dim=256, n_layers=2, n_heads=8, n_kv_heads=2,
                                            ffn_dim=512, dtype="bfloat16")
    if params is None:
        params = weights.init_random(cfg, jax.random.PRNGKey(0))
        jax.block_until_ready(params)
    eng = Engine(cfg, params, max_seq_len=1024, cache_dir=cache_dir or tempfile.mkdtemp(), compile_sampling=False,
                 **engine_kw)
    rt = eng.runtime
    for n in lengths:
        rt._get(("prefill", rt.bucket_for(n), rt.bucket_for(n)))
    return cfg, params, eng


def request(rt, ids, new: int = 16):
    """One request as generate() does it: prefill, first decode step enqueued, first token read."""
    t0 = time.perf_counter()
    with jax.profiler.TraceAnnotation("hj_prefill_call"):
        state, tok = rt.prefill(rt.state, ids, request=(0, 0.0, None, None))
    t1 = time.perf_counter()
    pos = len(ids)
    state, nxt = rt.decode(state, rt.decode_spec(pos, False))
    int(np.asarray(tok))
    t2 = time.perf_counter()
    for _ in range(new - 2):
        pos += 1
        state, nxt2 = rt.decode(state, rt.decode_spec(pos, False))
        int(np.asarray(nxt))
        nxt = nxt2
    int(np.asarray(nxt))
    rt.state = state
    return (t1 - t0) * 1e3, (t2 - t0) * 1e3


def reset_then_prefill(rt, ids):
    """A request as before session 4's packed request: a separate state reset, the prefill, the read.
    (host seconds of the reset, host seconds of the prefill call, seconds to the token read)"""
    a = time.perf_counter()
    st = rt.reset_state(rt.state.cache)
    b = time.perf_counter()
    st, tok = rt.prefill(st, ids)
    c = time.perf_counter()
    int(np.asarray(tok))
    d = time.perf_counter()
    rt.state = st
    return b - a, c - b, d - a


def back_to_back(rt, ids, k: int) -> float:
    """Seconds per prefill with k fresh requests queued back to back and one read at the end: the device's
    time per prefill (the host's work overlaps it)."""
    st = rt.state
    jax.block_until_ready(st)
    t0 = time.perf_counter()
    for _ in range(k):
        st, tok = rt.prefill(st, ids, request=(0, 0.0, None, None))
    tok.block_until_ready()
    rt.state = st
    return (time.perf_counter() - t0) / k


def engine_ab(engines: dict, vocab: int, lengths, reps: int, on_length=None) -> dict:
    """Same-process A/B of prefill variants: per prompt length, generate()'s TTFT and the prefill's device
    time (back to back) of every engine, the engines alternated rep by rep (the suite's prompts, one per rep),
    and the first 8 generated tokens of the first 3 reps compared with the first engine's. Calls
    on_length(results) after each length. Returns {name: {length: row}}."""
    from bench.worker import prompt_ids
    from hybrid_jax.engine import generate
    names = list(engines)
    for e in engines.values():  # warm
        for n in lengths:
            for rep in range(2):
                generate(e, prompt_ids(vocab, n, rep, 0), max_new_tokens=4, ignore_eos=True)
    res = {k: {} for k in names}
    for n in lengths:
        acc = {k: {"ttft": [], "device": [], "tokens": []} for k in names}
        for rep in range(reps):
            ids = prompt_ids(vocab, n, rep, 0)
            for k in (names if rep % 2 == 0 else names[::-1]):
                r = generate(engines[k], ids, max_new_tokens=8, ignore_eos=True)
                acc[k]["ttft"].append(r.timings.ttft_s * 1e3)
                if rep < 3:
                    acc[k]["tokens"].append([int(t) for t in r.token_ids])
                acc[k]["device"].append(back_to_back(engines[k].runtime, ids, 5) * 1e3)
        base = acc[names[0]]["tokens"]
        for k in names:
            a = acc[k]
            res[k][n] = {"ttft_p50": float(np.median(a["ttft"])), "ttft_max": float(max(a["ttft"])),
                         "device_p50": float(np.median(a["device"])), "tokens": a["tokens"],
                         f"tokens_equal_{names[0]}": [x == y for x, y in zip(a["tokens"], base)],
                         "ttft_all": [round(v, 3) for v in a["ttft"]]}
            print(f"[{k:8s}] {n:4d} tok: TTFT p50 {res[k][n]['ttft_p50']:.2f} ms (max {res[k][n]['ttft_max']:.2f}), "
                  f"prefill device {res[k][n]['device_p50']:.2f} ms, tokens = {names[0]}'s: "
                  f"{res[k][n][f'tokens_equal_{names[0]}']}", flush=True)
        if on_length is not None:
            on_length(res)
    print(f"\n{'variant':10s}" + "  ".join(f"{n:>5d} tok TTFT/dev" for n in lengths))
    for k in names:
        print(f"{k:10s}" + "  ".join(f"{res[k][n]['ttft_p50']:7.2f}/{res[k][n]['device_p50']:5.2f}" for n in lengths))
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tag", default="default")
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--lengths", default="10,100,500")
    ap.add_argument("--keep-trace", action="store_true", help="copy the profiler trace to --out")
    ap.add_argument("--host-only", action="store_true", help="no Python tracer, and device tracer level 0 (meant "
                    "to drop CUPTI, which inflates graph launches; jax 0.11.2 still traced the device, run 28)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    from bench.worker import prompt_ids
    from hybrid_jax.engine import generate
    lengths = [int(x) for x in args.lengths.split(",")]
    cfg, _, eng = random_engine(args.shape, lengths)
    rt = eng.runtime
    out = {"tag": args.tag, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "compiles_s": rt.stats()["compile_seconds"],
           "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "allocator": os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR", "")}
    path = os.path.join(args.out, f"prefill_host_{args.tag}.json")

    def save():
        with open(path, "w") as f:
            json.dump(out, f, indent=1)

    for n in lengths:  # warm each bucket
        for rep in range(3):
            request(rt, prompt_ids(cfg.vocab_size, n, rep, 0))
    rows = {}
    for n in lengths:
        gen, call, ttft = [], [], []
        for rep in range(args.reps):
            ids = prompt_ids(cfg.vocab_size, n, rep, 0)
            gen.append(generate(eng, ids, max_new_tokens=32, ignore_eos=True).timings.ttft_s * 1e3)
            c, t = request(rt, ids, 32)
            call.append(c)
            ttft.append(t)
        rows[n] = {"generate_ttft_ms": [round(v, 3) for v in gen], "call_ms": [round(v, 3) for v in call],
                   "request_ttft_ms": [round(v, 3) for v in ttft],
                   "p50": {"generate_ttft_ms": float(np.median(gen)), "call_ms": float(np.median(call)),
                           "request_ttft_ms": float(np.median(ttft))}}
        print(f"[{args.tag}] {n:4d} tok: generate TTFT p50 {np.median(gen):.2f} ms (min {min(gen):.2f} max "
              f"{max(gen):.2f}); prefill call p50 {np.median(call):.2f} ms; request TTFT p50 {np.median(ttft):.2f}",
              flush=True)
        out["ttft"] = rows
        save()
    out["step_ms"] = eng.pipelined_step_seconds(100) * 1e3
    print(f"[{args.tag}] pipelined decode step {out['step_ms']:.3f} ms", flush=True)
    save()
    d = tempfile.mkdtemp()
    n = 100 if 100 in lengths else lengths[0]
    kw = {}
    if args.host_only:
        opts = jax.profiler.ProfileOptions()
        opts.device_tracer_level = 0
        opts.python_tracer_level = 0
        kw["profiler_options"] = opts
    with jax.profiler.trace(d, create_perfetto_trace=True, **kw):
        for rep in range(4):
            request(rt, prompt_ids(cfg.vocab_size, n, rep, 0), 8)
        time.sleep(0.1)
    paths = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)
    if paths:
        if args.keep_trace:
            shutil.copy(paths[0], os.path.join(args.out, f"trace_{args.tag}.json.gz"))
        try:
            out["host"] = host_summary(paths[0])
            h = out["host"]
            print(f"[{args.tag}] traced prefill calls (us): {h['call_us']}; first kernel after the call starts: "
                  f"{h['first_kernel_after_us']}", flush=True)
            print(f"[{args.tag}] first start of (us after the call starts): {h['first_start_after_us']}", flush=True)
            for r in h["top"][:25]:
                print(f"   {r['us_per_call']:8.1f} us x{r['count_per_call']:6.2f}  {r['name']}")
        except Exception as e:  # noqa: BLE001
            out["host_error"] = f"{type(e).__name__}: {e}"
    save()
    eng.close()


if __name__ == "__main__":
    main()
