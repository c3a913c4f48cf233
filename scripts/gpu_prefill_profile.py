"""Where does a short prompt's TTFT go? Two views of the prefill of the LLaMA-2-7B shape (random bf16 weights):

1. device: the prefill's kernels (JAX profiler, CUPTI, command buffers kept on) per prompt length, summed per
   kernel name per prefill (prefills back to back, so the host's work overlaps);
2. host: a loop of requests (prefill call, first decode step, first token read) inside `host_loop`, with
   py-spy (native stacks) attached to this process for the loop only (`--spy`: its executable, e.g. from
   the py-spy wheel on PyPI, unpacked; the GPU machines have no perf). The summary keeps the stacks through
   `host_loop` and splits out those inside the prefill call. Sampling slows the process several times
   over: the shares are what to read, not the times.

  PYTHONPATH=. python3 scripts/gpu_prefill_profile.py --out $OUT [--spy /path/to/py-spy --spy-rate 400]
  python3 scripts/gpu_prefill_profile.py --summarise-spy $OUT/spy.txt    # again, from the raw stacks

Writes prefill_profile.json, prefill_<bucket>.hlo.txt (the optimised HLO) and spy.txt.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import jax  # noqa: E402

from gpu_decode_profile import kernel_table  # noqa: E402
from gpu_prefill_host import back_to_back, random_engine, request  # noqa: E402


def host_loop(rt, ids, reps: int) -> list[float]:
    """`reps` requests one after another; py-spy's stacks through this frame are the ones summarised."""
    out = []
    for _ in range(reps):
        out.append(request(rt, ids, 2)[1])
    return out


_CALL = re.compile(r"(^|\.)prefill \(.*runtime\.py")  # Runtime.prefill (hybrid_jax/runtime.py:369)


def summarise_spy(path: str, top: int = 40) -> dict:
    """py-spy's raw (collapsed) stacks -> inclusive and self sample counts per frame, for samples whose
    stack passes through host_loop, plus the share inside the prefill call."""
    incl, self_, total, in_call = collections.Counter(), collections.Counter(), 0, 0
    call_incl, call_self = collections.Counter(), collections.Counter()
    for line in open(path):
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if "host_loop" not in stack:
            continue
        n = int(n)
        frames = stack.split(";")
        total += n
        for f in set(frames):
            incl[f] += n
        self_[frames[-1]] += n
        i = next((i for i, f in enumerate(frames) if _CALL.search(f)), None)
        if i is not None:
            in_call += n
            for f in set(frames[i:]):
                call_incl[f] += n
            call_self[frames[-1]] += n
    rows = lambda c: [{"frame": k[:160], "samples": v} for k, v in c.most_common(top)]
    return {"samples": total, "in_prefill_call": in_call, "inclusive": rows(incl), "self": rows(self_),
            "prefill_call_inclusive": rows(call_incl), "prefill_call_self": rows(call_self)}


def report_spy(s: dict, keys=("prefill_call_inclusive", "prefill_call_self", "self"), top: int = 30):
    print(f"py-spy: {s['samples']} samples in host_loop, {s['in_prefill_call']} inside the prefill call")
    for key in keys:
        print(f"-- {key}")
        for r in s[key][:top]:
            print(f"  {r['samples']:7d}  {r['frame']}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--lengths", default="10,100,500")
    ap.add_argument("--prefills", type=int, default=10, help="prefills per length in the device profile")
    ap.add_argument("--host-reps", type=int, default=1500)
    ap.add_argument("--spy", default="", help="py-spy executable: attach it to this process for the host loop only")
    ap.add_argument("--spy-rate", type=int, default=1000)
    ap.add_argument("--summarise-spy", default="", help="only summarise this py-spy raw file")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.summarise_spy:
        s = summarise_spy(args.summarise_spy)
        report_spy(s)
        with open(args.summarise_spy + ".summary.json", "w") as f:
            json.dump(s, f, indent=1)
        return
    from bench.worker import prompt_ids
    lengths = [int(x) for x in args.lengths.split(",")]
    cfg, _, eng = random_engine(args.shape, lengths)
    rt = eng.runtime
    for n in lengths:
        b = rt.bucket_for(n)
        with open(os.path.join(args.out, f"prefill_{b}.hlo.txt"), "w") as f:
            f.write(rt._get(("prefill", b, b)).as_text())  # the optimised HLO: the fusions the kernel table names
    eng.wait_background()
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "xla_flags": os.environ.get("XLA_FLAGS", ""), "prefill_attention": rt.stats().get("prefill_attention"),
           "device_profile": {}}
    path = os.path.join(args.out, "prefill_profile.json")
    for n in lengths:
        ids = prompt_ids(cfg.vocab_size, n, 0, 0)
        for _ in range(3):
            request(rt, ids, 2)
        d = tempfile.mkdtemp()
        with jax.profiler.trace(d, create_perfetto_trace=True):
            back_to_back(rt, ids, args.prefills)
            time.sleep(0.1)
        paths = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)
        try:
            res = kernel_table(paths[0], args.prefills)
        except Exception as e:  # noqa: BLE001
            res = {"error": f"{type(e).__name__}: {e}"}
        out["device_profile"][n] = res
        print(f"== prefill {n} tokens (bucket {rt.bucket_for(n)}): kernels/prefill {res.get('kernels_per_step')}, "
              f"busy {res.get('busy_us_per_step', 0):.0f} us, span {res.get('span_us_per_step', 0):.0f} us "
              f"{res.get('error', '')}", flush=True)
        for r in res.get("top", [])[:30]:
            print(f"   {r['us']:9.1f} us  x{r['count']:6.1f}  {r['name'][:100]}")
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
    n = lengths[0]
    ids = prompt_ids(cfg.vocab_size, n, 0, 0)
    spy = None
    if args.spy:
        for _ in range(20):
            request(rt, ids, 2)
        spy_out = os.path.join(args.out, "spy.txt")
        spy = subprocess.Popen([args.spy, "record", "--native", "--idle", "-r", str(args.spy_rate), "-f", "raw",
                                "-o", spy_out, "--pid", str(os.getpid())])
        time.sleep(2.0)  # py-spy attaches
    t0 = time.perf_counter()
    ttft = host_loop(rt, ids, args.host_reps)
    if spy is not None:
        spy.send_signal(2)  # SIGINT: py-spy writes its file and exits
        spy.wait(timeout=60)
        try:
            s = summarise_spy(spy_out)
            out["spy"] = {k: s[k] for k in ("samples", "in_prefill_call")} | {
                "prefill_call_self": s["prefill_call_self"][:25], "prefill_call_inclusive": s["prefill_call_inclusive"][:40]}
            report_spy(s, ("prefill_call_self",), 20)
        except Exception as e:  # noqa: BLE001
            out["spy"] = {"error": f"{type(e).__name__}: {e}"}
    out["host_loop"] = {"prompt": n, "reps": args.host_reps, "seconds": time.perf_counter() - t0,
                        "request_ttft_ms_p50": float(np.median(ttft))}
    print(f"host loop: {args.host_reps} requests of {n} tokens, TTFT p50 {np.median(ttft):.2f} ms", flush=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    eng.close()


if __name__ == "__main__":
    main()
