"""XLA-flag sweep: the latency worker once per flag set, each in a fresh process (XLA_FLAGS are read once).

    python -m bench.sweep --shape llama2-7b --quick --only default,nocb,while --out bench/results
    python -m bench.sweep --shape tiny --grid "default=;bogus=--xla_this_flag_does_not_exist=1"
    python -m bench.sweep --grid-file grid.json   # {"name": "FLAGS", ...} or [{"name": ..., "flags": ...}]

A flag set that the running XLA refuses (unknown flag, bad value) is recorded with status
"unsupported flag" and XLA's message; the sweep goes on.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

from .latency import ALL_SYSTEMS, Spec, add_common_args, classify_failure, finalize_args, run_suite, worker_env

CB_DEFAULT = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN"
DEFAULT_GRID = {
    "nocb": "--xla_gpu_enable_command_buffer=",
    "default": "",
    "while": f"--xla_gpu_enable_command_buffer={CB_DEFAULT},WHILE",
    "while_cond": f"--xla_gpu_enable_command_buffer={CB_DEFAULT},WHILE,CONDITIONAL",
    "fusion_only": "--xla_gpu_enable_command_buffer=FUSION",
    "min_graph_1": "--xla_gpu_graph_min_graph_size=1",
    "min_graph_5": "--xla_gpu_graph_min_graph_size=5",
    "concurrent": "--xla_gpu_command_buffer_scheduling_mode=CONCURRENT",
    "autotune_0": "--xla_gpu_autotune_level=0",
    "autotune_4": "--xla_gpu_autotune_level=4",
    "no_triton_gemm": "--xla_gpu_enable_triton_gemm=false",
    "cublaslt": "--xla_gpu_enable_cublaslt=true",
    # issue 27's additions: how a replayed graph is updated, a smaller graph threshold, collectives captured, the
    # middle autotune level (the prefill's matmuls), concurrent regions (flag values as jaxlib 0.10-0.11 parse them)
    "update_never": "--xla_gpu_command_buffer_update_mode=NEVER_UPDATE",
    "update_capture": "--xla_gpu_command_buffer_update_mode=CAPTURE_CMD_NEVER_UPDATE",
    "update_always": "--xla_gpu_command_buffer_update_mode=ALWAYS_UPDATE",
    "min_graph_2": "--xla_gpu_graph_min_graph_size=2",
    "collectives": f"--xla_gpu_enable_command_buffer={CB_DEFAULT},COLLECTIVES",
    "autotune_2": "--xla_gpu_autotune_level=2",
    "concurrent_regions": "--xla_gpu_command_buffer_scheduling_mode=CONCURRENT_REGIONS",
}


def parse_grid(text: str) -> dict[str, str]:
    """'name=FLAGS;name2=FLAGS' -> {name: FLAGS} (FLAGS may be empty and may contain '=')."""
    grid = {}
    for item in text.split(";"):
        item = item.strip()
        if not item:
            continue
        name, sep, flags = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"grid entry {item!r} is not name=FLAGS")
        if name.strip() in grid:
            raise ValueError(f"grid name {name.strip()!r} given twice")
        grid[name.strip()] = flags.strip()
    if not grid:
        raise ValueError("empty grid")
    return grid


def load_grid_file(path: str) -> dict[str, str]:
    with open(path) as f:
        d = json.load(f)
    if isinstance(d, list):
        d = {e["name"]: e.get("flags", "") for e in d}
    if not isinstance(d, dict) or not all(isinstance(v, str) for v in d.values()):
        raise ValueError(f"{path}: expected {{name: FLAGS}} or [{{name, flags}}]")
    return d


CHECK_CODE = ("import jax, jax.numpy as jnp; print(jax.devices()[0].device_kind); "
              "jax.jit(lambda x: x * 2 + 1)(jnp.ones(8)).block_until_ready()")


def check_flags(grid: dict[str, str], timeout: float = 300) -> dict[str, tuple[str, str]]:
    """Start jax (and compile a trivial function) under each flag set: {name: (status, message)}."""
    out = {}
    for name, flags in grid.items():
        p = subprocess.run([sys.executable, "-c", CHECK_CODE], env=worker_env(Spec(name, "hybrid", xla_flags=flags)),
                           capture_output=True, text=True, timeout=timeout)
        out[name] = ("ok", p.stdout.strip()) if p.returncode == 0 else classify_failure(p.returncode, p.stderr + p.stdout)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.sweep", description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--grid", help="'name=FLAGS;name2=FLAGS' (default: the built-in grid)")
    p.add_argument("--grid-file", help="JSON grid file")
    p.add_argument("--only", help="comma list of grid names to run (to split a sweep over several calls)")
    p.add_argument("--systems", default="hybrid", help=f"systems measured under each flag set ({', '.join(ALL_SYSTEMS[:3])})")
    p.add_argument("--coldstart", action="store_true", help="also time a warm-cache start per flag set")
    p.add_argument("--check-flags", action="store_true", help="only check which flag sets this XLA accepts")
    p.add_argument("--with-sampling", action="store_true", help="hybrid: also compile the sampling step "
                   "(off by default in sweeps: only greedy is timed)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    args = p.parse_args(argv)
    grid = parse_grid(args.grid) if args.grid else load_grid_file(args.grid_file) if args.grid_file else dict(DEFAULT_GRID)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        missing = [n for n in names if n not in grid]
        if missing:
            p.error(f"--only names not in the grid: {missing} (grid: {', '.join(grid)})")
        grid = {n: grid[n] for n in names}
    if args.check_flags:
        for name, (status, msg) in check_flags(grid).items():
            print(f"{name:16s} {status:16s} {grid[name] or '(no flags)'}  {msg if status != 'ok' else ''}")
        return 0
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in systems if s not in ("hybrid", "plainjit")]
    if bad:
        p.error(f"sweeps measure XLA systems only (hybrid, plainjit), not {bad}")
    args = finalize_args(args)
    args.lean = args.lean or not args.with_sampling
    specs = [Spec(name if len(systems) == 1 else f"{s}:{name}", s, variant=name, xla_flags=flags,
                  coldstart=args.coldstart and s == "hybrid")
             for name, flags in grid.items() for s in systems]
    run_suite(args, specs, "sweep", ["python", "-m", "bench.sweep", *argv])
    return 0


if __name__ == "__main__":
    sys.exit(main())
