"""Where does the decode step's time go? Profile N pipelined decode steps (JAX profiler, CUPTI) of a model
shape with random weights and sum the device time per kernel name, per step.

  python3 -m bench.probes.decode_profile --out $OUT [--shape llama2-7b] [--gemv pallas+attn,xla] [--steps 20]
      [--tuned gemv_tune.json] [--variants "base;pallas;rr:w13;tile:w13=1/4096/4/1"]
  JAX_PLATFORMS=cpu python3 -m bench.probes.decode_profile --shape tiny --kernels interpret --steps 2 --out /tmp/p

Modes: `pallas+attn` is the default step on one GPU (the projection kernels and the attention kernel),
`pallas` the projection kernels with XLA's attention, `xla` XLA's fusions only. Variants, separated by ";",
each profiled once per mode (results keyed "mode" for base, else "mode|variant"):
  base                      the default step (row_reduce "auto")
  pallas                    every projection through gemv.gemv, none an XLA row reduction
  rr:NAMES                  exactly the projections NAMES (wqkv, wo, w13, w2, joined by +) as row reductions
  tile:NAME=BN/BK/W/S,...   the base step with these gemv tilings (block_n, block_k, warps, stages) over gemv.TUNED

Writes profile<tag>.json (kernel name -> us per step, count per step; busy time vs wall time per step) and
prints the top kernels. Run it under XLA_FLAGS=--xla_gpu_enable_command_buffer= as well: with command
buffers the kernels run inside a CUDA graph, which CUPTI may report as one graph launch.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax

from bench.probes import harness as H


@dataclasses.dataclass
class Variant:
    """One variant's switches: KernelOptions.row_reduce (None: the code's default), gemv.TUNED overrides."""
    row_reduce: frozenset[str] | None = None
    tiles: dict = dataclasses.field(default_factory=dict)


def parse_variant(v: str, cfg) -> Variant:
    """A variant's name (see the module's docstring) -> its switches."""
    from hybrid_jax import gemv as G
    from hybrid_jax import model
    var = Variant()
    shapes = {name: (kd, n) for name, kd, n in H.layer_matrices(cfg)}
    if v == "pallas":
        var.row_reduce = frozenset()
    elif v.startswith("rr:"):
        var.row_reduce = frozenset(v[3:].split("+"))
        if not var.row_reduce <= set(model.PROJECTIONS.values()):
            raise ValueError(f"unknown projection in {v!r}")
    elif v.startswith("tile:"):
        for part in v[5:].split(","):
            name, _, t = part.partition("=")
            bn, bk, wp, st = (int(a) for a in t.split("/"))
            var.tiles[(*shapes[name], True)] = G.GemvConfig(bn, bk, 1, wp, st)
    elif v != "base":
        raise ValueError(f"unknown variant {v!r}")
    return var


@contextlib.contextmanager
def applied(var: Variant):
    """The variant's tilings set while an engine traces its steps; the previous ones restored after (its row
    reductions go in the engine's options)."""
    from hybrid_jax import gemv as G
    tuned = dict(G.TUNED)
    G.TUNED.update(var.tiles)
    try:
        yield
    finally:
        G.TUNED.clear()
        G.TUNED.update(tuned)


def kernel_table(trace_path: str, steps: int) -> dict:
    with gzip.open(trace_path) as f:
        tr = json.load(f)
    ev = tr["traceEvents"] if isinstance(tr, dict) else tr
    pname = {e["pid"]: e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu_pids = {p for p, n in pname.items() if "GPU" in n or "gpu" in n}
    tname = {(e["pid"], e["tid"]): e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "thread_name"}
    streams_only = any("stream" in n.lower() for (p, _), n in tname.items() if p in gpu_pids)
    by = collections.defaultdict(lambda: [0.0, 0])
    spans = []
    for e in ev:
        if e.get("ph") != "X" or e.get("pid") not in gpu_pids:
            continue
        th = tname.get((e["pid"], e["tid"]), "")
        if streams_only and "stream" not in th.lower():
            continue
        name = re.sub(r"([._]\d+)+$", "", e["name"])
        by[name][0] += float(e.get("dur", 0))
        by[name][1] += 1
        spans.append((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))))
    spans.sort()
    busy, end = 0.0, -1.0
    for a, b in spans:  # union of kernel intervals
        if b > end:
            busy += b - max(a, end)
            end = b
    wall = (spans[-1][1] - spans[0][0]) if spans else 0.0
    rows = sorted(((k, v[0] / steps, v[1] / steps) for k, v in by.items()), key=lambda r: -r[1])
    return {"kernels_per_step": sum(r[2] for r in rows), "busy_us_per_step": busy / steps,
            "span_us_per_step": wall / steps, "gpu_processes": [pname[p] for p in gpu_pids],
            "gpu_threads": sorted({n for (p, _), n in tname.items() if p in gpu_pids}),
            "top": [{"name": k, "us": round(u, 2), "count": round(c, 2)} for k, u, c in rows[:60]]}


def main():
    ap = H.parser(__doc__)
    ap.add_argument("--gemv", default="pallas+attn,xla", help="modes: pallas+attn (the default step: the "
                    "projection kernels and the attention kernel), pallas (XLA's attention), xla")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tag", default="")
    ap.add_argument("--tuned", help="gemv_tune.json of bench.probes.gemv_tune: its tilings over gemv.TUNED")
    ap.add_argument("--variants", default="base", help="';'-separated (see above)")
    ap.add_argument("--kernels", default="pallas", help="the mode of the kernels (interpret: a CPU dry run)")
    args = H.parse(ap)
    from hybrid_jax.options import KernelOptions
    if args.tuned:
        from bench.probes.gemv_tune import load_tuned
        from hybrid_jax import gemv as G
        G.TUNED.update(load_tuned(args.tuned))
    cfg = H.shape_config(args.shape)
    params = H.random_params(cfg)
    out = {**H.run_record(), "tuned": args.tuned}
    runs = [(m, v) for m in args.gemv.split(",") for v in args.variants.split(";")]
    for mode, variant in runs:
        gemv, _, attn = mode.partition("+")
        kern = args.kernels if gemv == "pallas" else gemv
        var = parse_variant(variant, cfg)
        with applied(var):  # the decode steps are traced and compiled in the constructor
            eng, _ = H.random_engine(cfg, params, prefill_buckets=(16, 1024), compile_sampling=False,
                                     options=KernelOptions(row_reduce="auto" if var.row_reduce is None else var.row_reduce,
                                                           gemv=kern, decode_attention=args.kernels if attn else "xla"))
        key = mode if variant == "base" else f"{mode}|{variant}"
        eng.wait_background()  # background compiles autotune on the GPU: never time beside them
        rt = eng.runtime
        eng.pipelined_step_seconds(10)  # its prefill queues the bucket's own compile (run 44's 13.75 ms step)
        eng.wait_background()
        step = eng.pipelined_step_seconds(100)
        state, _ = rt.prefill(rt.reset_state(rt.state.cache), [1, 2, 3])
        spec = rt.decode_spec(200, False)
        for _ in range(5):
            state, tok = rt.decode(state, spec)
        tok.block_until_ready()
        d = tempfile.mkdtemp()
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(args.steps):
                state, tok = rt.decode(state, spec)
            tok.block_until_ready()
            time.sleep(0.2)
        rt.state = state
        paths = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)
        res = {"mode": mode, "variant": variant, "step_ms": step * 1e3}
        try:
            res.update(kernel_table(paths[0], args.steps))
        except Exception as e:  # noqa: BLE001
            res["error"] = f"{type(e).__name__}: {e}"
        out[key] = res
        with open(os.path.join(args.out, f"profile{args.tag}.json"), "w") as f:
            json.dump(out, f, indent=1)
        print(f"== {key}{args.tag}: step {res['step_ms']:.3f} ms, kernels/step {res.get('kernels_per_step')}, "
              f"busy {res.get('busy_us_per_step', 0):.0f} us, span {res.get('span_us_per_step', 0):.0f} us "
              f"{res.get('error', '')}", flush=True)
        for r in res.get("top", [])[:25]:
            print(f"   {r['us']:9.1f} us  x{r['count']:6.1f}  {r['name'][:90]}")
        eng.close()


if __name__ == "__main__":
    main()
