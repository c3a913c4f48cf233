"""Baseline: plain `jax.jit` of hybrid_jax.model.forward, none of the runtime's work.

No donation, no AOT, no device-resident state: the cache is passed in and returned (so XLA writes a new
one every step), the host builds the token and position arrays of each step and reads every token back.
Greedy argmax is inside the jitted function. Prefill is one jit per exact prompt length (attending to the
prompt's rows only), compiled by a warm-up call before timing.
"""
from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax import kv_cache, model


class PlainJit:
    def __init__(self, cfg, params, max_seq_len: int):
        self.cfg, self.params, self.max_seq_len = cfg, params, int(max_seq_len)

        def prefill(params, cache, tokens):  # tokens [n]; positions 0..n-1
            n = tokens.shape[0]
            logits, cache = model.forward(cfg, params, cache, tokens, jnp.arange(n, dtype=jnp.int32), n)
            return jnp.argmax(logits[-1]).astype(jnp.int32), cache

        def decode(params, cache, token, pos):  # token, pos: [] int32
            logits, cache = model.forward(cfg, params, cache, token[None], pos[None])
            return jnp.argmax(logits[-1]).astype(jnp.int32), cache

        self._prefill = jax.jit(prefill)
        self._decode = jax.jit(decode)
        self.cache0 = kv_cache.zeros(cfg, self.max_seq_len)

    def generate(self, ids: Sequence[int], max_new_tokens: int) -> tuple[float, list[float], list[int]]:
        """Greedy, EOS ignored. Returns (ttft_s, inter-token intervals, token ids)."""
        if len(ids) + max_new_tokens > self.max_seq_len:
            raise ValueError("prompt plus new tokens exceed max_seq_len")
        t0 = time.perf_counter()
        tok, cache = self._prefill(self.params, self.cache0, np.asarray(ids, np.int32))
        t = int(tok)
        last = time.perf_counter()
        ttft, itl, out = last - t0, [], [t]
        pos = len(ids)
        for _ in range(max_new_tokens - 1):
            tok, cache = self._decode(self.params, cache, np.int32(t), np.int32(pos))
            t = int(tok)
            now = time.perf_counter()
            itl.append(now - last)
            last = now
            out.append(t)
            pos += 1
        return ttft, itl, out

    def pipelined_step_seconds(self, n_steps: int = 100) -> float:
        """Device time per decode step when the token stays on the device (no host reads in between)."""
        tok, cache = self._prefill(self.params, self.cache0, np.ones((1,), np.int32))
        n = min(n_steps, self.max_seq_len - 2)
        tok, cache = self._decode(self.params, cache, tok, np.int32(1))
        tok.block_until_ready()
        t0 = time.perf_counter()
        for i in range(n):
            tok, cache = self._decode(self.params, cache, tok, np.int32(2 + i))
        tok.block_until_ready()
        return (time.perf_counter() - t0) / n
