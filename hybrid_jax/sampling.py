"""Token selection on the device from a PRNG key: greedy, temperature, top-k, top-p. Never syncs to the host.

Sampling parameters are arrays (part of the device-resident decode state), so changing them never
recompiles. Conventions: temperature 0 means greedy; top_k 0 means no top-k limit; top_p 1 means none.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class SamplingParams:
    temperature: jax.Array  # [] float32
    top_k: jax.Array  # [] int32
    top_p: jax.Array  # [] float32


def make_params(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None) -> SamplingParams:
    return SamplingParams(
        temperature=jnp.asarray(temperature, jnp.float32),
        top_k=jnp.asarray(top_k or 0, jnp.int32),
        top_p=jnp.asarray(1.0 if top_p is None else top_p, jnp.float32),
    )


def greedy(logits: jax.Array) -> jax.Array:
    """logits [V] -> [] int32."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def filtered_logits(logits: jax.Array, sp: SamplingParams) -> tuple[jax.Array, jax.Array]:
    """Temperature-scaled logits sorted descending, with tokens outside top-k / top-p set to -inf.

    Returns (masked sorted logits [V], token ids in that order [V]). top-p keeps the smallest prefix of
    the sorted distribution whose probability reaches p (always at least one token).
    """
    t = jnp.maximum(sp.temperature, 1e-6)
    scaled = logits.astype(jnp.float32) / t
    order = jnp.argsort(-scaled)
    s = scaled[order]
    rank = jnp.arange(s.shape[-1], dtype=jnp.int32)
    keep = (sp.top_k <= 0) | (rank < sp.top_k)
    s = jnp.where(keep, s, -jnp.inf)
    probs = jax.nn.softmax(s)
    before = jnp.cumsum(probs) - probs  # probability mass of the tokens ranked above
    keep = keep & ((before < sp.top_p) | (rank == 0))
    return jnp.where(keep, s, -jnp.inf), order


def sample(logits: jax.Array, key: jax.Array, sp: SamplingParams) -> jax.Array:
    """One token id ([] int32) from logits [V]; greedy where temperature == 0."""
    s, order = filtered_logits(logits, sp)
    pick = order[jax.random.categorical(key, s)].astype(jnp.int32)
    return jnp.where(sp.temperature > 0, pick, greedy(logits))
