"""KV reuse (issue 26): a request that begins with the ids whose rows the cache holds prefills only the rest, and
the result equals a fresh prefill's: the cache rows, the greedy tokens, over a multi-turn chat of the real SmolLM2."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import hf_params, make_hf_model
from hybrid_jax.config import LlamaConfig
from hybrid_jax.engine import Engine, _common_prefix, generate


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    m = make_hf_model("gqa", seed=7)
    cfg = LlamaConfig.from_hf(m.config.to_dict(), dtype="float32")
    cache = tmp_path_factory.mktemp("xc")
    p = hf_params(m, cfg)
    a = Engine(cfg, p, max_seq_len=96, cache_dir=cache, prefill_buckets=(16, 32, 64, 96))
    b = Engine(cfg, p, max_seq_len=96, cache_dir=cache, prefill_buckets=(16, 32, 64, 96), kv_reuse=False)
    yield a, b
    a.close()
    b.close()


def test_common_prefix():
    assert _common_prefix([1, 2, 3], [1, 2, 4, 5], 9) == 2
    assert _common_prefix([1, 2, 3], [1, 2, 3], 2) == 2  # at least one token is left to prefill
    assert _common_prefix([], [1], 0) == 0


def _rows(eng, n):
    c = eng.runtime.state.cache
    return np.asarray(c.k)[:, :n], np.asarray(c.v)[:, :n]


def test_reused_rows_equal_a_fresh_prefill(pair):
    """Turn 2 extends turn 1's prompt and answer: only the new ids are prefilled, from the reused position, and
    the cache rows and greedy tokens equal those of an engine that prefills every id."""
    reuse, fresh = pair
    rng = np.random.RandomState(0)
    ids = [int(t) for t in rng.randint(3, 150, 20)]
    history = list(ids)
    for turn in range(3):
        a = generate(reuse, history, max_new_tokens=6, ignore_eos=True)
        b = generate(fresh, history, max_new_tokens=6, ignore_eos=True)
        assert a.token_ids == b.token_ids, turn
        assert b.timings.reused_tokens == 0
        if turn:
            # the previous prompt and every answer token but the last were steps' inputs: their rows are kept
            assert a.timings.reused_tokens == prev_len + 5, turn
        n = len(history) + 5
        for x, y in zip(_rows(reuse, n), _rows(fresh, n)):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
        prev_len = len(history)
        history = history + a.token_ids + [int(t) for t in rng.randint(3, 150, 7)]
    st = reuse.stats()["kv_reuse"]
    assert st["enabled"] and st["reused_tokens"] > 0 and st["requests"] >= 3
    assert fresh.stats()["kv_reuse"]["reused_tokens"] == 0


def test_reuse_after_divergence_and_sampling(pair):
    """A prompt that parts from the cached ids midway reuses up to the parting; a sampled request reuses too and
    draws the same tokens as a fresh prefill with the same seed."""
    reuse, fresh = pair
    base = list(range(10, 40))
    generate(reuse, base, max_new_tokens=3, ignore_eos=True)
    other = base[:12] + [99, 98, 97]
    a = generate(reuse, other, max_new_tokens=8, temperature=1.2, seed=4, ignore_eos=True)
    b = generate(fresh, other, max_new_tokens=8, temperature=1.2, seed=4, ignore_eos=True)
    assert a.timings.reused_tokens == 12 and a.token_ids == b.token_ids
    same = generate(reuse, other, max_new_tokens=8, temperature=1.2, seed=4, ignore_eos=True)
    assert same.timings.reused_tokens == len(other) - 1 and same.token_ids == b.token_ids


def test_interleaved_logits_and_cancel_forget_the_rows(pair):
    """Anything else that uses the state (a timing run, a request abandoned midway) leaves nothing to reuse that
    it does not hold: the next request still equals a fresh prefill."""
    reuse, fresh = pair
    ids = list(range(50, 75))
    generate(reuse, ids, max_new_tokens=4, ignore_eos=True)
    reuse.pipelined_step_seconds(n_steps=3, context=5)  # overwrites rows from 0
    a = generate(reuse, ids, max_new_tokens=4, ignore_eos=True)
    assert a.timings.reused_tokens == 0
    assert a.token_ids == generate(fresh, ids, max_new_tokens=4, ignore_eos=True).token_ids
    s = generate(reuse, ids + [5, 6], max_new_tokens=20, ignore_eos=True, stream=True)
    next(iter(s))
    b = generate(reuse, ids + [7], max_new_tokens=4, ignore_eos=True)  # takes the engine over from the stream
    assert b.timings.reused_tokens == len(ids)
    assert b.token_ids == generate(fresh, ids + [7], max_new_tokens=4, ignore_eos=True).token_ids
    s.close()


def test_smollm2_chat_turns_reuse_and_equal_fresh(smollm2_dir, tmp_path):
    """A three-turn chat of the real SmolLM2 through its chat template: every turn after the first reuses the
    history's rows, and its greedy answer equals the one without reuse."""
    import hybrid_jax

    kw = dict(max_seq_len=512, cache_dir=tmp_path / "xc", prefill_buckets=(32, 64, 128, 256, 512))
    reuse = hybrid_jax.load(smollm2_dir, **kw)
    fresh = hybrid_jax.load(smollm2_dir, kv_reuse=False, **kw)
    msgs = [{"role": "system", "content": "You are a helpful assistant. Answer briefly."}]
    for turn, q in enumerate(["What is the capital of France?", "And of Italy?", "Which of the two is larger?"]):
        msgs.append({"role": "user", "content": q})
        ids = reuse.tokenizer.encode_chat(msgs)
        a = generate(reuse, ids, max_new_tokens=24)
        b = generate(fresh, ids, max_new_tokens=24)
        assert a.token_ids == b.token_ids, (turn, a.text, b.text)
        if turn:
            assert a.timings.reused_tokens > 0.8 * prev, (turn, a.timings.reused_tokens, len(ids))
        prev = len(ids)
        msgs.append({"role": "assistant", "content": a.text})
    assert "Paris" in msgs[2]["content"]
    reuse.close()
    fresh.close()


def test_state_lost_mid_step_reuses_nothing(pair):
    """A state replaced after an interrupt (its buffers donated, never returned) holds no rows to reuse."""
    import jax

    reuse, fresh = pair
    ids = list(range(60, 80))
    generate(reuse, ids, max_new_tokens=4, ignore_eos=True)
    for a in jax.tree.leaves(reuse.runtime.state):
        a.delete()
    a = generate(reuse, ids + [3], max_new_tokens=6, ignore_eos=True)
    assert a.timings.reused_tokens == 0
    assert a.token_ids == generate(fresh, ids + [3], max_new_tokens=6, ignore_eos=True).token_ids


def test_warmup_runs_forget_the_rows(pair):
    """warmup(run=True) executes every step once on the engine's state (a GPU's first execution builds its CUDA
    graph): it runs each warm-up executable, and the next request reuses no rows and equals a fresh engine's."""
    reuse, fresh = pair
    ids = [int(t) for t in np.random.RandomState(3).randint(3, 150, 30)]
    generate(reuse, ids, max_new_tokens=4, ignore_eos=True)
    rt = reuse.runtime
    ran, get = [], rt._get
    rt._get = lambda spec: ran.append(spec) or get(spec)
    try:
        reuse.warmup(run=True)
    finally:
        del rt._get
    assert set(rt.warmup_specs(reuse=True)) <= set(ran) and ("decode", rt.cache_len, False) in ran
    a = generate(reuse, ids + [5], max_new_tokens=6, ignore_eos=True)
    b = generate(fresh, ids + [5], max_new_tokens=6, ignore_eos=True)
    assert a.timings.reused_tokens == 0 and a.token_ids == b.token_ids
