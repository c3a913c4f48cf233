"""The decode step with some projections of the one token written as XLA row reductions, or with other Pallas
tilings, against the default step (issue 5; runs 67-68 of docs/ENGINEERING_LOG.md, session 10).

  PYTHONPATH=. python3 scripts/gpu_rowreduce_ab.py --out $OUT/rr \
      [--variants "base;rr:wqkv+wo+w13;rr:wqkv+wo+w13+w2;tile:w13=1/4096/4/1,wqkv=2/4096/8/1"]

Runs 67-68 found XLA's row-reduction emitter reading the 7B's matrices at 4.0-4.36 TB/s, against 3.1-3.7 for
the Pallas GEMVs. As `jnp.sum(w * x, axis=1)` the product itself ran at that rate for wqkv, wo and w13 (not
w2). In the step, a projection written that way loses the Pallas kernel's fused norm and consumer: XLA
computes the norm's mean square and silu x up in kernels of their own. Hence this A/B of whole steps.

Variants, separated by ";":
  base                      the default step (model._project as in the code)
  rr:NAMES                  the projections NAMES (wqkv, wo, w13, w2, joined by +) of one token as
                            sum(w[l] * h, axis=1) in float32 (h normalised by model.rms_norm first), with
                            the consumer as model.py computes it; the rest as in the code
  tile:NAME=bn/bk/warps/stages[,...]  gemv.TUNED entries for this variant (comma-joined for several)
One engine per variant on the same random weights, one process. The pipelined step (no host reads) after a
prompt of each --contexts length, alternated over --rounds; the first 32 greedy tokens of each variant beside
base's (float32 sums in another order: they may part where two logits nearly tie in bf16). Background compiles
are off. `--shape tiny --kernels interpret` is a CPU dry run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from hybrid_jax import gemv as G  # noqa: E402
from hybrid_jax import model  # noqa: E402
from hybrid_jax import weights  # noqa: E402
from shapes import shape_config  # noqa: E402  (scripts/ is this script's folder)
from hybrid_jax.engine import Engine, generate  # noqa: E402

# model._project's einsum spec -> the projection's name
SPECS = {"td,kghd->tkgh": "wqkv", "tkgh,dkgh->td": "wo", "td,cfd->tcf": "w13", "tf,df->td": "w2"}
ROW_REDUCE: set[str] = set()
_project = model._project


def project(mode, spec, x, stacked, l, out_shape, norm=None, eps=0.0, partials=False, residual=None, gated=False):
    """model._project, with the projections in ROW_REDUCE of one token as a float32 row reduction."""
    if not (mode is not None and x.shape[0] == 1 and SPECS.get(spec) in ROW_REDUCE):
        return _project(mode, spec, x, stacked, l, out_shape, norm=norm, eps=eps, partials=partials,
                        residual=residual, gated=gated)
    f32, dt = jnp.float32, x.dtype
    n = math.prod(out_shape)
    kd = math.prod(stacked.shape[1:]) // n
    w = stacked.reshape(stacked.shape[0], n, kd)
    h = x if norm is None else model.rms_norm(x, norm[l], eps)
    y = jnp.sum(w[l].astype(f32) * h.reshape(1, kd).astype(f32), axis=1)  # [N]
    if partials:  # one "split" of float32 sums, for the attention kernel
        return y.reshape((1,) + tuple(out_shape))
    y = y.astype(dt).reshape((1,) + tuple(out_shape))
    if gated:
        return jax.nn.silu(y[:, 0].astype(f32)).astype(dt) * y[:, 1]
    return y if residual is None else residual + y


def parse(v: str, cfg) -> tuple[set[str], dict]:
    rr, tiles = set(), {}
    shapes = {"wqkv": (cfg.dim, cfg.n_kv_heads * (cfg.q_per_kv + 2) * cfg.hd), "wo": (cfg.n_heads * cfg.hd, cfg.dim),
              "w13": (cfg.dim, 2 * cfg.ffn_dim), "w2": (cfg.ffn_dim, cfg.dim)}
    if v.startswith("rr:"):
        rr = set(v[3:].split("+"))
        if not rr <= set(SPECS.values()):
            raise ValueError(f"unknown projection in {v!r}")
    elif v.startswith("tile:"):
        for part in v[5:].split(","):
            name, _, t = part.partition("=")
            bn, bk, wp, st = (int(a) for a in t.split("/"))
            tiles[(*shapes[name], True)] = G.GemvConfig(bn, bk, 1, wp, st)
    elif v != "base":
        raise ValueError(f"unknown variant {v!r}")
    return rr, tiles


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--variants", default="base;rr:wqkv+wo+w13;rr:wqkv+wo+w13+w2;rr:w13",
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
    model._project = project
    code_tuned = dict(G.TUNED)
    cache_dir = tempfile.mkdtemp()  # shared: the prefill (which no variant changes) compiles once
    engines = {}
    try:
        for v in variants:
            rr, tiles = parse(v, cfg)
            ROW_REDUCE.clear()
            ROW_REDUCE.update(rr)
            G.TUNED.clear()
            G.TUNED.update({**code_tuned, **tiles})
            t0 = time.perf_counter()
            # a cache of its own for the decode step (the disk key does not know this script's switches)
            eng = Engine(cfg, params, max_seq_len=1024, cache_dir=tempfile.mkdtemp() if v != "base" else cache_dir,
                         prefill_buckets=(16,), compile_sampling=False, background_compiles=False,
                         gemv=args.kernels, decode_attention=args.kernels)
            r = res["variants"][v] = {"row_reduce": sorted(rr), "tiles": {str(k): c.__dict__ for k, c in tiles.items()},
                                      "build_s": round(time.perf_counter() - t0, 1)}
            r["tokens"] = generate(eng, [5, 6, 7, 8, 9, 10, 11, 12, 13, 14], max_new_tokens=32,
                                   ignore_eos=True).token_ids
            print(f"built {v}: {r['build_s']} s", flush=True)
            engines[v] = eng
    finally:
        ROW_REDUCE.clear()
        G.TUNED.clear()
        G.TUNED.update(code_tuned)
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
