"""Latency suite: TTFT and streaming TPOT of hybrid_jax against its ablations and HF transformers peers.

    python -m bench.latency --shape llama2-7b --quick --out bench/results
    python -m bench.latency --model DIR --systems hybrid,hf_eager --prompt-lengths 10,100 --reps 50

Every system runs in a process of its own (XLA_FLAGS are read once per process; GPU memory is not
shared between systems); a first process measures the floors. Results: raw JSON lines, results.md and
plots under OUT/YYYY-MM-DD_<card>_<name>/.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import report
from .stats import read_jsonl, write_jsonl
from .worker import HF_SYSTEMS, SHAPES, sanitize, versions

ALL_SYSTEMS = ("hybrid", "hybrid_nocb", "hybrid_xlagemv", "hybrid_pallasgemv", "hybrid_devtoken", "hybrid_nofused", "hybrid_cudnnall", "hybrid_xlawo",
               "hybrid_vmm", "hybrid_cublas", "hybrid_autotune", "hybrid_nopipe", "hybrid_nobuckets", "hybrid_spec_ngram",
               "hybrid_spec_draft", "plainjit",
               "hf_eager", "hf_compile", "hf_lookup")
FULL_LENGTHS = (10, 20, 50, 100, 200, 300, 400, 500)
QUICK_LENGTHS = (10, 100, 500)
QUICK_SYSTEMS = ("hybrid", "plainjit", "hf_eager", "hf_compile")
NOCB = "--xla_gpu_enable_command_buffer="
# The hybrid ablations and settings: system -> (XLA_FLAGS appended, environment). The HYBRID_JAX_* variables
# become the worker's kernel options (hybrid_jax.options.KernelOptions.from_env; table in bench/README.md).
# hybrid_vmm: the CUDA VMM allocator with the prefill's temp buffer at a fixed virtual address, so its command
# buffer is not re-pointed when the allocator moves it.
HYBRID_VARIANTS = {
    "hybrid": ("", ()),
    "hybrid_nocb": (NOCB, ()),
    "hybrid_xlagemv": ("", (("HYBRID_JAX_GEMV", "xla"),)),
    # every projection of the decode step through the Pallas GEMVs, none as XLA row reductions (before run 70)
    "hybrid_pallasgemv": ("", (("HYBRID_JAX_ROW_REDUCE", "none"),)),
    # the next token in device memory, a new buffer each call (KernelOptions.token_memory)
    "hybrid_devtoken": ("", (("HYBRID_JAX_TOKEN_MEMORY", "device"),)),
    "hybrid_nofused": ("", (("HYBRID_JAX_PREFILL_ATTN", "off"),)),
    # cuDNN's attention in every bucket (KernelOptions.prefill_attention_min_rows)
    "hybrid_cudnnall": ("", (("HYBRID_JAX_PREFILL_ATTN", "all"),)),
    "hybrid_xlawo": ("", (("HYBRID_JAX_PREFILL_WO", "xla"),)),  # the prefill's wo through XLA
    "hybrid_vmm": ("--xla_gpu_command_buffer_update_mode=SKIP_TEMP", (("XLA_PYTHON_CLIENT_ALLOCATOR", "vmm"),)),
    # the prefill's matmuls through cuBLAS's heuristics at every length (runtime.PREFILL_MATMULS), or autotuned
    # at every length; the default splits them at runtime.CUBLAS_MIN_ROWS
    "hybrid_cublas": ("", (("HYBRID_JAX_PREFILL_MATMULS", "cublas"),)),
    "hybrid_autotune": ("", (("HYBRID_JAX_PREFILL_MATMULS", "autotune"),)),
    # the worker builds these itself: the host reading each token before the next step is enqueued
    # (Engine.pipeline_depth 1); a prefill executable of each prompt's exact length instead of the buckets
    "hybrid_nopipe": ("", ()),
    "hybrid_nobuckets": ("", ()),
    # speculative decoding (the worker builds the engine with it: --num-speculative-tokens, --draft)
    "hybrid_spec_ngram": ("", ()),
    "hybrid_spec_draft": ("", ()),
}
UNSUPPORTED = ("Unknown flag in XLA_FLAGS", "Flag parsing failed", "Unknown command line flag")


def _ints(s: str) -> list[int]:
    return [int(x) for x in str(s).split(",") if x.strip()]


def add_common_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", help="a converted checkpoint folder (real weights)")
    g.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this exact shape, made on the device")
    p.add_argument("--prompt-lengths", type=_ints, default=None, help="default 10,20,50,100,200,300,400,500")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per point (default 100, quick 15)")
    p.add_argument("--warmup", type=int, default=None, help="untimed generations per point (default 3, quick 1)")
    p.add_argument("--quick", action="store_true", help="prompt lengths 10,100,500, 15 reps (3 for hf_eager), 1 "
                   "warm-up, no background compile of the sampling step: about 10 minutes for 4 systems on a 7B")
    p.add_argument("--eager-reps", type=int, default=None, help="reps of hf_eager (default --reps; quick 3)")
    p.add_argument("--out", default="bench/results", help="results root; the run's folder is made inside")
    p.add_argument("--name", default=None, help="suffix of the results folder")
    p.add_argument("--dtype", default=None, help="default bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--quantize", default=None, help="random weights (--shape) with the layer matrices quantized in "
                   "this scheme (hybrid_jax.quant: int8, int8-gN, int4-gN-asym, int4-gN-sym); the HF systems "
                   "quantize theirs with torchao's matching weight-only config (peers.torchao_config)")
    p.add_argument("--max-seq-len", type=int, default=None, help="cache length, the same for every system "
                   "(default max(1024, next power of two >= longest prompt + new tokens))")
    p.add_argument("--buckets", type=_ints, default=None, help="hybrid prefill buckets (default: the runtime's)")
    p.add_argument("--cache-root", default=None, help="where the fresh executable caches go (default: a temp dir)")
    p.add_argument("--pipelined-steps", type=int, default=100)
    p.add_argument("--pipelined-reps", type=int, default=None, help="default 5 (quick 3)")
    p.add_argument("--floor-bytes", type=int, default=None, help="copy size (default 2 GiB on GPU, 64 MiB on CPU)")
    p.add_argument("--matmul-n", type=int, default=None, help="matmul size (default 8192 on GPU, 512 on CPU)")
    p.add_argument("--floor-reps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker-timeout", type=float, default=None, help="seconds before a worker is killed")
    p.add_argument("--lean", action="store_true", help="hybrid: skip the background compile of the sampling step")
    p.add_argument("--workload", default=None, help="text prompts instead of random ids at --prompt-lengths: a JSON "
                   "file of bench/workloads (name or path) whose lists of prompts are sent through the model's chat "
                   "template (needs --model); answers end at EOS or --new-tokens")
    p.add_argument("--num-speculative-tokens", type=int, default=8, help="hybrid_spec_*: K proposals a step")
    p.add_argument("--draft", default=None, help="hybrid_spec_draft: the draft's converted folder (with --shape: "
                   "random weights of a ~0.2 B model of the same vocabulary)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--systems", default=None, help=f"comma list of {', '.join(ALL_SYSTEMS)} (default all; with "
                   f"--quick {','.join(QUICK_SYSTEMS)})")
    p.add_argument("--no-coldstart", action="store_true", help="skip the warm-cache start-up process")
    w = p.add_argument_group("worker (internal)")
    w.add_argument("--worker", help=argparse.SUPPRESS)
    w.add_argument("--out-jsonl", help=argparse.SUPPRESS)
    w.add_argument("--label", help=argparse.SUPPRESS)
    w.add_argument("--system-name", help=argparse.SUPPRESS)
    w.add_argument("--variant", default="", help=argparse.SUPPRESS)
    w.add_argument("--run", default="", help=argparse.SUPPRESS)
    w.add_argument("--cache-dir", help=argparse.SUPPRESS)
    w.add_argument("--t-spawn", type=float, default=None, help=argparse.SUPPRESS)
    w.add_argument("--lengths", type=_ints, help=argparse.SUPPRESS)
    return p


def finalize_args(args) -> argparse.Namespace:
    if not args.model and not args.shape:
        args.shape = "llama2-7b"
    if args.prompt_lengths is None:
        args.prompt_lengths = list(QUICK_LENGTHS if args.quick else FULL_LENGTHS)
    args.reps = args.reps if args.reps is not None else (15 if args.quick else 100)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.eager_reps = args.eager_reps if args.eager_reps is not None else (min(3, args.reps) if args.quick else args.reps)
    args.lean = args.lean or args.quick
    if args.pipelined_reps is None:
        args.pipelined_reps = 3 if args.quick else 5
    need = max(args.prompt_lengths) + args.new_tokens
    if args.max_seq_len is None:
        p2 = 1 << (need - 1).bit_length()
        args.max_seq_len = max(1024, p2)
    if need > args.max_seq_len:
        raise SystemExit(f"longest prompt + new tokens ({need}) exceeds --max-seq-len {args.max_seq_len}")
    if args.quantize is not None:
        if args.model:
            raise SystemExit("--quantize makes random quantized weights (--shape); a converted checkpoint carries "
                             "its own scheme (python -m convert --quantize)")
        from hybrid_jax import quant
        try:
            args.quantize = quant.parse(args.quantize).name
        except ValueError as e:
            raise SystemExit(f"--quantize: {e}") from None
    if args.workload is not None:
        if not args.model:
            raise SystemExit("--workload sends text through a tokenizer: it needs --model DIR")
        from .worker import workload_path
        args.workload = str(workload_path(args.workload))
    args.lengths = args.prompt_lengths
    args.dtype_resolved = args.dtype
    return args


# ---- the parent: spawning workers ------------------------------------------------------------------

@dataclasses.dataclass
class Spec:
    label: str  # what tables call it
    system: str  # worker system
    variant: str = ""  # flag-set name (sweeps)
    xla_flags: str = ""  # appended to the inherited XLA_FLAGS
    coldstart: bool = False  # also time a second start from the warm executable cache
    env: tuple = ()  # (name, value) pairs set in the worker's environment


def worker_argv(args, spec: Spec, system: str, out_jsonl: Path, run: str, cache_dir: str | None) -> list[str]:
    a = [sys.executable, "-m", "bench.latency", "--worker", system, "--out-jsonl", str(out_jsonl),
         "--label", spec.label, "--system-name", spec.system, "--variant", spec.variant, "--run", run,
         "--prompt-lengths", ",".join(map(str, args.prompt_lengths)), "--new-tokens", str(args.new_tokens),
         "--reps", str(args.eager_reps if system == "hf_eager" else args.reps), "--warmup", str(args.warmup), "--max-seq-len", str(args.max_seq_len),
         "--pipelined-steps", str(args.pipelined_steps), "--pipelined-reps", str(args.pipelined_reps),
         "--seed", str(args.seed), "--t-spawn", repr(time.time())]
    a += ["--model", args.model] if args.model else ["--shape", args.shape]
    for opt, val in (("--dtype", args.dtype), ("--cache-dir", cache_dir), ("--floor-bytes", args.floor_bytes),
                     ("--matmul-n", args.matmul_n), ("--floor-reps", args.floor_reps)):
        if val is not None:
            a += [opt, str(val)]
    if args.buckets:
        a += ["--buckets", ",".join(map(str, args.buckets))]
    if args.lean:
        a.append("--lean")
    for opt, val in (("--workload", args.workload), ("--draft", args.draft), ("--quantize", args.quantize)):
        if val is not None:
            a += [opt, str(val)]
    a += ["--num-speculative-tokens", str(args.num_speculative_tokens)]
    return a


def _count_samples(path: Path) -> int:
    try:
        with open(path) as f:
            return sum(1 for line in f if '"kind": "sample"' in line)
    except FileNotFoundError:
        return 0


def spawn(argv: list[str], env: dict, log_path: Path, out_jsonl: Path, bar=None, timeout: float | None = None) -> int:
    """Run one worker, its output to log_path, advancing `bar` by the samples it writes; its exit status."""
    repo = str(Path(__file__).resolve().parent.parent)
    env = {**env, "PYTHONPATH": repo + os.pathsep + env.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=repo)
        try:
            return _wait(proc, log, out_jsonl, bar, timeout)
        except KeyboardInterrupt:
            proc.kill()
            proc.wait()
            raise


def _wait(proc, log, out_jsonl: Path, bar, timeout: float | None) -> int:
    t0, done = time.time(), _count_samples(out_jsonl)
    while True:
        try:
            rc = proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            rc = None
            if timeout and time.time() - t0 > timeout:
                proc.kill()
                rc = proc.wait()
                log.write(f"\n[bench] worker killed after {timeout:.0f} s\n".encode())
        if bar is not None:
            n = _count_samples(out_jsonl)
            if n != done:
                bar.update(n - done)
                done = n
        if rc is not None:
            return rc


def classify_failure(rc: int, log_text: str) -> tuple[str, str]:
    """(status, message) of a worker that exited with `rc`: 'unsupported flag' where XLA refused XLA_FLAGS."""
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    for ln in lines:
        if any(k in ln for k in UNSUPPORTED):
            usage = next((u for u in lines if u.startswith("usage:")), "")
            return "unsupported flag", (ln + (f" ({usage})" if usage else ""))[:500]
    tail = " | ".join(lines[-6:])
    return "error", f"exit status {rc}: {tail}"[:1500]


def worker_env(spec: Spec) -> dict:
    env = dict(os.environ)
    if spec.xla_flags:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + spec.xla_flags).strip()
    env.update(dict(spec.env))
    if spec.system in HF_SYSTEMS:  # jax (used to read a checkpoint) must not take GPU memory in a torch process
        env["JAX_PLATFORMS"] = "cpu"
    return env


def _results_dir(root: Path, card: str, name: str) -> Path:
    base = root / f"{_dt.date.today().isoformat()}_{sanitize(card)}_{sanitize(name)}"
    d, k = base, 2
    while d.exists():
        d, k = Path(f"{base}-{k}"), k + 1
    return d


def run_suite(args, specs: list[Spec], kind: str, argv: list[str]) -> Path:
    """Floors first, then every spec in its own process; merge, render, return the results folder."""
    from tqdm import tqdm

    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    cache_root = Path(args.cache_root) if args.cache_root else Path(tempfile.mkdtemp(prefix="hybrid_jax-bench-cache-"))
    run = f"{kind}-{_dt.datetime.now().strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    (stage / "logs").mkdir()
    parts: list[Path] = []
    current = Spec("floors", "floors")
    total = sum(args.eager_reps if s.system == "hf_eager" else args.reps for s in specs) * len(args.prompt_lengths)
    bar = tqdm(total=total, unit="gen", desc="floors", file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
    try:
        fl = stage / "part-floors.jsonl"
        fs = Spec("floors", "floors")
        rc = spawn(worker_argv(args, fs, "floors", fl, run, None), worker_env(fs), stage / "logs" / "floors.log", fl,
                   timeout=args.worker_timeout)
        recs = read_jsonl(fl) if fl.exists() else []
        floors = next((r for r in recs if r["kind"] == "floors"), None)
        if rc != 0 or floors is None:
            log = (stage / "logs" / "floors.log").read_text(errors="replace")
            raise SystemExit(f"floors worker failed ({classify_failure(rc, log)[1]}); see {stage}/logs/floors.log")
        out = _results_dir(root, floors["card"], args.name or f"{kind}_{args.shape or Path(args.model).name}")
        os.rename(stage, out)
        parts.append(out / fl.name)
        head = {"kind": "run", "run": run, "suite": kind, "argv": argv, "command": shlex.join(argv),
                "started": _dt.datetime.now().isoformat(timespec="seconds"), "card": floors["card"],
                "platform": floors["platform"], "versions": versions(),
                "model": args.model, "shape": args.shape, "weights": "checkpoint" if args.model else "random",
                "dtype": floors["dtype"] if args.dtype is None else args.dtype, "prompt_lengths": args.prompt_lengths,
                "new_tokens": args.new_tokens, "reps": args.reps, "eager_reps": args.eager_reps, "warmup": args.warmup,
                "lean": args.lean,
                "max_seq_len": args.max_seq_len, "labels": [s.label for s in specs],
                "xla_flags_inherited": os.environ.get("XLA_FLAGS", "")}
        write_jsonl(out / "part-run.jsonl", [head])
        parts.insert(0, out / "part-run.jsonl")
        prev = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
        try:
            for spec in specs:
                current = spec
                _run_spec(args, spec, out, run, cache_root, parts, bar)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (a time limit): keep and render what was measured
            print(f"[bench] interrupted during {current.label}; rendering what was measured", file=sys.stderr)
            part = out / f"part-{sanitize(current.label)}.jsonl"
            if part not in parts:
                parts.append(part)
            if not any(r["kind"] == "system" for r in _read(part)):
                write_jsonl(part, [{"kind": "system", "run": run, "label": current.label, "system": current.system,
                                    "variant": current.variant, "status": "interrupted",
                                    "message": "the run was interrupted (Ctrl-C or a time limit) during this system",
                                    "xla_flags": current.xla_flags}], mode="a")
        finally:
            if prev is not None:
                signal.signal(signal.SIGTERM, prev)
    finally:
        bar.close()
        if not args.cache_root:
            shutil.rmtree(cache_root, ignore_errors=True)
        if stage.exists():
            print(f"[bench] partial output left in {stage}", file=sys.stderr)
    records = [r for p in parts for r in _read(p)]
    write_jsonl(out / "results.jsonl", records)
    for p in parts:
        p.unlink(missing_ok=True)
    report.render(out, records)
    print(f"[bench] results in {out}", file=sys.stderr)
    return out


def _run_spec(args, spec: Spec, out: Path, run: str, cache_root: Path, parts: list[Path], bar) -> None:
    bar.set_description(spec.label)
    part = out / f"part-{sanitize(spec.label)}.jsonl"
    parts.append(part)
    cdir = str(cache_root / sanitize(f"{run}-{spec.label}"))
    env, log = worker_env(spec), out / "logs" / f"{sanitize(spec.label)}.log"
    rc = spawn(worker_argv(args, spec, spec.system, part, run, cdir), env, log, part, bar, args.worker_timeout)
    _record_outcome(rc, part, log, spec, run)
    ok = any(r["kind"] == "system" and r.get("status") == "ok" for r in _read(part))
    if spec.coldstart and ok:
        bar.set_description(spec.label + " (warm start)")
        wpart = out / f"part-{sanitize(spec.label)}-warm.jsonl"
        parts.append(wpart)
        wlog = out / "logs" / f"{sanitize(spec.label)}-warm.log"
        rc = spawn(worker_argv(args, spec, "coldstart", wpart, run, cdir), env, wlog, wpart, None, args.worker_timeout)
        if rc != 0:
            status, msg = classify_failure(rc, wlog.read_text(errors="replace"))
            write_jsonl(wpart, [{"kind": "coldstart", "run": run, "label": spec.label, "status": status,
                                 "message": msg}], mode="a")


def _read(path: Path) -> list[dict]:
    """A part file's records; a line cut short by a killed worker is skipped."""
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _record_outcome(rc: int, part: Path, log: Path, spec: Spec, run: str) -> None:
    if any(r["kind"] == "system" for r in _read(part)):
        return  # the worker recorded its own outcome (ok, skipped or error)
    status, msg = ("error", "worker exited without a result") if rc == 0 else \
        classify_failure(rc, log.read_text(errors="replace"))
    write_jsonl(part, [{"kind": "system", "run": run, "label": spec.label, "system": spec.system,
                        "variant": spec.variant, "status": status, "message": msg, "returncode": rc,
                        "xla_flags": spec.xla_flags}], mode="a")


def system_specs(systems: list[str], coldstart: bool = True) -> list[Spec]:
    """One worker spec per system: a hybrid variant's XLA_FLAGS and environment from HYBRID_VARIANTS."""
    return [Spec(s, s, xla_flags=HYBRID_VARIANTS.get(s, ("", ()))[0],
                 coldstart=coldstart and s in ("hybrid", "hybrid_nocb"),
                 env=HYBRID_VARIANTS.get(s, ("", ()))[1]) for s in systems]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = finalize_args(parser().parse_args(argv))
    if args.worker:
        from .worker import main_worker

        return main_worker(args)
    systems = [s.strip() for s in (args.systems or ",".join(QUICK_SYSTEMS if args.quick else ALL_SYSTEMS)).split(",")
               if s.strip()]
    bad = [s for s in systems if s not in ALL_SYSTEMS]
    if bad:
        raise SystemExit(f"unknown system(s) {bad}; known: {', '.join(ALL_SYSTEMS)}")
    specs = system_specs(systems, coldstart=not args.no_coldstart)
    run_suite(args, specs, "latency", ["python", "-m", "bench.latency", *argv])
    return 0


if __name__ == "__main__":
    sys.exit(main())
