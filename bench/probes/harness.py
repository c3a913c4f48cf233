"""What every probe shares: the argument preamble, the model shapes, a random-weight engine, timers.

Probes run as modules from the repository root (`python -m bench.probes.NAME`), so they need no `sys.path`
preamble. Nothing here imports jax at module level: a parent process that only starts workers (tp_check,
restore_memory) must not initialise it, and a child must be able to set XLA_FLAGS first.
"""
from __future__ import annotations

import argparse
import json
import os
import time

TINY_DIMS = dict(vocab_size=512, dim=256, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=512)


# ---- arguments ---------------------------------------------------------------------------------------

def parser(doc: str | None, shape: str | None = "llama2-7b") -> argparse.ArgumentParser:
    """An ArgumentParser with the module's docstring as its help, `--out` (default $OUT, else .) and, unless
    `shape` is None, `--shape` (see `shape_config`; "tiny" dry-runs a probe on the CPU)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the probe's files")
    if shape is not None:
        ap.add_argument("--shape", default=shape, help="a preset of hybrid_jax.config, smollm2-135m (smollm2) "
                        "or tiny (a small model: a CPU dry run)")
    return ap


def parse(ap: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """ap.parse_args, then the output folder made."""
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    return args


def write_json(path: str, obj) -> None:
    """Atomic: a kill mid-write leaves the previous version."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def run_record() -> dict:
    """Which device, jax and XLA flags a result came from."""
    import jax
    return {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")}


# ---- shapes ------------------------------------------------------------------------------------------

def shape_config(name: str, dtype: str = "bfloat16"):
    """PRESETS[name], the suite's SmolLM2-135M shape for "smollm2-135m" or "smollm2", a small model for "tiny"
    (in `dtype`). Any other name is an error (run 75 timed the tiny shape for a name this did not know)."""
    from bench.worker import SMOLLM2_135M
    from hybrid_jax.config import PRESETS, LlamaConfig
    cfg = PRESETS.get(name) or {"smollm2-135m": SMOLLM2_135M, "smollm2": SMOLLM2_135M}.get(name)
    if name == "tiny":
        cfg = LlamaConfig(**TINY_DIMS, dtype=dtype)
    if cfg is None:
        known = sorted(PRESETS) + ["smollm2-135m", "smollm2", "tiny"]
        raise SystemExit(f"unknown --shape {name!r}; known: {', '.join(known)}")
    return cfg


def layer_matrices(cfg) -> list[tuple[str, int, int]]:
    """(name, Kd, N) of each layer matrix as the one-token step multiplies by it: N output rows of Kd inputs
    (weights.shapes stores them output-major, [L, (out dims), (in dims)])."""
    K, Gq, Dh = cfg.n_kv_heads, cfg.q_per_kv, cfg.hd
    return [("wqkv", cfg.dim, K * (Gq + 2) * Dh), ("wo", cfg.n_heads * Dh, cfg.dim),
            ("w13", cfg.dim, 2 * cfg.ffn_dim), ("w2", cfg.ffn_dim, cfg.dim)]


# ---- engines -----------------------------------------------------------------------------------------

def random_params(cfg, seed: int = 0):
    """Random weights of `cfg`'s shape, made on the device and waited for."""
    import jax
    from hybrid_jax import weights
    params = weights.init_random(cfg, jax.random.PRNGKey(seed))
    jax.block_until_ready(params)
    return params


def random_engine(cfg, params=None, lengths=(), max_seq_len: int = 1024, cache_dir: str | None = None,
                  **engine_kw):
    """(engine, params): an Engine over random weights (`params`, else fresh ones) with its own executable cache
    (a temporary folder unless `cache_dir`) and each prompt length's own prefill bucket compiled."""
    import tempfile
    from hybrid_jax.engine import Engine
    params = random_params(cfg) if params is None else params
    engine_kw.setdefault("kv_reuse", False)  # the probes repeat prompts to time their prefill
    eng = Engine(cfg, params, max_seq_len=max_seq_len, cache_dir=cache_dir or tempfile.mkdtemp(), **engine_kw)
    rt = eng.runtime
    for f in [rt.compile_async(("prefill", rt.bucket_for(n), rt.bucket_for(n))) for n in lengths]:
        if f is not None:
            f.result()
    return eng, params


def interpret_kernels_on_cpu() -> bool:
    """On the CPU backend, run the Pallas kernels (gemv, gemm, decode attention) in the interpreter: a dry run of a
    probe's loop. Returns whether it did."""
    import jax
    if jax.default_backend() != "cpu":
        return False
    from hybrid_jax import decode_attention as A
    from hybrid_jax import gemv as G
    orig, orig_m, orig_a = G.gemv, G.gemm, A.attend
    G.gemv = lambda *a, **k: orig(*a, **{**k, "interpret": True})
    G.gemm = lambda *a, **k: orig_m(*a, **{**k, "interpret": True})
    A.attend = lambda *a, **k: orig_a(*a, **{**k, "interpret": True})
    return True


# ---- timers ------------------------------------------------------------------------------------------

def timed(f, args, iters: int = 30) -> float:
    """Seconds per call of jax function `f(*args)`: host wall clock over `iters` calls after warm-up, the last
    result waited for (the calls queue on the device, so this is the device's time when it is busy)."""
    import jax
    jax.block_until_ready(f(*args))
    for _ in range(3):
        r = f(*args)
    jax.block_until_ready(r)
    t0 = time.perf_counter()
    for _ in range(iters):
        r = f(*args)
    jax.block_until_ready(r)
    return (time.perf_counter() - t0) / iters


def torch_seconds(run, iters: int) -> float:
    """Seconds per call of `run` (PyTorch work on the GPU), by CUDA events over `iters` calls after 3."""
    import torch
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(iters):
        run()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / 1e3 / iters


def hlo_counts(txt: str) -> dict:
    """Counts in an executable's optimised HLO (`Runtime.executable(spec).as_text()`), its entry computation:
    copies of a weight's layer slice (a kLoop fusion of a stacked weight; XLA makes one per layer for a cuBLAS
    operand, run 32), cuBLAS calls, Triton GEMMs, fusions and custom calls."""
    import re
    entry = txt[txt.find("\nENTRY"):]
    return {"slice_copies": len(re.findall(r"= \S+ fusion\(%p_layers_\w+(\.\d+)?\), kind=kLoop", entry)),
            "cublas_calls": len(re.findall(r'custom_call_target="__cublas', entry)),
            "triton_gemms": len(re.findall(r"kind=kCustom, calls=%gemm_fusion", entry)),
            # launches outside the command buffers' bookkeeping: XLA fusions and custom calls (Pallas, cuDNN, sort)
            "fusions": len(re.findall(r"= \S+ fusion\(", entry)),
            "custom_calls": len(re.findall(r"= \S+ custom-call\(", entry))}
