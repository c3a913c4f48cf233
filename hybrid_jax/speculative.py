"""Speculative decoding's device side: prompt-lookup proposals and exact acceptance. Pure functions; traced
by runtime.py's verify step.

A verify step feeds the last token plus K proposals (W = K + 1 rows) through the model at once, which at batch
1 reads the weights once, like a one-token step. Acceptance keeps the output exact:
- greedy: proposal i is accepted while it equals the argmax after the tokens before it; the first argmax that
  differs (or the one after all K) is the step's own token, so every step yields 1 .. K + 1 tokens;
- sampling (temperature > 0): a proposal x from a point-mass draft is accepted with probability p(x) (p: the
  target's filtered distribution, as sampling.sample draws from); on rejection the token is drawn from p with
  x removed, renormalised. Each emitted token then has exactly the target's distribution.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .sampling import SamplingParams, filtered_logits

NGRAM_MIN, NGRAM_MAX = 1, 3  # n-gram lengths tried, longest first


def ngram_propose(hist: jax.Array, length: jax.Array, k: int, nmin: int = NGRAM_MIN, nmax: int = NGRAM_MAX
                  ) -> jax.Array:
    """K proposals [k] int32: the tokens that followed the latest earlier occurrence of the sequence's last
    n-gram (the longest n in nmin..nmax that occurs; among equals the latest), from `hist` [S] whose first
    `length` entries are the sequence. Without any occurrence the last token is proposed (verified like any).

    A match ending at e (< length - 1) continues with hist[e + 1 ..]; tokens past length - 1 are stale rows,
    harmless to propose (they are verified, so only acceptance suffers)."""
    S = hist.shape[0]
    e = jnp.arange(S, dtype=jnp.int32)
    run = jnp.ones((S,), jnp.bool_)
    matched = jnp.zeros((S,), jnp.int32)  # length of the match ending at e, capped at nmax
    for j in range(nmax):
        tail = hist[jnp.maximum(length - 1 - j, 0)]  # the sequence's j-th token from its end
        prev = hist[jnp.clip(e - j, 0, S - 1)]
        run = run & (e - j >= 0) & (prev == tail) & (length - 1 - j >= 0)
        matched = matched + run.astype(jnp.int32)
    ok = (e < length - 1) & (matched >= nmin)
    score = jnp.where(ok, matched * S + e, -1)  # longest first, then latest
    best = jnp.argmax(score).astype(jnp.int32)
    found = score[best] >= 0
    idx = jnp.clip(best + 1 + jnp.arange(k, dtype=jnp.int32), 0, S - 1)
    last = hist[jnp.maximum(length - 1, 0)]
    return jnp.where(found, hist[idx], last).astype(jnp.int32)


def accept_greedy(logits: jax.Array, proposals: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits [W, V] after [token, p1..pK], proposals [K] -> (tokens [W]: argmax of each row, n: how many of
    them to emit, 1 .. W). The emitted tokens are tokens[:n] (the accepted proposals, then the step's own)."""
    g = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    ok = (proposals == g[:-1]).astype(jnp.int32)
    n = jnp.sum(jnp.cumprod(ok)) + 1
    return g, n.astype(jnp.int32)


def accept_sample(logits: jax.Array, proposals: jax.Array, key: jax.Array, sp: SamplingParams
                  ) -> tuple[jax.Array, jax.Array]:
    """As accept_greedy for temperature > 0 (point-mass proposals): tokens [W] where tokens[i] for i < n - 1
    are the accepted proposals and tokens[n - 1] is drawn from the residual at the first rejection (or from
    the last row when all are accepted). The point mass q makes `_accept`'s rule: accept x with p(x), else draw
    from p without x."""
    q = jax.nn.one_hot(proposals, logits.shape[-1], dtype=jnp.float32)
    return _accept(_probs(logits, sp), q, proposals, key)


def accept_draft_sample(logits: jax.Array, draft_logits: jax.Array, proposals: jax.Array, key: jax.Array,
                        sp: SamplingParams) -> tuple[jax.Array, jax.Array]:
    """As accept_sample for proposals drawn from a draft model's distributions q (its logits [K, V], filtered
    the same way)."""
    return _accept(_probs(logits, sp), _probs(draft_logits, sp), proposals, key)


def _probs(logits: jax.Array, sp: SamplingParams) -> jax.Array:
    """The filtered distribution sampling.sample draws from, over the vocabulary in id order: [..., V]."""
    s, order = jax.vmap(lambda l: filtered_logits(l, sp))(logits.reshape(-1, logits.shape[-1]))
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.zeros_like(p).at[jnp.arange(p.shape[0])[:, None], order].set(p)
    return out.reshape(logits.shape)


def _accept(p: jax.Array, q: jax.Array, proposals: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Speculative sampling: p [W, V] the target's distributions after each input, q [K, V] those the K
    proposals were drawn from. Proposal i is accepted with probability min(1, p(x) / q(x)); at the first
    rejection the token is drawn from max(p - q, 0) renormalised (from p where that is empty); after K
    acceptances from row K. Returns (tokens [W], n emitted)."""
    W = p.shape[0]
    q = jnp.concatenate([q, jnp.zeros_like(p[:1])])  # row K: no proposal
    prop = jnp.concatenate([proposals, proposals[-1:]])
    px = jnp.take_along_axis(p, prop[:, None], axis=1)[:, 0]
    qx = jnp.take_along_axis(q, prop[:, None], axis=1)[:, 0]
    k_acc, k_draw = jax.random.split(key)
    u = jax.random.uniform(k_acc, (W,))
    ok = (u * qx < px) & (jnp.arange(W) < W - 1)  # u < p/q without dividing by a zero q
    n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32))) + 1
    row = n - 1
    resid = jnp.maximum(p[row] - q[row], 0.0)
    resid = jnp.where(jnp.sum(resid) > 0, resid, p[row])
    drawn = jax.random.categorical(k_draw, jnp.log(resid)).astype(jnp.int32)
    tokens = jnp.where(jnp.arange(W) == row, drawn, prop).astype(jnp.int32)
    return tokens, n.astype(jnp.int32)
