"""Measured floors: device-to-device copy bandwidth and dense matmul rate (JAX, on jax.devices()[0]).

Bandwidth: jitted `jnp.copy(x)` (skipped if its output aliases its input) and elementwise kernels (`x + 1`
in 1-D and 2-D, `xor` on 4-byte words) over a large array, counting bytes read plus bytes written; median
over many calls, each synchronised; plus, where PyTorch has CUDA, its `copy_` timed with CUDA events; the
fastest variant is the floor (XLA's code for them differs in speed and is slower than the card's best).
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


def _copy_variants(jnp, lax, dt):
    """Elementwise kernels that read and write every byte once; XLA's code for them differs in speed."""
    def add1_1d(a):
        return a + jnp.asarray(1, dt)

    def add1_2d(a):
        return (a.reshape(-1, 8192) + jnp.asarray(1, dt)).reshape(-1)

    def xor_u32(a):  # 4-byte words
        w = lax.bitcast_convert_type(a.reshape(-1, 8192, 4 // dt.itemsize), jnp.uint32) if dt.itemsize < 4 else \
            lax.bitcast_convert_type(a.reshape(-1, 8192), jnp.uint32)
        return w ^ jnp.uint32(1)

    def copy(a):  # an HLO copy (a device-to-device memcpy), checked below not to alias its input
        return jnp.copy(a)

    return {"copy": copy, "add1_1d": add1_1d, "add1_2d": add1_2d, "xor_u32": xor_u32}


def _aliases(y, x) -> bool:
    try:
        return y.unsafe_buffer_pointer() == x.unsafe_buffer_pointer()
    except Exception:  # noqa: BLE001 - no pointer to compare: trust the timing
        return y is x


def copy_bandwidth(n_bytes: int, dtype: str = "bfloat16", reps: int = 50) -> dict:
    """Bytes read + written per second by jitted elementwise kernels over an array of about `n_bytes`:
    the fastest of a few variants (all recorded)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    dt = jnp.dtype(dtype)
    n = max(8192 * 4, int(n_bytes) // dt.itemsize // (8192 * 4) * (8192 * 4))
    x = jax.random.normal(jax.random.PRNGKey(1), (n,), jnp.float32).astype(dt)
    moved = 2 * n * dt.itemsize
    per, best = {}, None
    for name, fn in _copy_variants(jnp, lax, dt).items():
        f = jax.jit(fn)
        if _aliases(f(x), x):  # no bytes moved: not a measurement
            continue
        med, ts = _median_time(f, x, reps)
        per[name] = moved / med
        if best is None or per[name] > per[best[0]]:
            best = (name, ts)
    del x
    tb = torch_copy_bandwidth(n * dt.itemsize, reps)
    if tb is not None:  # the card's copy engine through PyTorch: often faster than XLA's elementwise code
        per["torch_copy"] = tb[0]
        if tb[0] > per[best[0]]:
            best = ("torch_copy", tb[1])
    return {"bw_Bps": per[best[0]], "copy_variant": best[0], "copy_variants_Bps": per, "copy_bytes": n * dt.itemsize,
            "copy_s": best[1], "copy_dtype": str(dt)}


def torch_copy_bandwidth(n_bytes: int, reps: int) -> tuple[float, list[float]] | None:
    """Device-to-device `dst.copy_(src)` through PyTorch, timed with CUDA events; None without a CUDA torch."""
    try:
        import torch
        if not torch.cuda.is_available():
            return None
    except Exception:  # noqa: BLE001 - no torch here: only the JAX variants count
        return None
    src = torch.randn(n_bytes // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n_bytes / float(np.median(ts)), ts


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
