"""Benchmarks: latency suite against peers, XLA-flag sweeps, reports (see bench/README.md).

`cli_entry(argv)` serves `hybrid-jax bench latency|sweep|report ...`.
"""
from __future__ import annotations

import sys

COMMANDS = ("latency", "sweep", "report")


def cli_entry(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: hybrid-jax bench {{{','.join(COMMANDS)}}} [options]  (--help after the command for its options)",
              file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "latency":
        from .latency import main
    elif cmd == "sweep":
        from .sweep import main
    else:
        from .report import main
    return int(main(rest) or 0)
