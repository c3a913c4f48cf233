"""generate(): sampling determinism and equivalences, stop conditions, streaming, bad input."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import hf_params, make_hf_model
from hybrid_jax.config import LlamaConfig
from hybrid_jax.engine import Engine, generate


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    m = make_hf_model("gqa", seed=5)
    cfg = LlamaConfig.from_hf(m.config.to_dict(), dtype="float32")
    e = Engine(cfg, hf_params(m, cfg), max_seq_len=64, cache_dir=tmp_path_factory.mktemp("xc"))
    yield e
    e.close()


IDS = [5, 17, 33, 90, 12, 7]


def test_same_seed_same_tokens_and_seed_matters(engine):
    a = generate(engine, IDS, max_new_tokens=20, temperature=1.5, seed=11, ignore_eos=True).token_ids
    b = generate(engine, IDS, max_new_tokens=20, temperature=1.5, seed=11, ignore_eos=True).token_ids
    c = generate(engine, IDS, max_new_tokens=20, temperature=1.5, seed=12, ignore_eos=True).token_ids
    assert a == b
    assert a != c  # 20 draws at temperature 1.5 over 160 tokens: equal only by a vanishing chance


def test_top_k_1_and_temperature_0_equal_greedy(engine):
    greedy = generate(engine, IDS, max_new_tokens=20, ignore_eos=True).token_ids
    assert generate(engine, IDS, max_new_tokens=20, temperature=1.0, top_k=1, seed=3, ignore_eos=True).token_ids == greedy
    assert generate(engine, IDS, max_new_tokens=20, temperature=0.0, seed=3, ignore_eos=True).token_ids == greedy


def test_first_token_read_before_a_compiling_step_and_without_lookahead(engine, tmp_path):
    """The first decode step is enqueued after the first token is read where its executable is not compiled
    yet (or with lookahead_first off): the same tokens either way, every requested token produced."""
    greedy = generate(engine, IDS, max_new_tokens=10, ignore_eos=True).token_ids
    sampled = generate(engine, IDS, max_new_tokens=10, temperature=1.3, seed=9, ignore_eos=True).token_ids
    engine.lookahead_first = False
    try:
        assert generate(engine, IDS, max_new_tokens=10, ignore_eos=True).token_ids == greedy
        assert generate(engine, IDS, max_new_tokens=1, ignore_eos=True).token_ids == greedy[:1]
    finally:
        engine.lookahead_first = True
    e = Engine(engine.cfg, engine.runtime.params, max_seq_len=64, cache_dir=tmp_path, compile_sampling=False)
    try:
        assert not e.runtime.compiled(e.runtime.decode_spec(len(IDS), True))
        r = generate(e, IDS, max_new_tokens=10, temperature=1.3, seed=9, ignore_eos=True)
        assert r.token_ids == sampled and len(r.timings.itl_s) == 9
    finally:
        e.close()


def test_pipeline_depth_orders_enqueues_and_reads(engine, monkeypatch):
    """Depth 2 (the default) enqueues step n+1 before the host reads step n; depth 1 (the benchmarks'
    hybrid_nopipe) reads each token before it enqueues the next step. The tokens are the same."""
    rt = engine.runtime
    events = []

    class Read:  # the step's token, logging when the host reads it
        def __init__(self, a):
            self.a = a

        def __array__(self, dtype=None, copy=None):
            events.append("read")
            return np.asarray(self.a, dtype)

    decode = rt.decode

    def logged(state, spec):
        state, tok = decode(state, spec)
        events.append("enqueue")
        return state, Read(tok)

    monkeypatch.setattr(rt, "decode", logged)
    greedy = generate(engine, IDS, max_new_tokens=6, ignore_eos=True).token_ids
    assert events[:4] == ["enqueue", "enqueue", "read", "enqueue"]  # step 2 is on the device before step 1 is read
    events.clear()
    engine.pipeline_depth = 1
    try:
        assert generate(engine, IDS, max_new_tokens=6, ignore_eos=True).token_ids == greedy
    finally:
        engine.pipeline_depth = 2
    assert events == ["enqueue", "read"] * 5


def test_stop_token_ids_and_eos(engine):
    greedy = generate(engine, IDS, max_new_tokens=20, ignore_eos=True).token_ids
    stop_at = greedy[5]
    first = greedy.index(stop_at)
    r = generate(engine, IDS, max_new_tokens=20, stop_token_ids=[stop_at], ignore_eos=True)
    assert r.token_ids == greedy[:first] and r.finish_reason == "stop"
    r = generate(engine, IDS, max_new_tokens=20, ignore_eos=True)
    assert r.finish_reason == "length" and len(r.token_ids) == 20
    assert len(r.timings.itl_s) == 19 and r.timings.ttft_s > 0 and r.timings.tokens_per_s > 0


@pytest.mark.parametrize("kw, msg", [
    (dict(prompt=[]), "prompt is empty"),
    (dict(prompt="   "), "prompt is empty"),
    (dict(max_new_tokens=60), "exceeds max_seq_len"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(typical_p=0.5), "unknown generation argument"),
    (dict(prompt=[1, 10_000]), "out of range"),
])
def test_bad_input_raises_value_error(engine, kw, msg):
    kw = {"prompt": IDS, "max_new_tokens": 4, **kw}
    with pytest.raises(ValueError, match=msg):
        generate(engine, kw.pop("prompt"), **kw)


def test_prompt_longer_than_max_seq_len(engine):
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(engine, list(range(3, 70)), max_new_tokens=1)


def test_stream_flushes_text_held_back_for_a_stop_string_that_never_completes(engine):
    """A stop string that begins like the text but never completes must not swallow the text's tail."""
    from hybrid_jax.tokenizer import Tokenizer

    class Chars:  # a stand-in tokenizer: token t decodes to chr(ord('a') + t % 26)
        eos_token_id = None
        has_chat_template = False

        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(ord("a") + t % 26) for t in ids)

    greedy = generate(engine, IDS, max_new_tokens=6, ignore_eos=True).token_ids
    text = Chars().decode(greedy)
    old = engine.tokenizer
    engine.tokenizer = Chars()
    try:
        st = generate(engine, IDS, max_new_tokens=6, ignore_eos=True, stop=[text[-1] + "\x00"], stream=True)
        pieces = list(st)
        assert "".join(p.text for p in pieces) == text == st.result.text
        st = generate(engine, IDS, max_new_tokens=6, stop_token_ids=[greedy[5]], ignore_eos=True,
                      stop=[text[4] + "\x00"], stream=True)
        first = greedy.index(greedy[5])
        assert "".join(p.text for p in st) == text[:first] == st.result.text
    finally:
        engine.tokenizer = old
    assert isinstance(old, (Tokenizer, type(None)))


def test_when_enqueued_runs_once_before_the_first_token_is_read(engine):
    """Stream.when_enqueued: called once, by the iterating thread, after the first steps are enqueued and before
    the first token is read from the device (no token out, no TTFT yet); not at all for a stream closed before
    it starts."""
    import threading

    greedy = generate(engine, IDS, max_new_tokens=5, ignore_eos=True).token_ids
    calls = []
    st = generate(engine, IDS, max_new_tokens=5, ignore_eos=True, stream=True)
    prog = st._progress
    st.when_enqueued(lambda: calls.append((threading.get_ident(), len(prog.out), prog.timings.ttft_s)))
    assert calls == []  # nothing runs before the stream is iterated
    assert [p.token_id for p in st] == greedy
    assert calls == [(threading.get_ident(), 0, 0.0)] and st.result.timings.ttft_s > 0
    st = generate(engine, IDS, max_new_tokens=5, ignore_eos=True, stream=True)
    st.when_enqueued(lambda: calls.append(1))
    st.close()
    assert len(calls) == 1


def test_package_api_in_a_fresh_process():
    """The README's API: `hybrid_jax.load` and `hybrid_jax.generate` are the functions in a fresh process, first
    thing, and stay so after the engine module is imported by name (a submodule named `generate` used to shadow
    the function, and the lazy import of `load` recursed)."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import hybrid_jax, inspect\n"
            "assert inspect.isfunction(hybrid_jax.load) and inspect.isfunction(hybrid_jax.generate)\n"
            "from hybrid_jax.engine import Engine\n"
            "from hybrid_jax import generate, load\n"
            "assert inspect.isfunction(hybrid_jax.generate) and generate is hybrid_jax.generate\n"
            "assert hybrid_jax.Engine is Engine\n")
    root = Path(__file__).resolve().parents[1]
    for first in ("", "import hybrid_jax.engine\n"):
        r = subprocess.run([sys.executable, "-c", first + code], cwd=root, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
