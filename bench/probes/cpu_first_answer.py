"""The quick start on a CPU: the command line's time to an answer (warm, and optionally first ever), and
decode / prefill speed beside llama.cpp (llama-cpp-python) on the same GGUF, the same prompt ids and threads.

    python -m bench.probes.cpu_first_answer --out bench/results/DATE_CPU_first-answer [--first-ever]

llama.cpp runs the GGUF as it is (Q4_1 blocks); hybrid_jax runs its float32 conversion (dequantized), so the
bytes read per token differ ~4.5x: the numbers are for orientation, not a like-for-like kernel comparison.
Writes first_answer.json and prints a table.
"""
from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

from bench.probes.harness import parse, parser, write_json

QUESTION = "What is the capital of France?"


def _cli(env: dict, extra: tuple = (), timeout: float = 900) -> dict:
    """One `hybrid-jax generate` of the quick-start question (`extra`: more of its arguments): wall time, and the
    ready / TTFT lines."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "hybrid_jax", "generate", "--prompt", QUESTION, "--stats", *extra],
                       capture_output=True, text=True, env=env, timeout=timeout)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    ready = re.search(r"ready in ([\d.]+) s", r.stderr)
    ttft = re.search(r"TTFT ([\d.]+) ms", r.stdout + r.stderr)
    return {"wall_s": round(wall, 2), "ready_s": float(ready.group(1)) if ready else None,
            "ttft_ms": float(ttft.group(1)) if ttft else None, "answer": r.stdout.splitlines()[0] if r.stdout else ""}


def _ours(ids: list[int], new: int) -> dict:
    import hybrid_jax

    e = hybrid_jax.load()
    runs = [hybrid_jax.generate(e, ids, max_new_tokens=new, ignore_eos=True).timings for _ in range(3)]
    t = runs[-1]
    return {"prefill_ms": round(t.ttft_s * 1e3, 1), "decode_ms_p50": round(statistics.median(t.itl_s) * 1e3, 1),
            "decode_tok_s": round(1 / statistics.median(t.itl_s), 1), "cache_len": e.runtime.cache_len,
            "dtype": e.cfg.dtype, "prefill_chunks": t.prefill_chunks}


def _llama_cpp(gguf: str, ids: list[int], new: int, threads: int) -> dict:
    from llama_cpp import Llama, __version__

    llm = Llama(model_path=gguf, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    out = []
    for _ in range(3):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        prefill = time.perf_counter() - t0
        steps = []
        for _ in range(new):
            tok = int(llm.scores[llm.n_tokens - 1].argmax())  # greedy, as ours
            t = time.perf_counter()
            llm.eval([tok])
            steps.append(time.perf_counter() - t)
        out.append((prefill, steps))
    prefill, steps = out[-1]
    return {"prefill_ms": round(prefill * 1e3, 1), "decode_ms_p50": round(statistics.median(steps) * 1e3, 1),
            "decode_tok_s": round(1 / statistics.median(steps), 1), "version": __version__, "weights": "Q4_1"}


def main(argv=None) -> None:
    ap = parser(__doc__, shape=None)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--warm-runs", type=int, default=3)
    ap.add_argument("--first-ever", action="store_true", help="also time a run with empty caches (converts)")
    args = parse(ap, argv)

    from hybrid_jax import checkpoint
    from hybrid_jax.default_model import default_model_dir, ensure_default_model, smollm2_gguf
    from hybrid_jax.tokenizer import Tokenizer

    rec: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                             "python": platform.python_version()}, "command": " ".join(sys.argv)}
    env = dict(os.environ)
    if args.first_ever:
        with tempfile.TemporaryDirectory() as d:
            rec["first_ever"] = _cli({**env, "HYBRID_JAX_CACHE": os.path.join(d, "cache"),
                                      "XDG_CONFIG_HOME": os.path.join(d, "config")})
    ensure_default_model(progress=False)
    _cli(env)  # fills the executable cache
    rec["warm"] = [_cli(env) for _ in range(args.warm_runs)]
    path = default_model_dir()
    ids = Tokenizer(path, checkpoint.tokenizer_record(path)).encode(QUESTION)
    rec["prompt_tokens"] = len(ids)
    rec["new_tokens"] = args.new_tokens
    rec["hybrid_jax"] = _ours(ids, args.new_tokens)
    rec["llama_cpp"] = _llama_cpp(str(smollm2_gguf()), ids, args.new_tokens, threads=os.cpu_count())
    import jax
    rec["versions"] = {"jax": jax.__version__}
    write_json(os.path.join(args.out, "first_answer.json"), rec)

    walls = [r["wall_s"] for r in rec["warm"]]
    print(f"\nCPU: {rec['machine']['cpu']}, {rec['machine']['cores']} cores; prompt {len(ids)} tokens, "
          f"{args.new_tokens} new")
    if "first_ever" in rec:
        print(f"first ever `hybrid-jax generate`: {rec['first_ever']['wall_s']} s")
    print(f"warm `hybrid-jax generate`: {min(walls)}-{max(walls)} s over {len(walls)} runs")
    print(f"{'':12s} {'prefill ms':>10s} {'decode ms':>10s} {'tok/s':>7s}  weights")
    for name in ("hybrid_jax", "llama_cpp"):
        r = rec[name]
        print(f"{name:12s} {r['prefill_ms']:10.1f} {r['decode_ms_p50']:10.1f} {r['decode_tok_s']:7.1f}  "
              f"{r.get('weights', r.get('dtype'))}")


if __name__ == "__main__":
    main()
