"""Sampling on the device: determinism from the seed, the greedy equivalences, top-k / top-p sets."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax import sampling


def kept(logits, **kw):
    s, order = sampling.filtered_logits(jnp.asarray(logits, jnp.float32), sampling.make_params(**kw))
    return sorted(int(t) for t, v in zip(np.asarray(order), np.asarray(s)) if np.isfinite(v))


PROBS = np.array([0.05, 0.4, 0.1, 0.25, 0.2])  # sorted: 1 (0.4), 3 (0.25), 4 (0.2), 2 (0.1), 0 (0.05)
LOGITS = np.log(PROBS)


@pytest.mark.parametrize("p, want", [(0.39, [1]), (0.41, [1, 3]), (0.64, [1, 3]), (0.66, [1, 3, 4]),
                                     (0.84, [1, 3, 4]), (0.86, [1, 2, 3, 4]), (1.0, [0, 1, 2, 3, 4]),
                                     (0.01, [1])])
def test_top_p_keeps_smallest_set_reaching_p(p, want):
    assert kept(LOGITS, temperature=1.0, top_p=p) == want


@pytest.mark.parametrize("k, want", [(1, [1]), (2, [1, 3]), (4, [1, 2, 3, 4]), (0, [0, 1, 2, 3, 4])])
def test_top_k(k, want):
    assert kept(LOGITS, temperature=1.0, top_k=k) == want


def test_top_k_and_top_p_together():
    assert kept(LOGITS, temperature=1.0, top_k=2, top_p=0.99) == [1, 3]


def test_sampled_frequencies_follow_filtered_distribution():
    sp = sampling.make_params(temperature=1.0, top_p=0.66)
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    toks = np.asarray(jax.vmap(lambda k: sampling.sample(jnp.asarray(LOGITS, jnp.float32), k, sp))(keys))
    freq = np.bincount(toks, minlength=5) / len(toks)
    want = np.array([0, 0.4, 0, 0.25, 0.2]) / 0.85
    assert np.abs(freq - want).max() < 0.03  # 4000 draws: standard error ~0.008


def test_temperature_zero_is_argmax():
    logits = jnp.asarray(np.random.RandomState(0).randn(100), jnp.float32)
    for seed in range(5):
        t = sampling.sample(logits, jax.random.PRNGKey(seed), sampling.make_params(temperature=0.0, top_k=5))
        assert int(t) == int(np.argmax(np.asarray(logits)))
