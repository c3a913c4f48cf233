"""Measured floors: device-to-device copy bandwidth and dense matmul rate (JAX, on jax.devices()[0]).

Bandwidth: a jitted `x + 1` over a large array (an identity, `x.copy()` or `x + 0` can be folded into an
alias or no-op), counting bytes read plus bytes written; median over many calls, each synchronised.
Matmul rate: an n x n x n jitted product on random data (never zeros), 2 n^3 FLOPs, median.
"""
from __future__ import annotations

import time

import numpy as np


def _median_time(fn, arg, reps: int) -> tuple[float, list[float]]:
    fn(arg).block_until_ready()  # compile + warm
    fn(arg).block_until_ready()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(arg).block_until_ready()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)), ts


def copy_bandwidth(n_bytes: int, dtype: str = "bfloat16", reps: int = 50) -> dict:
    """Bytes read + written per second by a jitted `x + 1` over an array of about `n_bytes`."""
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(dtype)
    n = max(1, int(n_bytes) // dt.itemsize)
    x = jax.random.normal(jax.random.PRNGKey(1), (n,), jnp.float32).astype(dt)
    f = jax.jit(lambda a: a + jnp.asarray(1, dt))
    med, ts = _median_time(f, x, reps)
    moved = 2 * n * dt.itemsize
    del x
    return {"bw_Bps": moved / med, "copy_bytes": n * dt.itemsize, "copy_s": ts, "copy_dtype": str(dt)}


def matmul_rate(n: int, dtype: str = "bfloat16", reps: int = 30) -> dict:
    """FLOP/s of a jitted n x n @ n x n product on random data."""
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(dtype)
    ka, kb = jax.random.split(jax.random.PRNGKey(2))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dt)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dt)
    f = jax.jit(lambda x: x @ b)
    med, ts = _median_time(f, a, reps)
    return {"matmul_flops": 2.0 * n ** 3 / med, "matmul_n": n, "matmul_s": ts, "matmul_dtype": str(dt)}


def measure(on_accelerator: bool, dtype: str, copy_bytes: int | None = None, matmul_n: int | None = None,
            reps: int | None = None) -> dict:
    """Both floors; sizes default to 2 GiB / 8192 on an accelerator and 64 MiB / 512 on the CPU."""
    copy_bytes = copy_bytes or (2 * 2**30 if on_accelerator else 64 * 2**20)
    matmul_n = matmul_n or (8192 if on_accelerator else 512)
    reps = reps or (50 if on_accelerator else 10)
    out = copy_bandwidth(copy_bytes, dtype, reps)
    out.update(matmul_rate(matmul_n, dtype, max(5, reps * 3 // 5)))
    return out
