"""Tensor parallelism through JAX sharding: a 1-D device mesh with axis "tp" and one spec per tensor.

The weight layout (weights.py) is already split-friendly, so each tensor names the axis it is split on and
XLA's SPMD partitioner inserts the collectives: one all-reduce after the attention output projection and
one after the MLP down projection per layer, plus whatever the vocab-split logits need for sampling.

| tensor                         | spec                      | split on |
|--------------------------------|---------------------------|----------|
| wqkv [L, K, G+2, Dh, D]        | P(None, tp, ...)          | K: a kv head's queries, key and value stay together |
| wo   [L, D, K, G, Dh]          | P(None, None, tp, ...)    | K (partial sums, all-reduced) |
| w13  [L, 2, F, D]              | P(None, None, tp, None)   | F |
| w2   [L, D, F]                 | P(None, None, tp)         | F (partial sums, all-reduced) |
| lm_head [D, V]                 | P(None, tp)               | V (replicated where V is not a multiple of N) |
| embed [V, D], norms            | replicated                |   |
| KV cache k, v [L, S, K, Dh]    | P(None, None, tp, None)   | K, like wqkv |
| state scalars, PRNG key, ...   | replicated                |   |

Choices:
- embed is replicated, tied or not. The token lookup of a vocab-split table would be a gather plus an
  all-reduce per step; the table is small next to the layers (V*D, 0.26 GB at 7B bf16), and with tied
  embeddings the logits `h @ embed.T` then run unsplit on every device (correct; only the untied
  lm_head is split on V).
- N must divide n_kv_heads (hence n_heads) and ffn_dim, else `check` raises ValueError. The alternative
  for N > n_kv_heads (e.g. LLaMA-2-70B's 8 kv heads on 16 devices) is to replicate each kv head over
  N / K devices and split its query group; not done here.

Several hosts (a plan: the engine has not run across processes; the collectives have, see below).
Every host runs the same program and first calls

    jax.distributed.initialize(coordinator_address="host0:1234", num_processes=P, process_id=i)

(on GPU clusters under SLURM / Open MPI the three arguments are detected). `jax.devices()` then lists the
devices of every process; `mesh(n)` builds the mesh over `jax.devices()[:n]`, so it spans hosts when n
exceeds the local count (keep whole hosts in the mesh, tp within a host first: all-reduces per layer want
NVLink). Restore is already per shard: each process's Orbax restore fills only the shards its devices hold.
What changes for several processes: host values that enter jitted code (prompt tokens, the reset
scalars) must be the same on every process and be placed with `jax.make_array_from_process_local_data`
or `device_put` onto the replicated sharding; a token read back is read from a replicated array
(`addressable_data(0)`), and every process must issue the same sequence of executables. JAX's CPU backend
runs several processes with collectives on one machine (`jax_cpu_collectives_implementation="gloo"`, a
localhost coordinator): tests/test_tensor_parallel.py runs a psum across two such processes.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from . import weights as W
from .config import LlamaConfig

AXIS = "tp"

# Leaf name (as weights.abstract passes it) -> spec; anything not named here is replicated.
PARAM_SPECS = {
    "wqkv": P(None, AXIS, None, None, None),
    "wo": P(None, None, AXIS, None, None),
    "w13": P(None, None, AXIS, None),
    "w2": P(None, None, AXIS),
    "lm_head": P(None, AXIS),
}
CACHE_SPEC = P(None, None, AXIS, None)


def check(cfg: LlamaConfig, n: int) -> None:
    """Raise ValueError unless the model splits evenly over n devices."""
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"tensor_parallel must be an integer >= 1, got {n!r}")
    if n > 1 and cfg.quant is not None:
        raise ValueError(f"tensor_parallel={n}: quantized weights ({cfg.quant}) run on one device only; convert the "
                         f"model without --quantize (or with --dtype, for a GGUF source) to split it")
    for name, size in (("n_kv_heads", cfg.n_kv_heads), ("n_heads", cfg.n_heads), ("ffn_dim", cfg.ffn_dim)):
        if size % n:
            hint = (" (replicating kv heads over devices would be the alternative; not supported)"
                    if name == "n_kv_heads" else "")
            raise ValueError(f"tensor_parallel={n} does not divide {name}={size}: each device must hold whole "
                             f"kv heads and an equal share of the FFN; pick N dividing n_kv_heads="
                             f"{cfg.n_kv_heads} and ffn_dim={cfg.ffn_dim}{hint}")


def mesh(n: int) -> Mesh:
    """A 1-D mesh with axis "tp" over the first n devices."""
    devs = jax.devices()
    if n > len(devs):
        raise ValueError(f"tensor_parallel={n} needs {n} devices but only {len(devs)} are visible "
                         f"({devs[0].platform}); on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={n} "
                         f"before jax is imported")
    return Mesh(np.array(devs[:n]), (AXIS,))


def replicated(m: Mesh) -> NamedSharding:
    return NamedSharding(m, P())


def cache_sharding(m: Mesh) -> NamedSharding:
    return NamedSharding(m, CACHE_SPEC)


def sharding_fn(m: Mesh):
    """`(leaf name, shape) -> NamedSharding` for weights.abstract / checkpoint.restore."""
    n = m.shape[AXIS]

    def fn(name: str, shape: tuple) -> NamedSharding:
        spec = PARAM_SPECS.get(name, P())
        if any(ax is not None and shape[i] % n for i, ax in enumerate(spec)):
            spec = P()  # only lm_head can get here (V not a multiple of N; check() covers the rest)
        return NamedSharding(m, spec)

    return fn


def shard_params(params, cfg: LlamaConfig, m: Mesh):
    """Place a weights pytree on the mesh (a no-op for arrays already placed so)."""
    target = jax.tree.map(lambda a: a.sharding, W.abstract(cfg, sharding_fn(m)))
    return jax.device_put(params, target)


def describe(m: Mesh | None) -> dict | None:
    """What of the mesh an executable depends on (for cache keys)."""
    if m is None:
        return None
    return {"axes": dict(m.shape), "device_ids": [int(d.id) for d in m.devices.flat]}
