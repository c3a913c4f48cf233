"""Converted models' steps on this machine (the CPU): decode ms a token, TTFT, and each executable's temp buffer.

    python -m bench.probes.cpu_steps --models DIR[,DIR...] --out $OUT [--dtypes auto,bfloat16] [--reps 6] [--steps 32]

For each model and each of --dtypes (load's dtype; auto: None, the load's own choice), in its own process (a
fresh heap; no disk cache, so this tree's compile options count): the decode step's time (Engine.step_seconds: a
100-token prompt, --steps steps enqueued back to back, median of --reps, after every background compile has
ended), TTFT of prompts of 10 and 100 ids through generate() (median of 5, their buckets compiled first), and the
temp buffer XLA allocates for each call of the 16-row prefill and of the decode step (memory_analysis), with the
minor page faults of a decode step and a 10-id request. Writes cpu_steps.json and prints a table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from bench.probes.harness import parse, parser, write_json

CHILD = r"""
import json, resource, statistics, sys
import hybrid_jax
from bench.probes.harness import run_record
path, reps, steps, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
eng = hybrid_jax.load(path, max_seq_len=256, compile_sampling=False, use_disk_cache=False,
                      dtype=None if dtype == "auto" else dtype)
rt = eng.runtime
ids = list(range(1, 101))
for n in (100, 10):
    hybrid_jax.generate(eng, ids[:n], max_new_tokens=4)
    rt.wait_background()
spec = ("decode", rt.cache_len, False)
eng.step_seconds([spec], 8, ids)
rt.wait_background()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
f0 = faults()
step = [eng.step_seconds([spec], steps, ids)[0] for _ in range(reps)]
step_faults = (faults() - f0) / (reps * (steps + 1))
ttft = {}
for n in (10, 100):
    f0 = faults()
    ttft[n] = statistics.median(hybrid_jax.generate(eng, ids[:n], max_new_tokens=1).timings.ttft_s for _ in range(5))
    if n == 10:
        request_faults = (faults() - f0) / 5
temp = {str(s): rt.executable(s).memory_analysis().temp_size_in_bytes for s in (("prefill", 16, 16), spec)}
print(json.dumps({"model": path, "quant": eng.cfg.quant, "dtype_arg": dtype, "dtype": eng.cfg.dtype,
                  "decode_ms": statistics.median(step) * 1e3,
                  "decode_ms_all": [t * 1e3 for t in step], "ttft10_ms": ttft[10] * 1e3, "ttft100_ms": ttft[100] * 1e3,
                  "temp_bytes": temp, "minflt_per_step": step_faults, "minflt_per_request10": request_faults,
                  **run_record()}))
"""


def main(argv=None) -> None:
    ap = parser(__doc__, shape=None)
    ap.add_argument("--models", required=True, help="comma list of converted model folders")
    ap.add_argument("--dtypes", default="auto", help="comma list of load's dtype for each model (auto: None)")
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--steps", type=int, default=32)
    args = parse(ap, argv)
    rows = []
    for m in args.models.split(","):
        for dt in args.dtypes.split(","):
            out = subprocess.run([sys.executable, "-c", CHILD, m, str(args.reps), str(args.steps), dt],
                                 capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()},
                                 timeout=1800)
            if out.returncode:
                raise SystemExit(f"{m} ({dt}): the child failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            write_json(os.path.join(args.out, "cpu_steps.json"), rows)
    print("model                 quant            dtype      decode ms  TTFT@10  TTFT@100  temp MB prefill16 / decode"
          "  faults/step")
    for r in rows:
        temp = {k.split(",")[0].strip("('"): v / 1e6 for k, v in r["temp_bytes"].items()}
        print(f"{os.path.basename(r['model']):20s}  {str(r['quant']):15s}  {r['dtype']:9s}  {r['decode_ms']:9.1f}"
              f"  {r['ttft10_ms']:7.1f}  {r['ttft100_ms']:8.1f}  {temp['prefill']:14.1f} / {temp['decode']:6.1f}"
              f"  {r['minflt_per_step']:11.0f}")


if __name__ == "__main__":
    main()
