"""Markdown table and plots from a run's JSON lines; merging of several runs.

    python -m bench.report DIR                          re-render DIR/results.md and plots
    python -m bench.report --merge DIR1 DIR2 --out DIR  merge runs (e.g. a suite split over several calls)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .stats import floors_for, merge_runs, read_jsonl, summarize, write_jsonl

WEIGHTS_NOTE = ("random weights of the exact shape, made on the device (latency does not depend on the weights' "
                "values)")


def _ms(x) -> str:
    return "" if x is None else f"{1e3 * x:.2f}"


def _cell(v, x) -> str:
    """'6.52 (2.1x)': milliseconds and the multiple of the floor."""
    if v is None:
        return ""
    return f"{1e3 * v:.2f}" + (f" ({x:.1f}x)" if x is not None else "")


def _bytes(b) -> str:
    return "" if b is None else f"{b / 2**30:.2f} GiB"


def _mem(sy: dict) -> str:
    peak, now = sy.get("peak_mem_bytes"), sy.get("mem_in_use_bytes")
    return _bytes(peak) + (f" ({_bytes(now)})" if now is not None else "")


def _si(x: float) -> str:
    for unit, f in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= f:
            return f"{x / f:.3g} {unit}"
    return f"{x:.3g} "


def _secs(x) -> str:
    return "" if x is None else f"{x:.1f} s"


def markdown(records: list[dict]) -> str:
    S = summarize(records)
    L = []
    L.append("# Latency: " + ", ".join(S["labels"]))
    L.append("")
    L.append("Batch 1, greedy, EOS ignored. TTFT: prompt ids on the host to the first generated id on the host. "
             "TPOT: each interval between consecutive tokens as the host reads them (streaming). Every figure is "
             "followed by its multiple of the floor measured in the same run. Raw samples: `results.jsonl`.")
    for run, r in S["runs"].items():
        L += ["", f"## Run `{run}`", "", f"- command: `{r.get('command', '')}`",
              f"- card: {r.get('card')} ({r.get('platform')})",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in (r.get("versions") or {}).items())]
        model = f"checkpoint `{r['model']}`" if r.get("model") else f"shape `{r.get('shape')}`, {WEIGHTS_NOTE}"
        L.append(f"- model: {model}; dtype {r.get('dtype')}; cache length (max_seq_len) {r.get('max_seq_len')}")
        eager = f" ({r['eager_reps']} for hf_eager)" if r.get("eager_reps") not in (None, r.get("reps")) else ""
        L.append(f"- workload: prompt lengths {r.get('prompt_lengths')}, {r.get('new_tokens')} new tokens, "
                 f"{r.get('reps')} timed reps{eager} after {r.get('warmup')} warm-up per point"
                 + ("; hybrid without the background compile of its sampling step" if r.get("lean") else ""))
        if r.get("xla_flags_inherited"):
            L.append(f"- XLA_FLAGS inherited by every process: `{r['xla_flags_inherited']}`")
        fl = S["floors"].get(run)
        if fl:
            f = floors_for(fl, r.get("prompt_lengths") or [])
            var = fl.get("copy_variants_Bps") or {}
            kinds = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in var.items())
            L.append(f"- floors: copy bandwidth {fl['bw_Bps'] / 1e9:.1f} GB/s (bytes read + written by jitted elementwise "
                     f"kernels over {_bytes(fl['copy_bytes'])} {fl['copy_dtype']}, median of {len(fl['copy_s'])}, "
                     f"the fastest of: {kinds or 'x + 1'} GB/s); "
                     f"matmul {fl['matmul_flops'] / 1e12:.2f} TFLOP/s ({fl['matmul_n']}^3 {fl['matmul_dtype']}, "
                     f"random data, median of {len(fl['matmul_s'])}); weights {_si(fl['weight_bytes'])}B, "
                     f"{_si(fl['n_params'])} parameters")
            L.append(f"- decode floor (weight bytes / bandwidth): {_ms(f['decode_s'])} ms; prefill floor "
                     "max(weight bytes / bandwidth, 2 x params x tokens / matmul rate): "
                     + ", ".join(f"{n} tok {_ms(v)} ms" for n, v in f["prefill_s"].items()))
    pts = S["points"]
    keys = sorted(pts, key=lambda k: (S["labels"].index(k[0]), k[1]))
    L += ["", "## TTFT (ms; multiple of the prefill floor)", "",
          "| system | prompt | n | p50 | p90 | p99 | max | floor |", "|---|---|---|---|---|---|---|---|"]
    for lab, n in keys:
        p = pts[(lab, n)]
        t, x = p["ttft"], p["ttft_x"]
        L.append(f"| {lab} | {n} | {t['n']} | " + " | ".join(_cell(t[k], x.get(k)) for k in ("p50", "p90", "p99", "max"))
                 + f" | {_ms(p['prefill_floor_s'])} |")
    L += ["", "## TPOT, streaming: the host reads every token (ms; multiple of the decode floor)", "",
          "| system | prompt | n | p50 | p90 | p99 | max | floor |", "|---|---|---|---|---|---|---|---|"]
    for lab, n in keys:
        p = pts[(lab, n)]
        t, x = p["tpot"], p["tpot_x"]
        if t["n"]:
            L.append(f"| {lab} | {n} | {t['n']} | " + " | ".join(_cell(t[k], x.get(k)) for k in ("p50", "p90", "p99", "max"))
                     + f" | {_ms(p['decode_floor_s'])} |")
    L += against(S)
    L += ["", "## Per system", "", "Peak device memory is the whole process' peak, making the (random) weights included; "
          "start-up times are from process start (`process to ready`) and for building the engine alone.", "",
          "| system | status | TPOT all lengths p50 / p99 (ms) | pipelined step p50 (ms) | device memory: peak (in use at end) | "
          "start-up, empty cache: process to ready / engine build | warm cache: process to ready / engine build | "
          "compiles (s) | XLA_FLAGS | notes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for lab in S["labels"]:
        L.append(_system_row(lab, S))
    return "\n".join(L) + "\n"


BASES = ("hybrid", "default", "hybrid:default")


def _ratio(v, b) -> str:
    """'6.52 (1.04x)': milliseconds and the multiple of the base's."""
    if v is None:
        return ""
    return f"{1e3 * v:.2f}" + (f" ({v / b:.2f}x)" if b else "")


def against(S: dict) -> list[str]:
    """Markdown lines: each system's p50s as multiples of the base's in the same run (the first of BASES
    present: the runtime for its ablations, `default` for a sweep's flag sets); none without a base."""
    base = next((b for b in BASES if b in S["labels"]), None)
    if base is None or len(S["labels"]) < 2:
        return []
    lengths = sorted({n for (lab, n) in S["points"] if lab == base})
    runs = {lab: sy.get("run") for lab, sy in S["systems"].items()}
    L = ["", f"## Against `{base}` in the same run (ms; multiple of `{base}`'s)", "",
         "| system | " + " | ".join(f"TTFT p50 {n} tok" for n in lengths)
         + " | TPOT p50 | TPOT p99 | pipelined step p50 |", "|---" * (len(lengths) + 4) + "|"]
    bsys = S["systems"].get(base, {})
    bpool = S["pooled_tpot"].get(base, {})
    for lab in S["labels"]:
        if runs.get(lab) != runs.get(base):
            continue  # another run (a merged report): not comparable
        cells = []
        for n in lengths:
            p, b = S["points"].get((lab, n)), S["points"][(base, n)]
            cells.append(_ratio(p["ttft"]["p50"], b["ttft"]["p50"]) if p else "")
        pool = S["pooled_tpot"].get(lab, {})
        for k in ("p50", "p99"):
            cells.append(_ratio(pool.get(k), bpool.get(k)) if pool.get("n") else "")
        sy = S["systems"].get(lab, {})
        pipe = (sy.get("pipelined") or {}).get("p50")
        cells.append(_ratio(pipe, (bsys.get("pipelined") or {}).get("p50")))
        L.append(f"| {lab} | " + " | ".join(cells) + " |")
    return L


def _system_row(lab: str, S: dict) -> str:
    sy = S["systems"].get(lab, {})
    pool = S["pooled_tpot"].get(lab, {"n": 0})
    fl = S["floors"].get(sy.get("run"))
    df = floors_for(fl, [])["decode_s"] if fl else None
    pooled = (f"{_cell(pool['p50'], pool['p50'] / df if df else None)} / {_cell(pool['p99'], pool['p99'] / df if df else None)}"
              if pool.get("n") else "")
    pipe = _cell(sy["pipelined"]["p50"], sy.get("pipelined_x")) if sy.get("pipelined") else ""
    cold = " / ".join(x for x in (_secs(sy.get("process_ready_s")),
                                  _secs(sy.get("engine_build_s", sy.get("load_s")))) if x)
    w = sy.get("warm") or {}
    warm = w.get("status") or " / ".join(x for x in (_secs(w.get("process_ready_s")),
                                                     _secs(w.get("engine_build_s", w.get("load_s")))) if x)
    st = sy.get("stats") or {}
    comp = f"{st['compiles']} ({st['compile_seconds']:.1f})" if "compiles" in st else ""
    if w.get("stats"):
        comp += f"; warm: {w['stats'].get('compiles')} compiled, {w['stats'].get('cache_hits')} from disk"
    notes = [sy.get("message", "")]
    if sy.get("first_generate_s") is not None:
        notes.append(f"first generate {sy['first_generate_s']:.1f} s")
    for (l2, n), p in S["points"].items():
        if l2 == lab and p["tokens"] != [max(p["tokens"])]:
            notes.append(f"{n} tok: token counts {p['tokens']}")
    flags = sy.get("xla_flags", "")
    return (f"| {lab} | {sy.get('status', 'no result')} | {pooled} | {pipe} | {_mem(sy)} | "
            f"{cold} | {warm} | {comp} | {'`' + flags + '`' if flags else ''} | "
            f"{'; '.join(x for x in notes if x).replace('|', '/')} |")


def plots(records: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    S = summarize(records)
    labs = [lab for lab in S["labels"] if any(k[0] == lab for k in S["points"])]
    files = []
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, lab in enumerate(labs):
        ns = sorted(n for l2, n in S["points"] if l2 == lab)
        c = f"C{i % 10}"
        ax.plot(ns, [1e3 * S["points"][(lab, n)]["ttft"]["p50"] for n in ns], "o-", color=c, label=f"{lab} p50")
        ax.plot(ns, [1e3 * S["points"][(lab, n)]["ttft"]["p99"] for n in ns], ":", color=c, alpha=0.6)
    fl = next(iter(S["floors"].values()), None)
    all_n = sorted({n for _, n in S["points"]})
    if fl and all_n:
        f = floors_for(fl, all_n)
        ax.plot(all_n, [1e3 * f["prefill_s"][n] for n in all_n], "k--", label="prefill floor")
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("TTFT (ms); dotted: p99")
    ax.set_title("Time to first token, batch 1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(out / "ttft.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labs) + 2), 5))
    w = 0.38
    for i, lab in enumerate(labs):
        p = S["pooled_tpot"][lab]
        if not p.get("n"):
            continue
        ax.bar(i - w / 2, 1e3 * p["p50"], w, color="C0", label="p50" if i == 0 else None)
        ax.bar(i + w / 2, 1e3 * p["p99"], w, color="C3", label="p99" if i == 0 else None)
        pipe = S["systems"].get(lab, {}).get("pipelined")
        if pipe:
            ax.plot([i - w, i + w], [1e3 * pipe["p50"]] * 2, "k-", lw=2, label="pipelined" if i == 0 else None)
    if fl:
        ax.axhline(1e3 * floors_for(fl, [])["decode_s"], color="k", ls="--", label="decode floor")
    ax.set_xticks(range(len(labs)), labs, rotation=20, ha="right")
    ax.set_ylabel("TPOT (ms), all prompt lengths")
    ax.set_title("Time per output token, streaming (host reads each token)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(out / "tpot.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)
    return files


def render(out: str | Path, records: list[dict] | None = None) -> Path:
    out = Path(out)
    if records is None:
        records = read_jsonl(out / "results.jsonl")
    (out / "results.md").write_text(markdown(records))
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # plots are the `bench` extra's
        print("bench: no plots (matplotlib is not installed: pip install 'hybrid_jax[bench]')", file=sys.stderr)
    else:
        plots(records, out)
    return out / "results.md"


def merge(dirs: list[str | Path], out: str | Path) -> Path:
    recs = merge_runs([read_jsonl(Path(d) / "results.jsonl") for d in dirs])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "results.jsonl", recs)
    return render(out, recs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="*", help="a results folder to re-render")
    p.add_argument("--merge", nargs="+", default=None, help="results folders to merge")
    p.add_argument("--out", help="output folder of --merge")
    a = p.parse_args(argv)
    if a.merge:
        if not a.out:
            p.error("--merge needs --out")
        print(merge(a.merge, a.out))
    elif a.dirs:
        for d in a.dirs:
            print(render(d))
    else:
        p.error("give a results folder, or --merge DIR... --out DIR")
    return 0


if __name__ == "__main__":
    sys.exit(main())
