"""What does a background compile cost the request being decoded beside it? (issue 5, runs 48, 56)

  PYTHONPATH=. python3 scripts/gpu_bg_compile.py --out $OUT [--shape llama2-7b] [--variants ...]

A prompt whose bucket is not compiled queues the bucket's compile in the background and is served by
compiled buckets meanwhile (runtime.plan_prefill). Runs 44 and 46 saw pipelined decode steps of 7.8-13.8 ms
(3.9 ms otherwise) while such a compile ran: the compile's Python tracing holds the GIL (the decoding
thread waits for it to dispatch each step) and XLA's autotuning runs kernels on the same GPU. One engine
(random weights, its buckets compiled), then per variant a fresh bucket (a new length T, so that XLA's
in-process autotuning cache cannot serve it) compiled in the background while 10-token requests of 128
tokens are generated back to back until the compile ends:

  idle          no compile (the reference)
  bg            the runtime's background compile as it is (from 256 rows through cuBLAS, not autotuned)
  bg_switch     the same, sys.setswitchinterval(1e-4) while generating (the GIL changes hands sooner)
  bg_noautotune the compile with xla_gpu_autotune_level=0 (no kernels timed on the device)
  bg_both       both

Per variant: inter-token intervals (p50/p90/p99/max, mean), the compile's wall time, and then TTFT of a
T-token prompt through the new bucket. Every length in --lengths is made a bucket of its own, so no timed
prompt queues another bucket's compile (runs 48-50 had that flaw). Writes bg_compile.json; prints a table.

`--prefill-only MODE[,MODE...]` instead compiles each --lengths bucket in the foreground once per mode
(PREFILL_OPTIONS: autotune, noautotune, noautotune_cublas and variants) and times it in this process: TTFT,
prefills back to back, and the call's own time with the device idle (dispatch); `--dump DIR` adds XLA's dump
of each executable (runs 51-55).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

# --prefill-only: the bucket's compile options
_CUBLAS = {"xla_gpu_autotune_level": 0, "xla_gpu_enable_triton_gemm": False}
PREFILL_OPTIONS = {"autotune": {}, "noautotune": {"xla_gpu_autotune_level": 0},
                   # cuBLAS's own heuristics for every matmul, nothing timed on the device
                   "noautotune_cublas": _CUBLAS,
                   # the same two with the XLA path's projections written as 2-D matmuls (KernelOptions.matmul_2d)
                   "autotune_2d": {}, "noautotune_cublas_2d": _CUBLAS,
                   # cuBLAS's heuristics with the cuBLAS calls named in the command buffers' categories
                   "noautotune_cublas_cb": {**_CUBLAS, "xla_gpu_enable_command_buffer":
                                            "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN"},
                   # cuBLAS's heuristics with the cuBLAS calls (and the slices around them) launched outside the
                   # command buffers: a graph update re-records every cuBLAS node (run 51b's lead)
                   "noautotune_cublas_nogemmcb": {**_CUBLAS,
                                                  "xla_gpu_enable_command_buffer": "FUSION,CUSTOM_CALL,CUDNN"}}
VARIANTS = {"idle": {}, "bg": {"bg": True}, "bg_switch": {"bg": True, "switch": True},
            "bg_noautotune": {"bg": True, "noautotune": True},
            "bg_both": {"bg": True, "switch": True, "noautotune": True}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--lengths", default="256,384,640,768,896", help="a fresh bucket length per variant")
    ap.add_argument("--max-seconds", type=float, default=40.0, help="stop generating after this long")
    ap.add_argument("--prefill-only",
                    help="instead: compile each --lengths bucket in the foreground with or without XLA's "
                         "autotuning and time its prefill (run once per choice, one process each: XLA's "
                         "autotuning results are cached per process)")
    ap.add_argument("--dump", help="with --prefill-only: XLA's dump of each compiled bucket under DIR/MODE_T")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    from hybrid_jax import weights
    from shapes import shape_config  # scripts/ is this script's folder
    from hybrid_jax.engine import Engine, generate
    cfg = shape_config(args.shape)
    params = weights.init_random(cfg, jax.random.PRNGKey(0))
    jax.block_until_ready(params)
    eng = Engine(cfg, params, max_seq_len=1024, cache_dir=tempfile.mkdtemp(), prefill_buckets=(16, 1024),
                 use_disk_cache=False)
    rt = eng.runtime
    rng = np.random.RandomState(0)
    prompt = [int(t) for t in rng.randint(3, cfg.vocab_size, size=10)]
    generate(eng, prompt, max_new_tokens=16, ignore_eos=True)
    eng.wait_background()
    generate(eng, prompt, max_new_tokens=16, ignore_eos=True)
    lower = rt._lower
    # Each length its own bucket. Otherwise a T-token prompt's own bucket is the engine's 1024 one, which the
    # first such prompt queues for a background compile, and the timings that follow run beside that compile
    # (and then through the 1024-row bucket): runs 48-50 had that flaw (docs/ENGINEERING_LOG.md, session 9).
    rt.buckets = tuple(sorted(set(rt.buckets) | {int(x) for x in args.lengths.split(",")}))
    if args.prefill_only:
        return prefill_only(eng, cfg, args, rng)
    names = args.variants.split(",")
    lengths = [int(x) for x in args.lengths.split(",")]
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "shape": args.shape,
           "pipelined_step_ms": eng.pipelined_step_seconds(200) * 1e3, "variants": {}}
    li = 0
    for name in names:
        v = VARIANTS[name]
        T = None
        fut = None
        if v.get("bg"):
            T = lengths[li % len(lengths)]
            li += 1
            spec = ("prefill", T, T)

            class _Opts:  # the runtime's lowering, compiled with the variant's options
                def __init__(self, low):
                    self.low = low

                def compile(self, compiler_options=None):
                    return self.low.compile(compiler_options={**(compiler_options or {}),
                                                              "xla_gpu_autotune_level": 0})

            rt._lower = (lambda s: _Opts(lower(s))) if v.get("noautotune") else lower
        old_switch = sys.getswitchinterval()
        itl, gens = [], 0
        t0 = time.perf_counter()
        if v.get("bg"):
            fut = rt._get_async(spec)
        if v.get("switch"):
            sys.setswitchinterval(1e-4)
        try:
            while True:
                g = generate(eng, prompt, max_new_tokens=128, ignore_eos=True)
                itl += g.timings.itl_s
                gens += 1
                if fut is None and gens >= 4:
                    break
                if fut is not None and fut.done():
                    break
                if time.perf_counter() - t0 > args.max_seconds:
                    break
        finally:
            sys.setswitchinterval(old_switch)
        compile_s = None
        if fut is not None:
            fut.result()
            compile_s = time.perf_counter() - t0
        rt._lower = lower
        a = np.asarray(itl) * 1e3
        p = np.percentile(a, [50, 90, 99])
        r = {"T": T, "generations": gens, "compile_wall_s": compile_s, "itl_mean_ms": float(a.mean()),
             "itl_p50_ms": float(p[0]), "itl_p90_ms": float(p[1]), "itl_p99_ms": float(p[2]),
             "itl_max_ms": float(a.max()), "itl_ms": a.tolist()}
        if T is not None:  # the new bucket's own prefill
            long_prompt = [int(t) for t in rng.randint(3, cfg.vocab_size, size=T)]
            ttft = []
            for _ in range(6):
                ttft.append(generate(eng, long_prompt, max_new_tokens=2, ignore_eos=True).timings.ttft_s)
            r["ttft_T_p50_ms"] = float(np.percentile(ttft[1:], 50) * 1e3)
            r["prefill_chunks"] = rt.last_prefill_chunks
            assert rt.plan_prefill(T) == [(spec, T)] and not rt._pending, (rt.plan_prefill(T), list(rt._pending))
        key = name if name not in out["variants"] else f"{name}_{T}"  # a variant named twice keeps both rows
        out["variants"][key] = r
        print(json.dumps({k: x for k, x in r.items() if k != "itl_ms"}), flush=True)
        with open(os.path.join(args.out, "bg_compile.json"), "w") as f:
            json.dump(out, f)
    print(f"pipelined step {out['pipelined_step_ms']:.3f} ms ({out['device']})")
    print("| variant | T | compile s | generations | ITL mean | p50 | p90 | p99 | max | TTFT(T) p50 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in out["variants"].items():
        cs = f"{r['compile_wall_s']:.1f}" if r["compile_wall_s"] is not None else "-"
        tt = f"{r['ttft_T_p50_ms']:.2f}" if "ttft_T_p50_ms" in r else "-"
        print(f"| {name} | {r['T'] or '-'} | {cs} | {r['generations']} | {r['itl_mean_ms']:.3f} | "
              f"{r['itl_p50_ms']:.3f} | "
              f"{r['itl_p90_ms']:.3f} | {r['itl_p99_ms']:.3f} | {r['itl_max_ms']:.2f} | {tt} |")
    eng.close()


def prefill_only(eng, cfg, args, rng):
    """TTFT and back-to-back prefill time of a T-token prompt through its own bucket, compiled now with or
    without XLA's autotuning (several `--prefill-only` choices, comma-separated: one after the other), for
    each of `--lengths` in turn."""
    rt = eng.runtime
    base = rt.options
    rows = []
    for T in [int(x) for x in args.lengths.split(",")]:
        spec = ("prefill", T, T)
        ids = [int(t) for t in rng.randint(3, cfg.vocab_size, size=T)]
        for mode in args.prefill_only.split(","):  # several: one after the other in this process
            opts = PREFILL_OPTIONS[mode]
            rt.options = base.replace(matmul_2d=True) if mode.endswith("_2d") else base  # read when _lower traces
            try:
                low = rt._lower(spec)
            finally:
                rt.options = base
            if args.dump:  # XLA's dump of this executable (the thunk sequence shows what command buffers hold)
                opts = {**opts, "xla_dump_to": os.path.join(args.dump, f"{mode}_{T}")}
            t0 = time.perf_counter()
            ex = low.compile(compiler_options=opts) if opts else low.compile()
            compile_s = time.perf_counter() - t0
            with rt._lock:
                rt._execs[spec] = ex
            rows.append(_time_prefill(eng, rt, ex, ids, T, mode, compile_s, args))
    print("\n| T | mode | compile s | TTFT p50 ms | prefill back to back ms | dispatch p50 ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['T']} | {r['mode']} | {r['compile_s']:.1f} | {r['ttft_p50_ms']:.2f} | "
              f"{r['prefill_back_to_back_ms']:.2f} | {r['dispatch_p50_ms']:.2f} |")
    eng.close()


def _time_prefill(eng, rt, ex, ids, T, mode, compile_s, args):
    from hybrid_jax.engine import generate
    assert rt.plan_prefill(T) == [(("prefill", T, T), T)], rt.plan_prefill(T)
    ttft = []
    for _ in range(10):
        g = generate(eng, ids, max_new_tokens=2, ignore_eos=True)
        ttft.append(g.timings.ttft_s)
    assert rt.last_prefill_chunks == 1
    assert not rt._pending, f"timed beside a background compile: {list(rt._pending)}"
    state = rt.state
    req = (0, 0.0, None, None)
    state, tok = rt.prefill(state, ids, request=req)
    tok.block_until_ready()
    t0 = time.perf_counter()
    for _ in range(20):
        state, tok = rt.prefill(state, ids, request=req)
    tok.block_until_ready()
    dev = (time.perf_counter() - t0) / 20
    host = []  # the call's own time with the device idle: the host's dispatch (command buffer updates included)
    for _ in range(10):
        tok.block_until_ready()
        t0 = time.perf_counter()
        state, tok = rt.prefill(state, ids, request=req)
        host.append(time.perf_counter() - t0)
    tok.block_until_ready()
    rt.state = state
    r = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "T": T, "mode": mode,
         "compile_s": compile_s, "ttft_p50_ms": float(np.percentile(ttft[2:], 50) * 1e3),
         "ttft_ms": [x * 1e3 for x in ttft], "prefill_back_to_back_ms": dev * 1e3,
         "dispatch_p50_ms": float(np.percentile(host, 50) * 1e3),
         "hlo_custom_calls": (ex.as_text() or "").count("custom-call(")}
    print(json.dumps(r), flush=True)
    n = sum(1 for f in os.listdir(args.out) if f.startswith(f"prefill_{mode}_{T}"))  # a mode run twice
    with open(os.path.join(args.out, f"prefill_{mode}_{T}" + (f"_{n}" if n else "") + ".json"), "w") as f:
        json.dump(r, f)
    return r


if __name__ == "__main__":
    main()
