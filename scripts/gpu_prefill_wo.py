"""The prefill's output projection through `gemv.gemm` instead of XLA's cuBLAS matmul (run 37).

Run 32's profile of the LLaMA-2-7B prefill at 16 and 128 rows: XLA runs wo's product through cuBLAS and
first copies the layer's 32 MB slice of the stacked wo (one copy a layer, ~16 us each, ~0.5 ms a prefill);
no XLA option tried removed it (runs 33-36). The kernel reads the stacked weight in place. This script:

1. tunes `gemm`'s tiling for wo at 16-128 rows (scripts/gpu_prefill_probe.py's tune, wo only) unless
   --no-tune, and uses the best tilings below;
2. builds two engines over the same random weights in one process, wo through XLA (prefill_wo="xla") and
   through the kernel (prefill_wo="pallas"), and reports per prefill executable the slice copies and cuBLAS
   calls left in its HLO, and per prompt length generate()'s TTFT, the prefill's device time (back to back)
   and the first generated tokens, the engines alternated rep by rep.

  PYTHONPATH=. python3 scripts/gpu_prefill_wo.py --out $OUT [--shape llama2-7b|tiny] [--no-tune]

Writes prefill_wo.json (and prefill_probe.json from the tuning).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time


sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import jax  # noqa: E402

from gpu_prefill_host import engine_ab, random_engine  # noqa: E402


def hlo_counts(txt: str) -> dict:
    entry = txt[txt.find("\nENTRY"):]
    return {"slice_copies": len(re.findall(r"= \S+ fusion\(%p_layers_\w+(\.\d+)?\), kind=kLoop", entry)),
            "cublas_calls": len(re.findall(r'custom_call_target="__cublas', entry)),
            "triton_gemms": len(re.findall(r"kind=kCustom, calls=%gemm_fusion", entry)),
            # launches outside the command buffers' bookkeeping: XLA fusions and custom calls (Pallas, cuDNN, sort)
            "fusions": len(re.findall(r"= \S+ fusion\(", entry)),
            "custom_calls": len(re.findall(r"= \S+ custom-call\(", entry))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--lengths", default="10,100,500")
    ap.add_argument("--rows", default="16,32,64,128")
    ap.add_argument("--no-tune", action="store_true")
    ap.add_argument("--reps", type=int, default=12)
    args = ap.parse_args()
    from hybrid_jax import gemv as G
    from hybrid_jax.config import PRESETS
    preset = PRESETS.get(args.shape)  # None: "tiny", random_engine's dry run (no tuning)
    gpu = jax.devices()[0].platform == "gpu"
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "tuned_rows_before": {
        ",".join(map(str, k)): v.__dict__ for k, v in G.TUNED_ROWS.items()}}
    path = os.path.join(args.out, "prefill_wo.json")

    def save():
        with open(path, "w") as f:
            json.dump(out, f, indent=1)

    if not args.no_tune and gpu and preset is not None:
        from gpu_prefill_probe import tune
        res = {"tune": []}
        G.TUNED_ROWS.update(tune(preset, args.out, res, rows=tuple(int(r) for r in args.rows.split(",")),
                                 matrices=("wo",)))
        out["tune_table_md"] = res.get("tune_table_md")
        print("\n".join(res.get("tune_table_md") or []), flush=True)
    out["tuned_rows"] = {",".join(map(str, k)): v.__dict__ for k, v in G.TUNED_ROWS.items()}
    save()
    lengths = [int(x) for x in args.lengths.split(",")]
    cache_dir = tempfile.mkdtemp()  # the decode step is shared (its key omits the prefill's choices)
    mode = "pallas" if gpu else "interpret"
    t0 = time.perf_counter()
    engs, hlo, params = {}, {}, None
    for name, wo in (("xla", "xla"), (mode, mode)):
        from hybrid_jax.options import KernelOptions
        cfg, params, e = random_engine(args.shape, lengths, params, cache_dir, options=KernelOptions(prefill_wo=wo))
        rt = e.runtime
        hlo[name] = {rt.bucket_for(n): hlo_counts(rt._get(("prefill", rt.bucket_for(n), rt.bucket_for(n))).as_text())
                     for n in lengths}
        engs[name] = e
        print(f"[{name}] prefill_wo={rt.stats()['prefill_wo']} {hlo[name]}", flush=True)
    out["compile_s"] = time.perf_counter() - t0
    out["hlo"] = hlo
    save()

    def on_length(res):
        out["engine"] = res
        save()
    engine_ab(engs, cfg.vocab_size, lengths, args.reps, on_length)
    for e in engs.values():
        e.close()


if __name__ == "__main__":
    main()
