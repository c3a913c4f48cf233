"""Static, preallocated KV cache of `max_seq_len` positions, updated in place.

Both arrays are stacked over layers; a layer's new keys/values go in with one dynamic-update-slice into
the stacked array (in place when the cache is donated), never by slicing a layer out and re-stacking.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from .config import LlamaConfig


@struct.dataclass
class KVCache:
    k: jax.Array  # [L, S, K, Dh]
    v: jax.Array  # [L, S, K, Dh]

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[1]


def cache_shape(cfg: LlamaConfig, max_seq_len: int) -> tuple[int, ...]:
    return (cfg.n_layers, max_seq_len, cfg.n_kv_heads, cfg.hd)


def abstract(cfg: LlamaConfig, max_seq_len: int, sharding=None) -> KVCache:
    kw = {"sharding": sharding} if sharding is not None else {}
    s = jax.ShapeDtypeStruct(cache_shape(cfg, max_seq_len), jnp.dtype(cfg.dtype), **kw)
    return KVCache(k=s, v=s)


def zeros(cfg: LlamaConfig, max_seq_len: int, sharding=None) -> KVCache:
    """Zeros, made in place on `sharding`'s devices (each shard on its own device) when one is given."""
    shape, dtype = cache_shape(cfg, max_seq_len), jnp.dtype(cfg.dtype)
    return KVCache(k=jnp.zeros(shape, dtype, device=sharding), v=jnp.zeros(shape, dtype, device=sharding))


def update(cache: KVCache, layer: int, start: jax.Array, k: jax.Array, v: jax.Array) -> KVCache:
    """Write k, v ([T, K, Dh]) of `layer` at positions start .. start+T-1 (caller keeps them in range)."""
    zero = jnp.zeros((), jnp.int32)
    idx = (jnp.asarray(layer, jnp.int32), start.astype(jnp.int32), zero, zero)
    return KVCache(
        k=jax.lax.dynamic_update_slice(cache.k, k[None].astype(cache.k.dtype), idx),
        v=jax.lax.dynamic_update_slice(cache.v, v[None].astype(cache.v.dtype), idx),
    )
