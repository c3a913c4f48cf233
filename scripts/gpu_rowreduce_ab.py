"""The decode step with some projections of the one token written as XLA row reductions (KernelOptions.row_reduce), or
with other Pallas tilings, against the default step (issue 5; runs 67-69 of docs/ENGINEERING_LOG.md).

  PYTHONPATH=. python3 scripts/gpu_rowreduce_ab.py --out $OUT/rr \
      [--variants "base;pallas;rr:w13;tile:w13=1/4096/4/1,wqkv=2/4096/8/1"]

Runs 67-68 found XLA's row-reduction emitter reading the 7B's matrices at 4.0-4.36 TB/s, against 3.1-3.7 for
the Pallas GEMVs. As `jnp.sum(w * x, axis=1)` the product itself ran at that rate for wqkv, wo and w13 (not
w2). In the step, a projection written that way loses the Pallas kernel's fused norm and consumer: XLA
computes the norm's mean square and silu x up in kernels of their own. Hence this A/B of whole steps; run 69
made wqkv, wo and w13 row reductions by default (options.ROW_REDUCE_AUTO).

Variants, separated by ";":
  base                      the default step (row_reduce "auto": ROW_REDUCE_AUTO where the kernels run)
  pallas                    every projection through gemv.gemv (the step before run 69)
  rr:NAMES                  exactly the projections NAMES (wqkv, wo, w13, w2, joined by +) of one token as
                            model._project's row reduction; the rest through the kernels
  tile:NAME=bn/bk/warps/stages[,...]  gemv.TUNED entries for this variant (comma-joined for several)
One engine per variant on the same random weights, one process. The pipelined step (no host reads) after a
prompt of each --contexts length, alternated over --rounds; the first 32 greedy tokens of each variant beside
the first variant's (float32 sums in another order: they may part where two logits nearly tie in bf16, as
random weights' logits often do). Background compiles are off. `--shape tiny --kernels interpret` is a CPU
dry run.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

from hybrid_jax import gemv as G  # noqa: E402
from hybrid_jax import model  # noqa: E402
from hybrid_jax import weights  # noqa: E402
from hybrid_jax.options import KernelOptions  # noqa: E402
from shapes import layer_matrices, shape_config  # noqa: E402  (scripts/ is this script's folder)
from hybrid_jax.engine import Engine, generate  # noqa: E402

@dataclasses.dataclass
class Variant:
    """One variant's switches: KernelOptions.row_reduce (None: the code's default), gemv.TUNED overrides."""
    row_reduce: frozenset[str] | None = None
    tiles: dict = dataclasses.field(default_factory=dict)


def parse(v: str, cfg) -> Variant:
    """A variant's name (see the module's docstring) -> its switches."""
    body = v
    var = Variant()
    shapes = {name: (kd, n) for name, kd, n in layer_matrices(cfg)}
    if body == "pallas":
        var.row_reduce = frozenset()
    elif body.startswith("rr:"):
        var.row_reduce = frozenset(body[3:].split("+"))
        if not var.row_reduce <= set(model.PROJECTIONS.values()):
            raise ValueError(f"unknown projection in {v!r}")
    elif body.startswith("tile:"):
        for part in body[5:].split(","):
            name, _, t = part.partition("=")
            bn, bk, wp, st = (int(a) for a in t.split("/"))
            var.tiles[(*shapes[name], True)] = G.GemvConfig(bn, bk, 1, wp, st)
    elif body != "base":
        raise ValueError(f"unknown variant {v!r}")
    return var


@contextlib.contextmanager
def applied(var: Variant):
    """The variant's tilings set while an engine traces its steps; the previous ones restored after (its row
    reductions go in the engine's options: `options`)."""
    tuned = dict(G.TUNED)
    G.TUNED.update(var.tiles)
    try:
        yield
    finally:
        G.TUNED.clear()
        G.TUNED.update(tuned)


def options(var: Variant, **kw) -> KernelOptions:
    """The engine's kernel options for the variant (`kw`: other fields)."""
    return KernelOptions(row_reduce="auto" if var.row_reduce is None else var.row_reduce, **kw)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--variants", default="base;pallas",
                    help="';'-separated; a tile: variant's tilings as NAME=bn/bk/warps/stages, comma-joined")
    ap.add_argument("--contexts", default="1,500")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--kernels", default="auto", help="gemv / decode_attention mode (interpret: CPU dry run)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    cfg = shape_config(args.shape)
    params = weights.init_random(cfg, jax.random.PRNGKey(0))
    jax.block_until_ready(params)
    variants = args.variants.split(";")
    contexts = [int(c) for c in args.contexts.split(",")]
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "shape": args.shape,
           "command": " ".join(sys.argv), "variants": {}}
    cache_dir = tempfile.mkdtemp()  # shared: the prefill (which no variant changes) compiles once
    engines = {}
    for v in variants:
        var = parse(v, cfg)
        t0 = time.perf_counter()
        with applied(var):  # the greedy decode steps compile (are traced) in the constructor
            # the row-reduction switches are in the decode step's disk key; gemv.TUNED's overrides are not
            eng = Engine(cfg, params, max_seq_len=1024, cache_dir=tempfile.mkdtemp() if var.tiles else cache_dir,
                         prefill_buckets=(16,), compile_sampling=False, background_compiles=False,
                         options=options(var, gemv=args.kernels, decode_attention=args.kernels))
            r = res["variants"][v] = {"row_reduce": None if var.row_reduce is None else sorted(var.row_reduce),
                                      "tiles": {str(k): c.__dict__ for k, c in var.tiles.items()},
                                      "build_s": round(time.perf_counter() - t0, 1)}
            r["tokens"] = generate(eng, [5, 6, 7, 8, 9, 10, 11, 12, 13, 14], max_new_tokens=32,
                                   ignore_eos=True).token_ids
        print(f"built {v}: {r['build_s']} s", flush=True)
        engines[v] = eng
    base = res["variants"][variants[0]]["tokens"]
    res["tokens_agree_prefix"] = {v: next((i for i, (a, b) in enumerate(zip(base, r["tokens"])) if a != b),
                                          len(base)) for v, r in res["variants"].items()}
    times = {(v, c): [] for v in variants for c in contexts}
    for rnd in range(args.rounds):
        order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
        for v in order:
            for c in contexts:
                times[(v, c)].append(engines[v].pipelined_step_seconds(args.steps, context=c))
    for (v, c), ts in times.items():
        res["variants"][v][f"step_ms_ctx{c}"] = [round(t * 1e3, 4) for t in ts]
    with open(os.path.join(args.out, "rowreduce_ab.json"), "w") as f:
        json.dump(res, f, indent=1)
    for e in engines.values():
        e.close()
    print(f"\n{res['device']}, jax {res['jax']}, {args.shape}; greedy tokens equal to {variants[0]}'s for the first "
          f"{res['tokens_agree_prefix']} of 32")
    print("| variant | " + " | ".join(f"step ms at {c} (median, min)" for c in contexts) + " | vs first (median) |")
    print("|---|" + "---|" * len(contexts) + "---|")
    ref = [np.median(res["variants"][variants[0]][f"step_ms_ctx{c}"]) for c in contexts]
    for v in variants:
        r = res["variants"][v]
        meds = [np.median(r[f"step_ms_ctx{c}"]) for c in contexts]
        print(f"| {v} | " + " | ".join(f"{m:.3f}, {min(r[f'step_ms_ctx{c}']):.3f}" for m, c in zip(meds, contexts))
              + " | " + ", ".join(f"{m - b:+.3f}" for m, b in zip(meds, ref)) + " |")


if __name__ == "__main__":
    main()
