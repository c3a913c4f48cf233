"""The embedded SmolLM2 GGUF on this machine's CPU: perplexity on tests/data/perplexity.txt and decode ms a token,
for our conversions (dequantized float32, its own Q4_1 blocks, re-quantized schemes) and for llama.cpp
(llama-cpp-python, built from source) on the same file and the same token ids.

    python -m bench.probes.cpu_quant_peer --out $OUT [--schemes dequantized,native,int8,int8-g32] [--threads 2]

Perplexity: one forward over the whole text (~2,000 tokens; our XLA prefill path, llama.cpp's eval with all
logits). Decode: 64 greedy one-token steps after a 100-token prompt, median ms a step (ours: steps enqueued back
to back, Engine.step_seconds; llama.cpp: eval of one token at a time). Writes cpu_quant_peer.json.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

TEXT = Path(__file__).resolve().parents[2] / "tests" / "data" / "perplexity.txt"


def _nll(logits: np.ndarray, ids: list[int]) -> float:
    lg = logits[:-1].astype(np.float64)
    lg = lg - lg.max(axis=1, keepdims=True)
    logp = lg - np.log(np.exp(lg).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


def ours(path: str, ids: list[int]) -> dict:
    import jax
    import jax.numpy as jnp

    import hybrid_jax
    from hybrid_jax import checkpoint, kv_cache, model

    cfg, p = checkpoint.restore(path)
    n = len(ids)
    lg, _ = jax.jit(lambda p, c, t: model.forward(cfg, p, c, t, jnp.arange(n, dtype=jnp.int32)))(
        p, kv_cache.zeros(cfg, n), jnp.asarray(ids, jnp.int32))
    ppl = float(np.exp(_nll(np.asarray(lg), ids)))
    eng = hybrid_jax.load(path, max_seq_len=256, compile_sampling=False)
    eng.runtime.wait_background()
    spec = ("decode", eng.runtime.cache_len, False)
    step = statistics.median(eng.step_seconds([spec], 64, ids[:100])[0] for _ in range(3))
    eng.close()
    return {"perplexity": ppl, "decode_ms": step * 1e3, "quant": cfg.quant}


def llama_cpp(gguf: str, ids: list[int], threads: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=len(ids) + 16, n_batch=512, logits_all=True, n_threads=threads, verbose=False)
    llm.eval(ids)
    ppl = float(np.exp(_nll(np.asarray(llm.scores[: len(ids)]), ids)))
    llm = Llama(model_path=gguf, n_ctx=256, n_batch=128, n_threads=threads, verbose=False)
    times = []
    for _ in range(3):
        llm.reset()
        llm.eval(ids[:100])
        t0 = time.perf_counter()
        for t in ids[100:164]:
            llm.eval([t])
        times.append((time.perf_counter() - t0) / 64)
    return {"perplexity": ppl, "decode_ms": statistics.median(times) * 1e3}


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--schemes", default="dequantized,native,int8,int8-g32")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)
    from convert.api import convert
    from hybrid_jax import checkpoint
    from hybrid_jax.default_model import smollm2_gguf
    from hybrid_jax.tokenizer import Tokenizer

    gguf = str(smollm2_gguf())
    work = Path(tempfile.mkdtemp())
    rows = {}
    ids = None
    for s in args.schemes.split(","):
        q = {"dequantized": None, "native": "auto"}.get(s, s)
        d = convert(gguf, work / s, dtype="float32", progress=False, quantize=q)
        if ids is None:
            ids = Tokenizer(d, checkpoint.tokenizer_record(d)).encode(TEXT.read_text(), chat=False)
        rows[s] = ours(str(d), ids)
        print(s, rows[s], flush=True)
    try:
        rows["llama.cpp (Q4_1)"] = llama_cpp(gguf, ids, args.threads)
    except ImportError as e:
        rows["llama.cpp (Q4_1)"] = {"error": f"llama-cpp-python not installed: {e}"}
    print("llama.cpp", rows["llama.cpp (Q4_1)"], flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cpu_quant_peer.json"), "w") as f:
        json.dump({"tokens": len(ids), "cpu_count": os.cpu_count(), "threads": args.threads, "rows": rows}, f, indent=1)
    print(f"\n{len(ids)} tokens; {os.cpu_count()} CPUs")
    print("model               perplexity  decode ms")
    for k, r in rows.items():
        if "error" not in r:
            print(f"{k:20s} {r['perplexity']:10.3f} {r['decode_ms']:10.1f}")


if __name__ == "__main__":
    main()
