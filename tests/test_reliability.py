"""Streams never hang the engine, first use is thread-safe, every argument is checked before anything loads,
and a soak of mixed, abandoned and interrupted requests compiles nothing and changes no output."""
from __future__ import annotations

import gc
import math
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import jax
import numpy as np
import pytest

import hybrid_jax.engine as engine_mod
from conftest import hf_params, make_hf_model
from convert.api import convert
from convert_fixtures import save_hf, spm_dir, tiny_tokenizer_dir  # noqa: F401  (fixtures)
from hybrid_jax.config import LlamaConfig
from hybrid_jax.engine import Engine, generate, load

IDS = [5, 17, 33, 90, 12, 7]
OTHER = [9, 40, 41, 3, 77]
TIMEOUT = 60  # seconds a request may take on a busy 2-core machine before we call it a hang


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    m = make_hf_model("gqa", seed=5)
    cfg = LlamaConfig.from_hf(m.config.to_dict(), dtype="float32")
    e = Engine(cfg, hf_params(m, cfg), max_seq_len=64, cache_dir=tmp_path_factory.mktemp("xc"))
    e.warmup()
    yield e
    e.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer_dir):
    d = tmp_path_factory.mktemp("rel")
    return convert(save_hf(make_hf_model("gqa", seed=7), d / "hf", tiny_tokenizer_dir), d / "model",
                   dtype="float32", progress=False)


def ref(engine, prompt, n=12, **kw) -> list[int]:
    return generate(engine, prompt, max_new_tokens=n, ignore_eos=True, **kw).token_ids


def in_thread(fn, timeout=TIMEOUT):
    """fn() in a thread; fails (instead of hanging the suite) when it does not return in time."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "request blocked: the engine is held by an earlier stream"
    if "error" in box:
        raise box["error"]
    return box["value"]


# ---- streams ------------------------------------------------------------------------------------

def test_breaking_out_of_a_stream_frees_the_engine(engine):
    want = ref(engine, OTHER)
    gc.disable()  # the engine must be free without a cycle collection
    try:
        for piece in generate(engine, IDS, max_new_tokens=20, ignore_eos=True, stream=True):
            break
        assert in_thread(lambda: ref(engine, OTHER)) == want
    finally:
        gc.enable()


def test_interleaved_streams_in_one_thread_cancel_the_waiting_one(engine):
    want_a, want_b = ref(engine, IDS, 20), ref(engine, OTHER, 20)
    a = generate(engine, IDS, max_new_tokens=20, ignore_eos=True, stream=True)
    first = [next(a).token_id for _ in range(3)]
    b = generate(engine, OTHER, max_new_tokens=20, ignore_eos=True, stream=True)
    got_b = in_thread(lambda: [p.token_id for p in b])  # (a stream consumed by another thread is fine)
    rest_a = [p.token_id for p in a]  # a was waiting when b started: cancelled, nothing more
    assert got_b == want_b and b.result.finish_reason == "length"
    assert first == want_a[:3] and rest_a == []
    assert a.result.finish_reason == "cancelled" and a.result.token_ids == want_a[:len(a.result.token_ids)]
    assert ref(engine, IDS, 20) == want_a  # and the engine serves the next request unchanged


def test_stream_parked_in_another_thread_never_blocks(engine):
    want = ref(engine, OTHER)
    parked, resume, box = threading.Event(), threading.Event(), {}

    def consumer():
        st = generate(engine, IDS, max_new_tokens=20, ignore_eos=True, stream=True)
        box["first"] = next(st).token_id
        parked.set()
        resume.wait(TIMEOUT)
        box["rest"] = [p.token_id for p in st]
        box["result"] = st.result

    t = threading.Thread(target=consumer, daemon=True)
    t.start()
    assert parked.wait(TIMEOUT)
    assert in_thread(lambda: ref(engine, OTHER)) == want
    resume.set()
    t.join(TIMEOUT)
    assert box["rest"] == [] and box["result"].finish_reason == "cancelled"


def test_close_and_context_manager(engine):
    want = ref(engine, IDS, 20)
    with generate(engine, IDS, max_new_tokens=20, ignore_eos=True, stream=True) as st:
        got = [next(st).token_id, next(st).token_id]
    assert st.result.finish_reason == "cancelled" and st.result.token_ids == want[:len(st.result.token_ids)]
    assert got == want[:2] and list(st) == []
    st = generate(engine, IDS, max_new_tokens=20, ignore_eos=True, stream=True)
    next(st)
    st.close()
    st.close()  # idempotent
    assert st.result.finish_reason == "cancelled"
    done = generate(engine, IDS, max_new_tokens=3, ignore_eos=True, stream=True)
    assert [p.token_id for p in done] == want[:3]
    done.close()  # closing an ended stream keeps its result
    assert done.result.finish_reason == "length" and done.result.token_ids == want[:3]


def test_state_lost_mid_step_is_replaced(engine, caplog):
    """An interrupt between a donating call and its result's assignment leaves deleted buffers in the runtime:
    the next request starts from a fresh state instead of failing."""
    want = ref(engine, IDS)
    for a in jax.tree.leaves(engine.runtime.state):
        a.delete()
    assert ref(engine, IDS) == want
    assert "lost mid-step" in caplog.text


def test_non_streaming_requests_from_threads_are_serialised(engine):
    want = {tuple(p): ref(engine, p, 16) for p in (IDS, OTHER)}
    out, errors = [], []

    def worker(p):
        try:
            for _ in range(3):
                out.append((tuple(p), ref(engine, p, 16)))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(p,)) for p in (IDS, OTHER, IDS, OTHER)]
    [t.start() for t in ts]
    [t.join(TIMEOUT * 2) for t in ts]
    assert not errors and len(out) == 12
    assert all(got == want[p] for p, got in out)


def test_first_use_from_threads_loads_once(model_dir, monkeypatch):
    calls = []
    real = engine_mod.load

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(engine_mod, "load", counting)
    monkeypatch.setattr(engine_mod, "_ENGINES", {})
    results, errors = [], []

    def worker():
        try:
            results.append(generate(str(model_dir), "the quick brown fox", raw=True, max_new_tokens=4,
                                    ignore_eos=True).token_ids)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=worker) for _ in range(3)]
    [t.start() for t in ts]
    [t.join(TIMEOUT * 3) for t in ts]
    assert not errors and len(calls) == 1 and len(results) == 3 and results[0] == results[1] == results[2]


# ---- arguments ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, exc, msg", [
    (dict(prompt=None), TypeError, "prompt"),
    (dict(prompt=[1.0, 2.0]), TypeError, "integers"),
    (dict(prompt=[True, 5]), TypeError, "integers"),
    (dict(prompt=np.array([1.5, 2.0])), TypeError, "integers"),
    (dict(temperature="0.7"), TypeError, "temperature"),
    (dict(temperature=math.nan), ValueError, "temperature"),
    (dict(temperature=math.inf), ValueError, "temperature"),
    (dict(top_p=math.nan), ValueError, "top_p"),
    (dict(top_p="0.9"), TypeError, "top_p"),
    (dict(top_k=2.5), ValueError, "top_k"),
    (dict(stop=5), TypeError, "stop"),
    (dict(stop=["a", 5]), TypeError, "stop"),
    (dict(stop_token_ids=[1.5]), TypeError, "stop_token_ids"),
    (dict(seed="abc"), TypeError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(max_new_tokens=True), ValueError, "max_new_tokens"),
    (dict(max_new_tokens=2.0), ValueError, "max_new_tokens"),
    (dict(stream="yes"), TypeError, "stream"),
    (dict(system=3), TypeError, "system"),
])
def test_bad_arguments_are_named_before_anything_loads(tmp_path, kw, exc, msg):
    """The model path does not exist: the argument's error comes first, so nothing was loaded."""
    kw = {"prompt": IDS, "max_new_tokens": 4, **kw}
    with pytest.raises(exc, match=msg):
        generate(tmp_path / "no-such-model", kw.pop("prompt"), **kw)


@pytest.mark.parametrize("kw, msg", [
    (dict(max_seq_len=0), "max_seq_len"),
    (dict(max_seq_len=True), "max_seq_len"),
    (dict(prefill_buckets=[16, 0]), "prefill_buckets"),
    (dict(dtype="int8"), "dtype"),
    (dict(tensor_parallel=0), "tensor_parallel"),
])
def test_bad_load_arguments_are_named_before_anything_loads(tmp_path, kw, msg):
    with pytest.raises(ValueError, match=msg):
        load(tmp_path / "no-such-model", **kw)


def test_max_seq_len_beyond_the_models_positions(model_dir, caplog):
    positions = LlamaConfig.from_dict(__import__("json").loads((model_dir / "config.json").read_text())["model"])
    n = positions.max_position_embeddings
    with pytest.raises(ValueError, match="max_position_embeddings"):
        load(model_dir, max_seq_len=10**7)  # refused before the weights are read (this used to take 12 GB)
    e = load(model_dir, max_seq_len=n + 16, allow_long_context=True, prefill_buckets=(16,))
    try:
        assert e.max_seq_len == n + 16 and "max_position_embeddings" in caplog.text
    finally:
        e.close()


def test_huge_top_k_means_no_limit(engine):
    a = generate(engine, IDS, max_new_tokens=10, temperature=1.2, seed=4, top_k=9999999999, ignore_eos=True)
    b = generate(engine, IDS, max_new_tokens=10, temperature=1.2, seed=4, ignore_eos=True)
    assert a.token_ids == b.token_ids


# ---- logits go through the runtime's compile and cache path ---------------------------------------

def test_logits_are_compiled_once_per_bucket_counted_and_cached(engine, tmp_path):
    m = make_hf_model("gqa", seed=5)
    cfg = engine.cfg
    e = Engine(cfg, hf_params(m, cfg), max_seq_len=64, cache_dir=tmp_path, compile_sampling=False)
    try:
        before = e.stats()["compiles"]
        a = e.logits(IDS)
        e.logits(IDS[:4])  # the same 16-row bucket
        st = e.stats()
        assert st["compiles"] == before + 1 and st["logits_lengths_compiled"] == [16]
    finally:
        e.close()
    e2 = Engine(cfg, hf_params(m, cfg), max_seq_len=64, cache_dir=tmp_path, compile_sampling=False)
    try:
        hits = e2.stats()["cache_hits"]
        np.testing.assert_array_equal(e2.logits(IDS), a)
        assert e2.stats()["compiles"] == 0 and e2.stats()["cache_hits"] == hits + 1
    finally:
        e2.close()


# ---- the command line ---------------------------------------------------------------------------

def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "hybrid_jax", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).resolve().parents[1])


def test_cli_errors_are_one_line_and_come_before_the_model_loads(tmp_path):
    for args, words in [(["generate", "--prompt", "hi", "--temperature", "nan"], "temperature"),
                        (["generate", "--prompt", "hi", "--top-p", "2"], "top_p"),
                        (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens"),
                        (["generate", "--prompt", "hi", "--model", str(tmp_path / "nope")], "does not exist"),
                        (["verify", str(tmp_path / "nope")], "does not exist")]:
        r = _cli(*args)
        assert r.returncode == 1, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], (args, r.stderr)


def test_cli_unexpected_error_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys, model_dir):
    from hybrid_jax import cli

    def boom(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "cmd_verify", boom)
    assert cli.main(["verify", str(model_dir)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unexpected RuntimeError: a bug" in err and "--debug" in err
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["--debug", "verify", str(model_dir)])


def test_api_run_prints_no_stray_tracebacks(model_dir):
    code = ("import gc, hybrid_jax\n"
            f"e = hybrid_jax.load({str(model_dir)!r}, max_seq_len=48)\n"
            "st = hybrid_jax.generate(e, 'the quick', raw=True, max_new_tokens=8, stream=True)\n"
            "next(st)\n"
            "del st\n"
            "print(hybrid_jax.generate(e, 'the lazy dog', raw=True, max_new_tokens=4).finish_reason)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "Event loop is closed" not in r.stderr, r.stderr[-3000:]


# ---- soak ---------------------------------------------------------------------------------------

def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class _Interrupt(Exception):
    pass


def test_soak_mixed_abandoned_and_interrupted_requests(engine, compile_counter):
    """1000 requests: whole, streamed, broken out of, closed, interleaved, and interrupted by a timer signal
    at an arbitrary point (as Ctrl-C would). Afterwards: no compile after the warm-up, bounded memory, and
    every output equal to (or, when cut short, a prefix of) the same request run cleanly."""
    rng = random.Random(1234)
    prompts = [[int(t) for t in np.random.default_rng(i).integers(3, 160, size=n)]
               for i, n in enumerate([1, 3, 6, 15, 16, 17, 31, 40])]
    kinds = [dict(), dict(temperature=0.9, seed=1), dict(temperature=1.3, top_k=20, seed=2),
             dict(temperature=0.7, top_p=0.8, seed=3)]
    want = {(i, k): ref(engine, p, 12, **kinds[k]) for i, p in enumerate(prompts) for k in range(len(kinds))}

    armed, interrupted = [False], [0]

    def handler(signum, frame):
        if armed[0] and frame.f_code.co_name != "__del__":  # (Python only prints what a finalizer raises)
            raise _Interrupt()

    old = signal.signal(signal.SIGALRM, handler)
    checked = 0
    try:
        def one(r: int):
            nonlocal checked
            i, k = rng.randrange(len(prompts)), rng.randrange(len(kinds))
            n = rng.randint(1, 12)
            full = want[(i, k)][:n]
            mode = rng.choice(["whole", "stream", "break", "close", "interleave", "interrupt"])
            if mode == "whole":
                assert generate(engine, prompts[i], max_new_tokens=n, ignore_eos=True, **kinds[k]).token_ids == full
            elif mode == "stream":
                st = generate(engine, prompts[i], max_new_tokens=n, ignore_eos=True, stream=True, **kinds[k])
                assert [p.token_id for p in st] == full and st.result.token_ids == full
            elif mode in ("break", "close"):
                st = generate(engine, prompts[i], max_new_tokens=n, ignore_eos=True, stream=True, **kinds[k])
                got = [p.token_id for _, p in zip(range(rng.randint(0, n)), st)]
                assert got == full[:len(got)]
                if mode == "close":
                    st.close()
                del st
            elif mode == "interleave":
                j = rng.randrange(len(prompts))
                a = generate(engine, prompts[i], max_new_tokens=n, ignore_eos=True, stream=True, **kinds[k])
                got = [p.token_id for _, p in zip(range(rng.randint(0, n)), a)]
                b = generate(engine, prompts[j], max_new_tokens=n, ignore_eos=True, stream=True, **kinds[k])
                assert [p.token_id for p in b] == want[(j, k)][:n]
                got += [p.token_id for p in a]  # cancelled by b unless it had not started or had all its pieces
                assert got == full[:len(got)]
                assert a.result.finish_reason == "cancelled" or (got == full and a.result.finish_reason == "length")
            else:  # a signal at an arbitrary point of a request, like Ctrl-C
                got = []
                try:
                    try:
                        armed[0] = True
                        signal.setitimer(signal.ITIMER_REAL, rng.uniform(0.0001, 0.004))
                        for p in generate(engine, prompts[i], max_new_tokens=n, ignore_eos=True, stream=True,
                                          **kinds[k]):
                            got.append(p.token_id)
                    finally:
                        armed[0] = False
                        signal.setitimer(signal.ITIMER_REAL, 0)
                except _Interrupt:
                    interrupted[0] += 1
                assert got == full[:len(got)]
            checked += 1

        for r in range(100):  # warm-up: every mode, the lost-state path included
            one(r)
        compiles, rss = compile_counter.n, _rss_mb()
        for r in range(900):
            one(r)
        growth = _rss_mb() - rss
        assert compile_counter.n == compiles, "a request compiled after the warm-up"
        assert growth < 150, f"RSS grew {growth:.0f} MB over 900 requests"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert checked == 1000 and interrupted[0] > 20  # (~1/6 of the requests are interrupt mode)
    # after all that, a clean request still gives the clean output
    for (i, k), w in list(want.items())[:6]:
        assert ref(engine, prompts[i], 12, **kinds[k]) == w
