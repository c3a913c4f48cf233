"""The prompt's own-bucket attention through cuDNN's fused flash attention (model.fused_attention) against
XLA's unfused attention (scores, mask, softmax, two products: ~5 kernels a layer), on one GPU:

1. check: a 2-layer model with the 7B's matrices and heads, a prompt of 100 tokens in a 128 bucket: the
   logits of every row with and without the fused kernel (float32 and bfloat16), and that the compiled
   prefill holds the cuDNN custom call;
2. engine: two engines over the same random 7B weights (fused and not), compiled side by side; per prompt
   length (10 / 100 / 500, the suite's prompts), generate()'s TTFT, the prefill call's host time, and the
   prefill's device time (5 back to back, no reads), alternating the engines rep by rep.

  PYTHONPATH=. python3 scripts/gpu_prefill_attn.py [--shape llama2-7b|tiny] [--out $OUT]
Writes prefill_attn.json.
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
import jax.numpy as jnp  # noqa: E402

from gpu_prefill_host import back_to_back, request  # noqa: E402
from hybrid_jax.options import KernelOptions  # noqa: E402


def check(cfg, fused: str, out: dict):
    from hybrid_jax import kv_cache, model, weights
    rows = []
    for dtype in (("bfloat16",) if fused == "cudnn" else ("float32", "bfloat16")):  # cuDNN: 16-bit only
        c = cfg.replace(n_layers=2, dtype=dtype)
        p = weights.init_random(c, jax.random.PRNGKey(1))
        ids = jnp.asarray(np.random.RandomState(0).randint(3, c.vocab_size, size=128), jnp.int32)
        pos = jnp.arange(128, dtype=jnp.int32)

        def f(p, ids, fz):
            opts = KernelOptions.xla(matmul_2d=jax.default_backend() == "cpu").replace(prefill_attention=fz or "off",
                                                                                     prefill_attention_min_rows=0)
            return model.forward(c, p, kv_cache.zeros(c, 128), ids, pos, kv_len=128, opts=opts)[0]
        ref = np.asarray(jax.jit(lambda p, i: f(p, i, None))(p, ids), np.float64)
        got = np.asarray(jax.jit(lambda p, i: f(p, i, fused))(p, ids), np.float64)
        err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        same = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
        rows.append({"dtype": dtype, "rel_err": err, "argmax_equal_frac": same})
        print(f"check {c.dim}x{c.n_heads}/{c.n_kv_heads} heads {dtype}: rel err {err:.2e}, argmax equal on {same:.3f} of 128 rows", flush=True)
    out["check"] = rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--lengths", default="10,100,500")
    ap.add_argument("--check-shapes", default="", help="also check these shapes (bench.worker.SHAPES: "
                    "llama2-70b, smollm2 (head dim 64, 3 query heads per kv head), ...)")
    ap.add_argument("--check-only", action="store_true")
    args = ap.parse_args()
    from bench.worker import SHAPES, prompt_ids
    from hybrid_jax import weights
    from hybrid_jax.config import PRESETS, LlamaConfig
    from hybrid_jax.engine import Engine, generate
    cfg = PRESETS.get(args.shape) or LlamaConfig(vocab_size=512, dim=256, n_layers=2, n_heads=2, n_kv_heads=2,
                                                 ffn_dim=512, dtype="bfloat16")  # "tiny": a dry run
    gpu = jax.devices()[0].platform == "gpu"
    fused = "cudnn" if gpu else "xla"
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "fused": fused}
    path = os.path.join(args.out, "prefill_attn.json")

    def save():
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
    check(cfg, fused, out)
    for name in [x for x in args.check_shapes.split(",") if x]:
        c = SHAPES[name]
        sub = {}
        check(c, fused, sub)
        out[f"check_{name}"] = sub["check"]
    save()
    if args.check_only:
        return
    lengths = [int(x) for x in args.lengths.split(",")]
    params = weights.init_random(cfg, jax.random.PRNGKey(0))
    jax.block_until_ready(params)
    cache_dir = tempfile.mkdtemp()
    t0 = time.perf_counter()
    engs = {name: Engine(cfg, params, max_seq_len=1024, cache_dir=cache_dir, compile_sampling=False,
                         options=KernelOptions(prefill_attention=mode))
            for name, mode in (("fused", fused), ("xla", None))}
    futs = [e.runtime._get_async(("prefill", e.runtime.bucket_for(n), e.runtime.bucket_for(n)))
            for e in engs.values() for n in lengths]
    for f in futs:
        if f is not None:
            f.result()
    out["compile_s"] = time.perf_counter() - t0
    spec = ("prefill", engs["fused"].runtime.bucket_for(lengths[0]), engs["fused"].runtime.bucket_for(lengths[0]))
    try:
        txt = engs["fused"].runtime._get(spec).as_text()
        out["cudnn_calls_in_prefill"] = txt.count("__cudnn$fmha")
    except Exception as e:  # noqa: BLE001
        out["cudnn_calls_in_prefill"] = f"{type(e).__name__}: {e}"
    print(f"compiled in {out['compile_s']:.0f} s; cuDNN attention calls in the prefill: {out['cudnn_calls_in_prefill']}",
          flush=True)
    for e in engs.values():  # warm
        for n in lengths:
            for rep in range(2):
                request(e.runtime, prompt_ids(cfg.vocab_size, n, rep, 0))
    res = {name: {} for name in engs}
    for n in lengths:
        acc = {name: {"gen": [], "call": [], "device": []} for name in engs}
        for rep in range(args.reps):
            ids = prompt_ids(cfg.vocab_size, n, rep, 0)
            for name, e in (engs.items() if rep % 2 == 0 else reversed(list(engs.items()))):
                rt = e.runtime
                acc[name]["gen"].append(generate(e, ids, max_new_tokens=16, ignore_eos=True).timings.ttft_s * 1e3)
                acc[name]["call"].append(request(rt, ids, 4)[0])
                acc[name]["device"].append(back_to_back(rt, ids, 5) * 1e3)
        for name in engs:
            a = acc[name]
            res[name][n] = {k: float(np.median(v)) for k, v in a.items()} | {"gen_all": [round(v, 3) for v in a["gen"]]}
            print(f"{name:6s} {n:4d} tok: TTFT p50 {res[name][n]['gen']:.2f} ms (max {max(a['gen']):.2f}), prefill call "
                  f"{res[name][n]['call']:.2f} ms, prefill back to back {res[name][n]['device']:.2f} ms", flush=True)
        out["engine"] = res
        save()
    for e in engs.values():
        e.close()


if __name__ == "__main__":
    main()
