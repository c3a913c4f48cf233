"""Quantized weights on one device: decode step and TTFT of a model shape against its 16-bit self, and each
step against its weight-bandwidth floor (the stored bytes over the measured copy bandwidth).

    python -m bench.probes.quant_check --shape llama2-7b --schemes none,int8,int4-g32 --out $OUT
    JAX_PLATFORMS=cpu python -m bench.probes.quant_check --shape tiny --steps 3 --reps 1 --out /tmp/q

Random weights (codes and scales for the quantized ones), a 100-token prompt, then --steps decode steps
enqueued back to back (device time a step, median of 3); TTFT: generate() of one new token at each prompt
length, median of --reps after a warm-up (each length's own prefill bucket compiled first).
Writes quant_check.json and prints a table.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time

from bench.probes.harness import parse, parser, random_engine, random_params, run_record, shape_config, write_json


@contextlib.contextmanager
def gemm_at_every_bucket(tuned: dict | None = None):
    """Inside: every quantized prefill chunk through qgemv.gemm (not only up to qgemv.gemm_rows_max rows; both
    Runtime.step_options and model._project_quantized read the bound), with `tuned` added to qgemv.TUNED_ROWS.
    Restored on exit."""
    from hybrid_jax import qgemv
    saved = dict(qgemv.TUNED_ROWS), qgemv.GEMM_ROWS_MAX, qgemv.gemm_rows_max
    qgemv.TUNED_ROWS.update(tuned or {})
    qgemv.GEMM_ROWS_MAX, qgemv.gemm_rows_max = 1 << 30, lambda scheme: 1 << 30
    try:
        yield
    finally:
        qgemv.TUNED_ROWS.clear()
        qgemv.TUNED_ROWS.update(saved[0])
        qgemv.GEMM_ROWS_MAX, qgemv.gemm_rows_max = saved[1], saved[2]


def one(cfg, steps: int, lengths: list[int], reps: int, options=None) -> dict:
    import numpy as np

    import hybrid_jax

    t0 = time.perf_counter()
    params = random_params(cfg)
    made = time.perf_counter() - t0
    eng, _ = random_engine(cfg, params, lengths=lengths, max_seq_len=1024, compile_sampling=False, options=options)
    rng = np.random.default_rng(0)
    ids = [int(t) for t in rng.integers(3, cfg.vocab_size, 100)]
    spec = ("decode", eng.runtime.cache_len, False)
    step = statistics.median(eng.step_seconds([spec], steps, ids)[0] for _ in range(3))
    ttft = {}
    for n in lengths:
        p = [int(t) for t in rng.integers(3, cfg.vocab_size, n)]
        hybrid_jax.generate(eng, p, max_new_tokens=1, ignore_eos=True)
        ttft[n] = statistics.median(hybrid_jax.generate(eng, p, max_new_tokens=1, ignore_eos=True).timings.ttft_s
                                    for _ in range(reps))
    eng.close()
    return {"quant": cfg.quant, "options": None if options is None else options.to_dict(), "weight_bytes": cfg.weight_bytes, "weights_made_s": round(made, 2),
            "decode_ms": round(step * 1e3, 4), "ttft_ms": {n: round(t * 1e3, 3) for n, t in ttft.items()}}


def main(argv=None) -> None:
    ap = parser(__doc__, shape="llama2-7b")
    ap.add_argument("--schemes", default="none,int8,int4-g32-sym", help="comma list of quant.py schemes (none: 16-bit), "
                    "each optionally with :grouped or :rowsum (KernelOptions.quant_matvec), :pallas (row_reduce none: "
                    "every int8 projection through the Pallas gemv), :xla (every one an XLA row reduction), :autotune (prefill_matmuls='autotune') "
                    ":qgemm (the prefill's products through qgemv.gemm at every bucket: by default only up to "
                    "qgemv.gemm_rows_max rows) and :xlaprefill (quant_prefill='xla': XLA's dequantized matmul at every bucket)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lengths", default="10,100,500")
    ap.add_argument("--reps", type=int, default=5)
    args = parse(ap, argv)
    import jax

    from bench import floors

    on_acc = jax.devices()[0].platform != "cpu"
    cfg0 = shape_config(args.shape, "bfloat16" if on_acc else "float32")
    rec = {"run": run_record(), "args": vars(args),
           "copy": floors.copy_bandwidth(2 << 30 if on_acc else 64 << 20, cfg0.dtype, reps=20 if on_acc else 3)}
    bw = rec["copy"]["bw_Bps"]
    rows = []
    from hybrid_jax import quant
    from hybrid_jax.options import KernelOptions
    for item in args.schemes.split(","):
        s, *mods = item.split(":")  # SCHEME[:grouped][:autotune]; a short name (int4) as its full one
        kw = {}
        if "pallas" in mods:  # every projection through the Pallas gemv (int8 with one scale a row)
            kw["row_reduce"] = frozenset()
        if "xla" in mods:  # every projection an XLA row reduction
            kw["row_reduce"] = frozenset({"wqkv", "wo", "w13", "w2"})
        if "grouped" in mods or "rowsum" in mods:
            kw["quant_matvec"] = "grouped" if "grouped" in mods else "rowsum"
        if "autotune" in mods:
            kw["prefill_matmuls"] = "autotune"
        if "qgemm" in mods:
            kw["quant_prefill"] = "pallas" if on_acc else "interpret"
        if "xlaprefill" in mods:
            kw["quant_prefill"] = "xla"
        with gemm_at_every_bucket() if "qgemm" in mods else contextlib.nullcontext():
            r = one(cfg0.replace(quant=None if s == "none" else quant.parse(s).name), args.steps,
                    [int(x) for x in args.lengths.split(",")], args.reps, KernelOptions(**kw))
        r["label"] = item
        r["floor_ms"] = round(r["weight_bytes"] / bw * 1e3, 4)
        r["over_floor"] = round(r["decode_ms"] / r["floor_ms"], 3)
        rows.append(r)
        write_json(os.path.join(args.out, "quant_check.json"), {**rec, "rows": rows})
    base = rows[0]
    print(f"\n{rec['run']['device']}, {args.shape}, copy bandwidth {bw / 1e12:.2f} TB/s")
    print("scheme          GB      decode ms  floor ms  x floor  x first  " + "  ".join(f"TTFT@{n}" for n in base["ttft_ms"]))
    for r in rows:
        print(f"{r['label']:15s} {r['weight_bytes'] / 1e9:6.2f}  {r['decode_ms']:9.3f}  {r['floor_ms']:8.3f}"
              f"  {r['over_floor']:7.3f}  {base['decode_ms'] / r['decode_ms']:7.2f}  "
              + "  ".join(f"{v:8.2f}" for v in r["ttft_ms"].values()))


if __name__ == "__main__":
    main()
