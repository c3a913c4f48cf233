"""The prefill's weight-slice copies and the XLA options that remove them (runs 33-36; needs the reverted runtime option of runs33-36_prefill-xla-options_flat-wo.diff).

Run 32's profile of the LLaMA-2-7B prefill at 16 and 128 rows found a 32 MB device copy per layer (~16 us
each, ~0.5 ms per prefill): the autotuner put the output projection on cuBLAS, which needs its operand in a
buffer of its own, so XLA copies the layer's static slice of the stacked wo first. This script builds one
engine per set of prefill XLA options (runtime.prefill_xla_options) over the same random weights, all in
one process, and per set reports: the copies and cuBLAS calls left in each prefill executable's HLO, the
prefill's device time (back to back), generate()'s TTFT (engines alternated rep by rep) and the first
generated tokens against the default set's.

XLA's autotuner caches its GEMM choices per process (keyed by the fusion, not by the options), so sets in one
process share the choices of whichever compiled a fusion first: run 33 saw the same 32 cuBLAS
calls under every set. Compare sets that change the autotuner's candidates (nofallback) in a process each,
and the tokens across processes by the printed lists.

  PYTHONPATH=. python3 scripts/gpu_prefill_xla_options.py --out $OUT [--shape llama2-7b|tiny] [--sets a,b]

Writes prefill_xla_options.json.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import re
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import jax  # noqa: E402

from gpu_prefill_host import back_to_back  # noqa: E402

CB = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN"
SETS = {  # name -> prefill XLA options; "wo5d" (first when given: the flag is read while it compiles, alone)
    "wo5d": {},  # the output projection in its 5-D einsum form (model.FLAT_OUTPUT_PROJECTION = False)
    "default": {},
    "nofallback": {"xla_gpu_cublas_fallback": False},  # Triton for every GEMM it supports: slices fused
    "dsf": {"xla_gpu_enable_dynamic_slice_fusion": True},  # cuBLAS reads the slice at an offset
    "dsf_cb": {"xla_gpu_enable_dynamic_slice_fusion": True,
               "xla_gpu_enable_command_buffer": CB + ",DYNAMIC_SLICE_FUSION"},
}


def hlo_counts(txt: str) -> dict:
    entry = txt[txt.find("\nENTRY"):]
    return {"slice_copies": len(re.findall(r"= \S+ fusion\(%p_layers_\w+(\.\d+)?\), kind=kLoop", entry)),
            "copies": len(re.findall(r"= \S+ copy\(", entry)),
            "cublas_calls": len(re.findall(r'custom_call_target="__cublas', entry)),
            "dynamic_slice_fusions": len(re.findall(r"address_computation", entry)),
            "triton_gemms": len(re.findall(r"= \S+ fusion\([^)]*\), kind=kCustom, calls=%gemm_fusion", entry))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--sets", default="wo5d,default")
    ap.add_argument("--lengths", default="10,100,500")
    ap.add_argument("--long-sets", default="wo5d,default", help="sets also compiled for the longest length")
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--hlo-only", action="store_true", help="compile and count, no timing")
    args = ap.parse_args()
    from bench.worker import prompt_ids
    from hybrid_jax import weights
    from hybrid_jax.config import PRESETS, LlamaConfig
    from hybrid_jax.generate import Engine, generate
    cfg = PRESETS.get(args.shape) or LlamaConfig(vocab_size=512, dim=256, n_layers=2, n_heads=8, n_kv_heads=2,
                                                 ffn_dim=512, dtype="bfloat16")  # "tiny": a dry run
    names = [s for s in args.sets.split(",") if s]
    lengths = [int(x) for x in args.lengths.split(",")]
    params = weights.init_random(cfg, jax.random.PRNGKey(0))
    jax.block_until_ready(params)
    cache_dir = tempfile.mkdtemp()  # the decode step is shared (its key omits the prefill's options)
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "sets": {n: SETS[n] for n in names}}
    path = os.path.join(args.out, "prefill_xla_options.json")

    def save():
        with open(path, "w") as f:
            json.dump(out, f, indent=1)

    t0 = time.perf_counter()

    def build(name):
        from hybrid_jax import model
        model.FLAT_OUTPUT_PROJECTION = name != "wo5d"
        e = Engine(cfg, params, max_seq_len=1024, cache_dir=cache_dir, compile_sampling=False,
                   prefill_xla_options=SETS[name])
        rt = e.runtime
        ls = lengths if name in args.long_sets.split(",") else [n for n in lengths if n < max(lengths)]
        counts = {}
        for n in ls:
            b = rt.bucket_for(n)
            counts[b] = hlo_counts(rt._get(("prefill", b, b)).as_text())
        return e, ls, counts

    engs, hlo = {}, {}
    with cf.ThreadPoolExecutor(len(names)) as pool:
        futs = {names[0]: pool.submit(build, names[0])}  # first alone: it compiles the shared decode step
        futs[names[0]].result()
        from hybrid_jax import model
        model.FLAT_OUTPUT_PROJECTION = True
        if "wo5d" in names[1:]:
            raise SystemExit("give wo5d first (--sets wo5d,...): it compiles alone")
        futs |= {n: pool.submit(build, n) for n in names[1:]}
        for n, f in futs.items():
            try:
                e, ls, counts = f.result()
                engs[n] = (e, ls)
                hlo[n] = counts
            except Exception as ex:  # noqa: BLE001
                hlo[n] = {"error": f"{type(ex).__name__}: {str(ex)[:400]}"}
            print(f"[{n}] {hlo[n]}", flush=True)
    out["compile_s"] = time.perf_counter() - t0
    out["hlo"] = hlo
    save()
    print(f"compiled in {out['compile_s']:.0f} s", flush=True)
    if args.hlo_only:
        return
    for e, ls in engs.values():  # warm
        for n in ls:
            for rep in range(2):
                generate(e, prompt_ids(cfg.vocab_size, n, rep, 0), max_new_tokens=4, ignore_eos=True)
    res = {n: {} for n in engs}
    for n in lengths:
        here = [k for k, (_, ls) in engs.items() if n in ls]
        acc = {k: {"ttft": [], "device": [], "tokens": []} for k in here}
        for rep in range(args.reps):
            ids = prompt_ids(cfg.vocab_size, n, rep, 0)
            for k in (here if rep % 2 == 0 else here[::-1]):
                e = engs[k][0]
                r = generate(e, ids, max_new_tokens=8, ignore_eos=True)
                acc[k]["ttft"].append(r.timings.ttft_s * 1e3)
                if rep < 3:
                    acc[k]["tokens"].append([int(t) for t in r.token_ids])
                    if rep == 0:
                        print(f"[{k}] {n} tok, rep 0 tokens: {acc[k]['tokens'][-1]}", flush=True)
                acc[k]["device"].append(back_to_back(e.runtime, ids, 5) * 1e3)
        for k in here:
            a = acc[k]
            same = (None if "default" not in acc or k == "default" else
                    [x == y for x, y in zip(a["tokens"], acc["default"]["tokens"])])
            res[k][n] = {"ttft_p50": float(np.median(a["ttft"])), "ttft_max": float(max(a["ttft"])),
                         "device_p50": float(np.median(a["device"])), "tokens_equal_default": same,
                         "ttft_all": [round(v, 3) for v in a["ttft"]]}
            print(f"[{k:10s}] {n:4d} tok: TTFT p50 {res[k][n]['ttft_p50']:.2f} ms (max {res[k][n]['ttft_max']:.2f}), "
                  f"prefill device {res[k][n]['device_p50']:.2f} ms, tokens = default: {same}", flush=True)
        out["engine"] = res
        save()
    print("\nset          " + "  ".join(f"{n:>5d} tok TTFT/dev" for n in lengths))
    for k in res:
        print(f"{k:12s} " + "  ".join(f"{res[k][n]['ttft_p50']:7.2f}/{res[k][n]['device_p50']:5.2f}" if n in res[k]
                                      else " " * 13 for n in lengths))
    for e, _ in engs.values():
        e.close()


if __name__ == "__main__":
    main()
