"""bench/: statistics, floors, merging, reports, the peers' weight mapping, and CPU smoke runs of the suite."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from bench import cli_entry, report, stats
from bench.latency import classify_failure
from bench.sweep import DEFAULT_GRID, load_grid_file, parse_grid

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---- statistics and floors ------------------------------------------------------------------------------

def test_percentiles_match_numpy():
    a = np.random.default_rng(0).lognormal(size=1001)
    p = stats.percentiles(a)
    assert p["n"] == 1001
    for q in (50, 90, 99):
        assert p[f"p{q}"] == pytest.approx(np.percentile(a, q), rel=1e-12)
    assert p["max"] == a.max() and p["mean"] == pytest.approx(a.mean())
    k = stats.percentiles(range(1, 101))  # known values (linear interpolation)
    assert (k["p50"], k["p90"], k["p99"], k["max"]) == pytest.approx((50.5, 90.1, 99.01, 100.0))
    assert stats.percentiles([]) == {"n": 0}


def test_floor_arithmetic_and_multiples():
    wb, npar, bw, fl = 13.5e9, 6.74e9, 4.3e12, 790e12
    assert stats.decode_floor_s(wb, bw) == pytest.approx(3.1395e-3, rel=1e-4)
    # 10 tokens: bandwidth-bound; 500 tokens: compute-bound (2 * 6.74e9 * 500 / 790e12 = 8.53 ms)
    assert stats.prefill_floor_s(wb, npar, 10, bw, fl) == pytest.approx(wb / bw)
    assert stats.prefill_floor_s(wb, npar, 500, bw, fl) == pytest.approx(8.5316e-3, rel=1e-4)
    f = stats.floors_for({"weight_bytes": wb, "n_params": npar, "bw_Bps": bw, "matmul_flops": fl}, [10, 500])
    assert f["decode_s"] == pytest.approx(wb / bw) and f["prefill_s"][500] == pytest.approx(8.5316e-3, rel=1e-4)
    assert stats.multiple(6.3e-3, 3.15e-3) == pytest.approx(2.0)
    assert stats.multiple(1.0, None) is None and stats.multiple(None, 1.0) is None


def _fake_run(run: str, labels: dict[str, float], lengths=(10, 100), reps=3, bw=1e12, status="ok") -> list[dict]:
    """Records of a synthetic run: label -> TPOT base seconds (TTFT = 2 x base x (1 + n/100))."""
    recs = [{"kind": "run", "run": run, "command": f"python -m bench.latency {run}", "card": "Fake GPU",
             "platform": "gpu", "versions": {"jax": "0"}, "shape": "tiny", "dtype": "bfloat16",
             "prompt_lengths": list(lengths), "new_tokens": 4, "reps": reps, "warmup": 1, "max_seq_len": 1024},
            {"kind": "floors", "run": run, "card": "Fake GPU", "platform": "gpu", "dtype": "bfloat16",
             "weight_bytes": 1e9, "n_params": 5e8, "bw_Bps": bw, "matmul_flops": 1e14, "copy_bytes": 2**31,
             "copy_s": [0.004] * 5, "copy_dtype": "bfloat16", "matmul_n": 8192, "matmul_s": [0.01] * 5,
             "matmul_dtype": "bfloat16"}]
    for lab, base in labels.items():
        for n in lengths:
            for rep in range(reps):
                recs.append({"kind": "sample", "run": run, "label": lab, "system": lab, "prompt_len": n, "rep": rep,
                             "ttft_s": 2 * base * (1 + n / 100) * (1 + rep / 10),
                             "itl_s": [base * (1 + i / 10) for i in range(3)], "n_tokens": 4})
        recs.append({"kind": "system", "run": run, "label": lab, "system": lab, "status": status,
                     "pipelined_step_s": [base * 0.8] * 3, "peak_mem_bytes": 3 * 2**30})
    return recs


def test_summarize_multiples_of_floors():
    S = stats.summarize(_fake_run("r1", {"a": 2e-3}))
    p = S["points"][("a", 100)]
    # floors: decode 1e9 / 1e12 = 1 ms; prefill(100) = max(1 ms, 2 * 5e8 * 100 / 1e14 = 1 ms) = 1 ms
    assert p["decode_floor_s"] == pytest.approx(1e-3) and p["prefill_floor_s"] == pytest.approx(1e-3)
    ttft = [2 * 2e-3 * 2 * (1 + r / 10) for r in range(3)]
    assert p["ttft"]["p50"] == pytest.approx(np.median(ttft))
    assert p["ttft_x"]["p50"] == pytest.approx(np.median(ttft) / 1e-3)
    assert p["tpot"]["n"] == 9 and p["tpot"]["p50"] == pytest.approx(2.2e-3)
    assert p["tpot_x"]["max"] == pytest.approx(2.4)
    assert S["pooled_tpot"]["a"]["n"] == 18
    assert S["systems"]["a"]["pipelined_x"] == pytest.approx(1.6)


def _write_run(d: Path, recs: list[dict]) -> Path:
    d.mkdir(parents=True)
    stats.write_jsonl(d / "results.jsonl", recs)
    return d


def test_markdown_table_and_png_written(tmp_path):
    recs = _fake_run("r1", {"hybrid": 2e-3, "hf_eager": 10e-3})
    recs.append({"kind": "system", "run": "r1", "label": "bogus", "system": "hybrid", "status": "unsupported flag",
                 "message": "Unknown flag in XLA_FLAGS: --xla_nope=1", "xla_flags": "--xla_nope=1"})
    d = _write_run(tmp_path / "run", recs)
    md_path = report.render(d)
    md = md_path.read_text()
    assert "Fake GPU" in md and "python -m bench.latency r1" in md and "1000.0 GB/s" in md
    assert "decode floor (weight bytes / bandwidth): 1.00 ms" in md
    # hybrid at 100 tokens: TTFT p50 = 2 * 2 ms * 2 * 1.1 = 8.80 ms, 8.8x the 1 ms prefill floor
    assert "| hybrid | 100 | 3 | 8.80 (8.8x) |" in md
    assert "| hf_eager | 10 | 9 | 11.00 (11.0x) |" in md  # TPOT p50 = 10 ms * 1.1
    assert "| bogus | unsupported flag |" in md and "--xla_nope=1" in md
    for name in ("ttft.png", "tpot.png"):
        b = (d / name).read_bytes()
        assert b[:8] == PNG_MAGIC and len(b) > 5000


def test_merge_two_runs(tmp_path):
    d1 = _write_run(tmp_path / "r1", _fake_run("r1", {"hybrid": 2e-3, "plainjit": 3e-3}, lengths=(10, 100)))
    d2 = _write_run(tmp_path / "r2", _fake_run("r2", {"hf_eager": 10e-3, "hybrid": 2.1e-3}, lengths=(10, 500),
                                               bw=2e12))
    out = tmp_path / "merged"
    assert report.main(["--merge", str(d1), str(d2), "--out", str(out)]) == 0
    recs = stats.read_jsonl(out / "results.jsonl")
    assert len(recs) == len(stats.read_jsonl(d1 / "results.jsonl")) + len(stats.read_jsonl(d2 / "results.jsonl"))
    S = stats.summarize(recs)
    assert S["labels"] == ["hybrid", "plainjit", "hf_eager", "hybrid #2"]  # a repeated label stays apart
    assert set(S["runs"]) == {"r1", "r2"}
    # each sample is measured against its own run's floors: r2's bandwidth is twice r1's
    assert S["points"][("hybrid", 10)]["decode_floor_s"] == pytest.approx(1e-3)
    assert S["points"][("hybrid #2", 10)]["decode_floor_s"] == pytest.approx(0.5e-3)
    assert S["points"][("hf_eager", 500)]["tpot"]["n"] == 9
    md = (out / "results.md").read_text()
    assert "## Run `r1`" in md and "## Run `r2`" in md and "| hybrid #2 | 500 |" in md
    assert (out / "ttft.png").read_bytes()[:8] == PNG_MAGIC and (out / "tpot.png").read_bytes()[:8] == PNG_MAGIC


# ---- sweep grid, failure classification, CLI -----------------------------------------------------------

def test_parse_grid_and_file(tmp_path):
    g = parse_grid("default=;bogus=--xla_this_flag_does_not_exist=1; two=--a=1 --b=x,y")
    assert g == {"default": "", "bogus": "--xla_this_flag_does_not_exist=1", "two": "--a=1 --b=x,y"}
    for bad in ("noequals", "=--x=1", "a=;a=--x", ""):
        with pytest.raises(ValueError):
            parse_grid(bad)
    f = tmp_path / "g.json"
    f.write_text(json.dumps([{"name": "x", "flags": "--xla_gpu_autotune_level=0"}, {"name": "d"}]))
    assert load_grid_file(str(f)) == {"x": "--xla_gpu_autotune_level=0", "d": ""}
    assert DEFAULT_GRID["nocb"] == "--xla_gpu_enable_command_buffer=" and DEFAULT_GRID["default"] == ""
    assert DEFAULT_GRID["concurrent"] == "--xla_gpu_command_buffer_scheduling_mode=CONCURRENT"


def test_default_grid_flags_parse():
    """Every flag of the default sweep grid is one this jaxlib's XLA parses (names and enum values: XLA aborts at
    start-up on a flag it does not know, which the GPU run would find only after its first minute)."""
    import subprocess
    import sys
    flags = " ".join(f for f in DEFAULT_GRID.values() if f)
    p = subprocess.run([sys.executable, "-c", "import jax.numpy as j; j.ones(1).block_until_ready()"],
                       env={**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-c", "import jax.numpy as j; j.ones(1).block_until_ready()"],
                         env={**os.environ, "XLA_FLAGS": "--xla_gpu_command_buffer_update_mode=SOMETIMES",
                              "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0  # what the check would see


def test_classify_failure():
    st, msg = classify_failure(1, "stuff\nF1126 parse_flags_from_env.cc:234] Unknown flag in XLA_FLAGS: --xla_x=1\n")
    assert st == "unsupported flag" and "--xla_x=1" in msg
    st, msg = classify_failure(-6, "F1126 ...] Check failed: ... Flag parsing failed.\nusage: --xla_y=FOO\nFlags:\n")
    assert st == "unsupported flag" and "usage: --xla_y=FOO" in msg
    st, msg = classify_failure(1, "Traceback\nValueError: boom\n")
    assert st == "error" and "boom" in msg and "exit status 1" in msg


def test_cli_entry_dispatch(capsys):
    assert cli_entry([]) == 2
    with pytest.raises(SystemExit) as e:
        cli_entry(["sweep", "--help"])
    assert e.value.code == 0 and "--grid" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli_entry(["latency", "--help"])
    assert e.value.code == 0 and "--systems" in capsys.readouterr().out


# ---- peers and the plain-jit baseline against hybrid_jax --------------------------------------------------

@pytest.mark.parametrize("variant", ["gqa", "tied", "llama3"])
def test_hf_mapping_inverts_from_hf_layers(variant):
    import torch

    from bench import peers
    from hybrid_jax import weights as W
    from hybrid_jax.config import LlamaConfig

    from conftest import make_hf_model

    m = make_hf_model(variant)
    cfg = LlamaConfig.from_hf(m.config.to_dict(), dtype="float32")
    assert LlamaConfig.from_hf(peers.hf_config(cfg).to_dict(), dtype="float32") == cfg
    sd = {k: v.detach().numpy() for k, v in m.state_dict().items()}
    ours = W.from_hf_layers(cfg, sd.__getitem__)
    back = peers.to_hf_layers(cfg, ours)
    want = {k: v for k, v in sd.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    assert set(back) == set(want)
    for k, v in want.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)  # exact: a pure permutation
    # an HF model built from our weights computes what the original computes (same float32 weights)
    m2 = peers.build_model(cfg, "cpu", "float32", ours)
    x = torch.tensor([[5, 17, 3, 99, 42, 7]])
    with torch.no_grad():
        np.testing.assert_allclose(m2(x).logits.numpy(), m(x).logits.numpy(), rtol=0, atol=1e-5)


def test_plainjit_and_hf_peer_match_hybrid(tmp_path):
    """Greedy tokens of the three systems agree on the same tiny float32 weights; timings are sane."""
    import jax

    from bench import peers
    from bench.plainjit import PlainJit
    from bench.worker import TINY, prompt_ids
    from hybrid_jax import weights as W
    from hybrid_jax.engine import Engine, generate

    cfg = TINY.replace(dtype="float32")
    params = W.init_random(cfg, jax.random.PRNGKey(0), scale=0.2)
    ids = prompt_ids(cfg.vocab_size, 12, 0)
    assert min(ids) >= 3 and len(set(ids)) > 1
    eng = Engine(cfg, params, tokenizer=None, max_seq_len=64, cache_dir=tmp_path / "cache")
    want = generate(eng, ids, max_new_tokens=8, ignore_eos=True)
    eng.close()
    assert len(want.token_ids) == 8 and len(want.timings.itl_s) == 7
    ttft, itl, toks = PlainJit(cfg, params, 64).generate(ids, 8)
    assert toks == want.token_ids and ttft > 0 and len(itl) == 7 and min(itl) > 0
    assert PlainJit(cfg, params, 64).pipelined_step_seconds(10) > 0
    w = jax.tree.map(lambda a: np.asarray(a, np.float32), W.to_dict(params))
    hf = peers.HFPeer(peers.build_model(cfg, "cpu", "float32", w), "cpu", static_cache=False, max_seq_len=64)
    ttft, itl, toks = hf.generate(ids, 8)
    assert toks == want.token_ids and ttft > 0 and len(itl) == 7 and min(itl) > 0


# ---- CPU smoke runs of the suite and the sweep --------------------------------------------------------------

def _one_results_dir(root: Path) -> Path:
    dirs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_latency_smoke(tmp_path):
    from bench.latency import main

    out = tmp_path / "results"
    argv = ["--shape", "tiny", "--systems", "hybrid,hf_eager", "--prompt-lengths", "5,20", "--new-tokens", "4",
            "--reps", "2", "--out", str(out), "--cache-root", str(tmp_path / "cache")]
    assert main(argv) == 0
    d = _one_results_dir(out)
    assert d.name.endswith("_cpu_latency_tiny") and d.name[:4].isdigit()
    recs = stats.read_jsonl(d / "results.jsonl")
    samples = [r for r in recs if r["kind"] == "sample"]
    for lab in ("hybrid", "hf_eager"):
        mine = [r for r in samples if r["label"] == lab]
        assert sorted((r["prompt_len"], r["rep"]) for r in mine) == [(5, 0), (5, 1), (20, 0), (20, 1)]
        assert all(r["n_tokens"] == 4 and len(r["itl_s"]) == 3 and r["ttft_s"] > 0 and min(r["itl_s"]) > 0
                   for r in mine)
    assert all(r["prefill_chunks"] == 1 for r in samples if r["label"] == "hybrid")  # own bucket compiled first
    sysrec = {r["label"]: r for r in recs if r["kind"] == "system"}
    assert sysrec["hybrid"]["status"] == "ok" and sysrec["hf_eager"]["status"] == "ok"
    hy = sysrec["hybrid"]
    assert hy["stats"]["compiles"] >= 2 and len(hy["pipelined_step_s"]) == 5 and min(hy["pipelined_step_s"]) > 0
    assert hy["process_ready_s"] >= hy["engine_build_s"] > 0
    warm = [r for r in recs if r["kind"] == "coldstart"]
    assert len(warm) == 1 and warm[0]["stats_at_ready"]["compiles"] == 0 and warm[0]["stats"]["cache_hits"] >= 2
    fl = next(r for r in recs if r["kind"] == "floors")
    assert fl["bw_Bps"] > 1e8 and fl["matmul_flops"] > 1e8 and fl["card"] == "cpu"
    run = next(r for r in recs if r["kind"] == "run")
    assert run["versions"]["jax"] and run["versions"]["torch"] and run["max_seq_len"] == 1024
    md = (d / "results.md").read_text()
    assert "| hybrid | 20 | 2 |" in md and "| hf_eager | 5 | 2 |" in md and "--systems hybrid,hf_eager" in md
    assert "copy bandwidth" in md and "decode floor" in md
    for name in ("ttft.png", "tpot.png"):
        assert (d / name).read_bytes()[:8] == PNG_MAGIC
    assert not list(d.glob("part-*.jsonl")) and (d / "logs" / "hybrid.log").exists()


def test_latency_ablations_nopipe_nobuckets_against_hybrid(tmp_path):
    """hybrid_nopipe and hybrid_nobuckets run the same weights to the same tokens; nobuckets prefills each prompt
    in an executable of its exact length; the report puts every system against hybrid in the same run."""
    from bench.latency import main

    out = tmp_path / "results"
    argv = ["--shape", "tiny", "--systems", "hybrid,hybrid_nopipe,hybrid_nobuckets", "--prompt-lengths", "5,20",
            "--new-tokens", "4", "--reps", "1", "--warmup", "1", "--pipelined-reps", "1", "--no-coldstart",
            "--out", str(out), "--cache-root", str(tmp_path / "cache")]
    assert main(argv) == 0
    d = _one_results_dir(out)
    recs = stats.read_jsonl(d / "results.jsonl")
    sysrec = {r["label"]: r for r in recs if r["kind"] == "system"}
    assert all(sysrec[s]["status"] == "ok" for s in ("hybrid", "hybrid_nopipe", "hybrid_nobuckets"))
    assert sysrec["hybrid_nobuckets"]["stats"]["prefill_buckets"] == [5, 20]
    assert sysrec["hybrid"]["stats"]["prefill_buckets"] != [5, 20]
    heads = {}
    for r in recs:
        if r["kind"] == "sample":
            heads.setdefault(r["prompt_len"], {})[r["label"]] = r["tokens_head"]
    assert all(len({tuple(v) for v in h.values()}) == 1 and len(h) == 3 for h in heads.values())
    md = (d / "results.md").read_text()
    sect = md.split("## Against `hybrid` in the same run")[1].split("## Per system")[0]
    assert "| hybrid | " in sect and "(1.00x)" in sect and "| hybrid_nopipe | " in sect
    assert "TTFT p50 5 tok | TTFT p50 20 tok | TPOT p50 | TPOT p99 | pipelined step p50 |" in sect


def test_sweep_smoke_records_unsupported_flag(tmp_path):
    from bench.sweep import main

    out = tmp_path / "results"
    argv = ["--shape", "tiny", "--grid", "default=;bogus=--xla_this_flag_does_not_exist=1", "--prompt-lengths", "5",
            "--new-tokens", "4", "--reps", "2", "--warmup", "1", "--pipelined-reps", "2", "--out", str(out),
            "--cache-root", str(tmp_path / "cache")]
    assert main(argv) == 0
    d = _one_results_dir(out)
    recs = stats.read_jsonl(d / "results.jsonl")
    sysrec = {r["label"]: r for r in recs if r["kind"] == "system"}
    assert sysrec["default"]["status"] == "ok"
    assert sysrec["bogus"]["status"] == "unsupported flag"
    assert "xla_this_flag_does_not_exist" in sysrec["bogus"]["message"]
    assert sysrec["bogus"]["xla_flags"] == "--xla_this_flag_does_not_exist=1"
    assert len([r for r in recs if r["kind"] == "sample" and r["label"] == "default"]) == 2
    assert not [r for r in recs if r["kind"] == "sample" and r["label"] == "bogus"]
    md = (d / "results.md").read_text()
    assert "| bogus | unsupported flag |" in md and "| default | 5 | 2 |" in md
    assert "xla_this_flag" not in os.environ.get("XLA_FLAGS", "")  # the flags went to the worker only


def test_latency_smoke_converted_checkpoint(tmp_path):
    """--model DIR: hybrid, plainjit and hf_eager run the same weights (HF gets them mapped back) and agree."""
    import jax

    from bench.latency import main
    from bench.worker import TINY
    from hybrid_jax import checkpoint
    from hybrid_jax import weights as W

    cfg = TINY.replace(dtype="float32", n_layers=1)
    params = W.init_random(cfg, jax.random.PRNGKey(3), scale=0.3)
    ckpt = checkpoint.save(tmp_path / "tiny-ckpt", cfg, jax.tree.map(np.asarray, W.to_dict(params)))
    out = tmp_path / "results"
    assert main(["--model", str(ckpt), "--systems", "hybrid,plainjit,hf_eager", "--prompt-lengths", "7",
                 "--new-tokens", "6", "--reps", "2", "--warmup", "1", "--pipelined-reps", "1", "--no-coldstart",
                 "--out", str(out), "--cache-root", str(tmp_path / "cache")]) == 0
    d = _one_results_dir(out)
    assert d.name.endswith("_latency_tiny-ckpt")
    recs = stats.read_jsonl(d / "results.jsonl")
    assert {r["label"]: r["status"] for r in recs if r["kind"] == "system"} == \
        {"hybrid": "ok", "plainjit": "ok", "hf_eager": "ok"}
    heads = {}
    for r in recs:
        if r["kind"] == "sample":
            heads.setdefault(r["rep"], {})[r["label"]] = r["tokens_head"]
    assert len(heads) == 2
    for rep, by in heads.items():
        assert by["hybrid"] == by["plainjit"] == by["hf_eager"] and len(by["hybrid"]) == 6, (rep, by)
    assert "checkpoint `" in (d / "results.md").read_text()


def test_hybrid_variant_specs(monkeypatch):
    """Every hybrid variant is a system the parent accepts and the worker runs, with its settings in the
    worker's environment (and nothing else changed)."""
    from bench.latency import ALL_SYSTEMS, HYBRID_VARIANTS, system_specs, worker_env
    from bench.worker import HYBRID_SYSTEMS
    assert set(HYBRID_VARIANTS) == set(HYBRID_SYSTEMS) and set(HYBRID_SYSTEMS) <= set(ALL_SYSTEMS)
    monkeypatch.setenv("XLA_FLAGS", "--xla_a=1")
    monkeypatch.delenv("XLA_PYTHON_CLIENT_ALLOCATOR", raising=False)
    env = {s.system: worker_env(s) for s in system_specs(list(HYBRID_SYSTEMS) + ["hf_eager"])}
    assert env["hybrid"]["XLA_FLAGS"] == "--xla_a=1" and "HYBRID_JAX_PREFILL_ATTN" not in env["hybrid"]
    assert env["hybrid_vmm"]["XLA_PYTHON_CLIENT_ALLOCATOR"] == "vmm"
    assert env["hybrid_vmm"]["XLA_FLAGS"] == "--xla_a=1 --xla_gpu_command_buffer_update_mode=SKIP_TEMP"
    assert env["hybrid_nofused"]["HYBRID_JAX_PREFILL_ATTN"] == "off"
    assert env["hybrid_xlawo"]["HYBRID_JAX_PREFILL_WO"] == "xla" and "HYBRID_JAX_PREFILL_WO" not in env["hybrid"]
    assert env["hybrid_xlagemv"]["HYBRID_JAX_GEMV"] == "xla"
    assert env["hybrid_pallasgemv"]["HYBRID_JAX_ROW_REDUCE"] == "none" and "HYBRID_JAX_ROW_REDUCE" not in env["hybrid"]
    assert env["hybrid_cublas"]["HYBRID_JAX_PREFILL_MATMULS"] == "cublas"
    assert env["hybrid_autotune"]["HYBRID_JAX_PREFILL_MATMULS"] == "autotune"
    assert "HYBRID_JAX_PREFILL_MATMULS" not in env["hybrid"]
    assert env["hybrid_nocb"]["XLA_FLAGS"].endswith("--xla_gpu_enable_command_buffer=")
    # what the worker builds its engine with (KernelOptions.from_env): each ablation changes its field only
    from hybrid_jax.options import KernelOptions
    opts = {s: KernelOptions.from_env(e) for s, e in env.items() if s in HYBRID_SYSTEMS}
    base = KernelOptions()
    assert opts["hybrid"] == opts["hybrid_nocb"] == opts["hybrid_vmm"] == base
    assert opts["hybrid_xlagemv"] == base.replace(gemv="xla")
    assert opts["hybrid_pallasgemv"] == base.replace(row_reduce=frozenset())
    assert opts["hybrid_devtoken"] == base.replace(token_memory="device")
    assert opts["hybrid_nofused"] == base.replace(prefill_attention="off")
    assert opts["hybrid_cudnnall"] == base.replace(prefill_attention_min_rows=0)
    assert opts["hybrid_xlawo"] == base.replace(prefill_wo="xla")
    assert opts["hybrid_cublas"] == base.replace(prefill_matmuls="cublas")
    assert opts["hybrid_autotune"] == base.replace(prefill_matmuls="autotune")
    assert env["hf_eager"]["JAX_PLATFORMS"] == "cpu" and "XLA_PYTHON_CLIENT_ALLOCATOR" not in env["hf_eager"]
    specs = {s.system: s for s in system_specs(["hybrid", "hybrid_vmm"], coldstart=True)}
    assert specs["hybrid"].coldstart and not specs["hybrid_vmm"].coldstart


def test_latency_workload_speculative(tmp_path, tiny_tokenizer_dir):
    """--workload: text prompts through the checkpoint's tokenizer, answers ending at EOS; hybrid_spec_ngram and
    hybrid_spec_draft (the model as its own draft) give hybrid's greedy tokens and report their verify steps, and
    HF's prompt lookup (hf_lookup) gives HF's."""
    from bench.latency import main
    from convert.api import convert
    from convert_fixtures import save_hf
    from conftest import make_hf_model

    m = make_hf_model("gqa", seed=11)
    ck = convert(save_hf(m, tmp_path / "hf", tiny_tokenizer_dir), tmp_path / "ck", dtype="float32", progress=False)
    wl = tmp_path / "wl.json"
    wl.write_text(json.dumps({"about": "test", "grounded": ["the cat sat on the mat, the cat sat on the mat, the cat"],
                              "chat": ["why is the sky blue"]}))
    out = tmp_path / "results"
    assert main(["--model", str(ck), "--workload", str(wl), "--draft", str(ck), "--num-speculative-tokens", "3",
                 "--systems", "hybrid,hybrid_spec_ngram,hybrid_spec_draft,hf_eager,hf_lookup", "--new-tokens", "12",
                 "--reps", "1", "--warmup", "0", "--pipelined-reps", "1", "--no-coldstart", "--max-seq-len", "128",
                 "--prompt-lengths", "5", "--out", str(out),
                 "--cache-root", str(tmp_path / "cache")]) == 0
    recs = stats.read_jsonl(_one_results_dir(out) / "results.jsonl")
    assert {r["label"]: r["status"] for r in recs if r["kind"] == "system"} == dict.fromkeys(
        ["hybrid", "hybrid_spec_ngram", "hybrid_spec_draft", "hf_eager", "hf_lookup"], "ok")
    by = {}
    for r in recs:
        if r["kind"] == "sample":
            by.setdefault(r["prompt_id"], {})[r["label"]] = r
    assert set(by) == {"grounded-0", "chat-0"}
    for pid, rows in by.items():
        heads = {lab: r["tokens_head"] for lab, r in rows.items()}
        assert len(set(map(tuple, heads.values()))) == 1, (pid, heads)
        assert rows["hybrid_spec_draft"]["accepted"] == rows["hybrid_spec_draft"]["proposed"] > 0
        assert rows["hybrid_spec_ngram"]["verify_steps"] >= 1 and "verify_steps" not in rows["hybrid"]
    with pytest.raises(SystemExit, match="needs --model"):
        main(["--shape", "tiny", "--workload", str(wl), "--out", str(out)])


def test_latency_quantize_hybrid_and_torchao_peer(tmp_path):
    """--quantize: hybrid runs random weights in the scheme (its floor from their stored bytes) and the HF peer
    quantizes its layers with torchao's matching config; a scheme torchao has no match for is skipped, named."""
    from bench.latency import main

    out = tmp_path / "results"
    argv = ["--shape", "tiny", "--quantize", "int8", "--systems", "hybrid,hf_eager", "--prompt-lengths", "5",
            "--new-tokens", "3", "--reps", "1", "--no-coldstart", "--out", str(out),
            "--cache-root", str(tmp_path / "cache")]
    assert main(argv) == 0
    recs = stats.read_jsonl(_one_results_dir(out) / "results.jsonl")
    sysrec = {r["label"]: r for r in recs if r["kind"] == "system"}
    assert sysrec["hybrid"]["status"] == "ok" and sysrec["hybrid"]["quantize"] == "int8"
    assert sysrec["hf_eager"]["status"] == "ok" and sysrec["hf_eager"]["quantize"] == "int8"
    assert next(r for r in recs if r["kind"] == "meta" and r["label"] == "hf_eager")["versions"]["torchao"]
    fl = next(r for r in recs if r["kind"] == "floors")
    from bench.worker import SHAPES
    tiny = SHAPES["tiny"].replace(dtype="float32")  # the CPU's default
    assert fl["weight_bytes"] == tiny.replace(quant="int8").weight_bytes < tiny.weight_bytes
    assert sum(r["kind"] == "sample" for r in recs) == 2

    out2 = tmp_path / "results2"
    assert main(argv[:3] + ["int4-g32-sym", "--systems", "hf_eager"] + argv[6:-4] + ["--out", str(out2)]) == 0
    rec = next(r for r in stats.read_jsonl(_one_results_dir(out2) / "results.jsonl") if r["kind"] == "system")
    assert rec["status"] == "skipped" and "int4-g32-sym" in rec["message"]
    with pytest.raises(SystemExit, match="--quantize"):
        main(["--model", str(tmp_path), "--quantize", "int8"])
    with pytest.raises(SystemExit, match="--quantize"):
        main(["--shape", "tiny", "--quantize", "int3"])


def test_spec_projection_counts_verify_and_single_steps(tmp_path):
    """spec_check --project: a prompt's decoded tokens are its verify steps' (accepted + 1 each) and one-token
    steps' for the rest, timed at the other shape's costs; a run cut mid-step counts no negative steps."""
    from bench.probes.spec_check import main, project

    def row(tokens, verify, accepted):
        return {"prompt": "p", "plain": {"tokens": tokens},
                "ngram_k4": {"tokens": tokens, "verify_steps": verify, "accepted": accepted, "proposed": 4 * verify}}

    # 21 tokens: 20 decoded = 5 verify steps (10 accepted + 5) + 5 one-token steps; 9 tokens cut inside a step
    real = {"real": {"grounded": [row(21, 5, 10)], "chat": [row(9, 3, 7)]}}
    costs = {"step_ms": {"decode": 2.0, "verify_k4": 3.0}}
    p = project(real, costs)
    g = p["grounded"]["ngram_k4"]
    assert g["over_plain"] == round(20 * 2.0 / (5 * 3.0 + 5 * 2.0), 3) and g["tok_s"] == round(20 / 25.0 * 1e3, 1)
    assert p["chat"]["ngram_k4"]["over_plain"] == round(8 * 2.0 / (3 * 3.0), 3)
    assert p["plain_tok_s"] == 500.0
    # chunk_check's record (its kernel variant) is read too; a file with neither is refused
    assert project(real, {"variants": {"kernel": costs["step_ms"]}}) == p
    with pytest.raises(ValueError, match="step_ms"):
        project(real, {"other": 1})
    (tmp_path / "real.json").write_text(json.dumps(real))
    (tmp_path / "costs.json").write_text(json.dumps(costs))
    main(["--project", str(tmp_path / "real.json"), "--costs", str(tmp_path / "costs.json"), "--out", str(tmp_path)])
    assert json.loads((tmp_path / "spec_projection.json").read_text())["projection"] == p
