"""Percentiles, floors, multiples of floors, and merging of runs' JSON lines.

Record kinds in a run's `results.jsonl` (every record carries `run`, and where it belongs to a system,
`label` = the system or flag-set name shown in tables):
  run       the parent's command line, workload and versions (one per run)
  floors    measured copy bandwidth and matmul rate, and the model's weight bytes and parameter count
  meta      one per worker process: its argv, XLA_FLAGS, versions, card
  sample    one timed generation: prompt_len, rep, ttft_s, itl_s (every inter-token interval)
  system    one per system: status ("ok", "skipped", "error", "unsupported flag"), message, pipelined
            step seconds, peak memory, engine build / process start-to-ready times, compile stats
  coldstart a second process building the engine from a warm executable cache
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

PCTS = (50, 90, 99)


def percentiles(samples: Sequence[float]) -> dict:
    """n, mean, p50, p90, p99 (numpy's linear interpolation) and max of `samples`; empty -> n 0 only."""
    a = np.asarray(list(samples), np.float64)
    if a.size == 0:
        return {"n": 0}
    out = {"n": int(a.size), "mean": float(a.mean())}
    for p, v in zip(PCTS, np.percentile(a, PCTS)):
        out[f"p{p}"] = float(v)
    out["max"] = float(a.max())
    return out


# ---- floors ----------------------------------------------------------------------------------------

def decode_floor_s(weight_bytes: float, bw_Bps: float) -> float:
    """Batch-1 decode reads every weight once per token: weight bytes / copy bandwidth."""
    return float(weight_bytes) / float(bw_Bps)


def prefill_floor_s(weight_bytes: float, n_params: float, n_tokens: int, bw_Bps: float, flops: float) -> float:
    """max(weights read once, 2 x params x tokens FLOPs at the matmul rate)."""
    return max(float(weight_bytes) / float(bw_Bps), 2.0 * float(n_params) * int(n_tokens) / float(flops))


def multiple(value: float | None, floor: float | None) -> float | None:
    if value is None or not floor:
        return None
    return float(value) / float(floor)


def floors_for(fl: dict, prompt_lengths: Iterable[int]) -> dict:
    """The decode floor and the prefill floor of every prompt length from a `floors` record."""
    wb, npar, bw, fr = fl["weight_bytes"], fl["n_params"], fl["bw_Bps"], fl["matmul_flops"]
    return {"decode_s": decode_floor_s(wb, bw),
            "prefill_s": {int(n): prefill_floor_s(wb, npar, n, bw, fr) for n in prompt_lengths}}


# ---- JSON lines ---------------------------------------------------------------------------------------

def read_jsonl(path: str | Path) -> list[dict]:
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


def write_jsonl(path: str | Path, records: Iterable[dict], mode: str = "w") -> None:
    with open(path, mode) as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def merge_runs(record_lists: Sequence[list[dict]]) -> list[dict]:
    """Concatenate several runs' records. Where one label occurs in more than one run, each run's copy
    gets a suffix (` #2`, ` #3`, ...) so that repeated measurements stay apart (their spread is the noise)."""
    seen: dict[str, str] = {}  # label -> first run holding it
    out = []
    for k, recs in enumerate(record_lists):
        runs_here = {r.get("run") for r in recs}
        rename = {}
        for r in recs:
            lab = r.get("label")
            if lab is None or lab in rename:
                continue
            if lab in seen and seen[lab] not in runs_here:
                rename[lab] = f"{lab} #{k + 1}"
            else:
                rename[lab] = lab
                seen.setdefault(lab, r.get("run"))
        for r in recs:
            r = dict(r)
            if "label" in r:
                r["label"] = rename[r["label"]]
            out.append(r)
    return out


# ---- summaries --------------------------------------------------------------------------------------

def summarize(records: Sequence[dict]) -> dict:
    """Tables' content: per label and prompt length TTFT and TPOT statistics with multiples of floors.

    Returns {"points": {(label, n): {...}}, "systems": {label: {...}}, "floors": {run: {...}},
             "runs": {run: run-record}, "labels": [...in order of appearance],
             "pooled_tpot": {label: statistics of its inter-token intervals over all prompt lengths}}.
    """
    runs = {r["run"]: r for r in records if r.get("kind") == "run"}
    floors = {r["run"]: r for r in records if r.get("kind") == "floors"}
    labels: list[str] = []
    samples: dict[tuple, dict] = defaultdict(lambda: {"ttft": [], "itl": [], "tokens": [], "run": None})
    systems: dict[str, dict] = {}
    for r in records:
        lab = r.get("label")
        if lab is not None and lab not in labels and r.get("kind") in ("sample", "system"):
            labels.append(lab)
        if r.get("kind") == "sample":
            s = samples[(lab, int(r["prompt_len"]))]
            s["ttft"].append(r["ttft_s"])
            s["itl"].extend(r["itl_s"])
            s["tokens"].append(r.get("n_tokens", len(r["itl_s"]) + 1))
            s["run"] = r["run"]
        elif r.get("kind") == "system":
            systems.setdefault(lab, {}).update(r)
        elif r.get("kind") == "coldstart":
            systems.setdefault(lab, {})["warm"] = r
    pooled = {lab: percentiles([x for (l2, _), s in samples.items() if l2 == lab for x in s["itl"]])
              for lab in labels}
    points = {}
    for (lab, n), s in samples.items():
        fl = floors.get(s["run"])
        f = floors_for(fl, [n]) if fl else None
        pf = f["prefill_s"][n] if f else None
        df = f["decode_s"] if f else None
        ttft, tpot = percentiles(s["ttft"]), percentiles(s["itl"])
        points[(lab, n)] = {
            "ttft": ttft, "tpot": tpot, "prefill_floor_s": pf, "decode_floor_s": df,
            "ttft_x": {k: multiple(v, pf) for k, v in ttft.items() if k != "n"},
            "tpot_x": {k: multiple(v, df) for k, v in tpot.items() if k != "n"},
            "tokens": sorted(set(s["tokens"])), "run": s["run"],
        }
    for lab, sy in systems.items():
        fl = floors.get(sy.get("run"))
        ps = sy.get("pipelined_step_s") or []
        if ps:
            sy["pipelined"] = percentiles(ps)
            sy["pipelined_x"] = multiple(sy["pipelined"]["p50"], floors_for(fl, [])["decode_s"] if fl else None)
    return {"points": points, "systems": systems, "floors": floors, "runs": runs, "labels": labels,
            "pooled_tpot": pooled}
