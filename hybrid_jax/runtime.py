"""The only place that compiles.

- Decode: one step `(params, state) -> (state, token)` lowered and compiled ahead of time on abstract
  shapes when the runtime is made, its state (KV cache, position, last token, PRNG key, sampling
  parameters) donated and returned, so the step has fixed buffers and XLA's command buffers replay the
  same CUDA graph each token. A greedy variant is compiled at once; the sampling variant in the background.
- Prefill: `jax.jit` of `(params, state, tokens[T], n) -> (state, token)` per shape bucket (T tokens,
  attention over the first kv cache rows), compiled on first use or by `warmup()`. A prompt whose bucket
  is not compiled is served at once in chunks through compiled buckets while its own compiles in a
  background thread.
- Every executable goes through the on-disk `ExecCache` first.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import inspect
import logging
import os
import threading
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from . import decode_attention as attn_lib
from . import gemv as gemv_lib
from . import kv_cache, model, sampling, sharding
from . import weights as W
from .config import LlamaConfig
from .exec_cache import ExecCache, environment_key
from .kv_cache import KVCache
from .sampling import SamplingParams

log = logging.getLogger(__name__)


@struct.dataclass
class DecodeState:
    cache: KVCache
    pos: jax.Array  # [] int32: position where `token` goes next (= tokens in the cache)
    token: jax.Array  # [] int32: the last token produced, fed to the next step
    key: jax.Array  # [2] uint32: PRNG key
    sp: SamplingParams


def default_buckets(max_seq_len: int, smallest: int = 16) -> tuple[int, ...]:
    out, b = [], smallest
    while b < max_seq_len:
        out.append(b)
        b *= 2
    out.append(max_seq_len)
    return tuple(out)


def _source_digest() -> str:
    """Changes to the traced code invalidate cached executables."""
    h = hashlib.sha256()
    for mod in (model, kv_cache, sampling, W, gemv_lib, attn_lib):
        h.update(inspect.getsource(mod).encode())
    h.update(inspect.getsource(_decode_step).encode())
    h.update(inspect.getsource(_prefill_step).encode())
    h.update(inspect.getsource(pack_request).encode())
    h.update(inspect.getsource(_logits_fn).encode())
    return h.hexdigest()[:16]


# ---- the traced functions ---------------------------------------------------------------------------

def _decode_step(cfg: LlamaConfig, kv_len: int, do_sample: bool, params: W.Weights, state: DecodeState,
                 gemv: str | None = None, attn: str | None = None):
    logits, cache = model.forward(cfg, params, state.cache, state.token[None], state.pos[None], kv_len, gemv, attn)
    key, sub = jax.random.split(state.key)
    nxt = sampling.sample(logits[0], sub, state.sp) if do_sample else sampling.greedy(logits[0])
    return state.replace(cache=cache, pos=state.pos + 1, token=nxt, key=key), nxt


# The prefill's one host->device argument: int32 [T + REQ_FIELDS] = the chunk's T token slots, then
# n (valid tokens), fresh (1: a new request at position 0 with the key and sampling parameters below; 0:
# continue `state`), the PRNG key's 2 words, temperature (float32 bits), top_k, top_p (float32 bits), unused.
# One transfer per chunk, and no separate state reset before a request (run 20: 0.5 ms of TTFT).
REQ_FIELDS = 8


def pack_request(tokens: np.ndarray, T: int, request: tuple | None) -> np.ndarray:
    """The prefill argument for `tokens` (<= T) and, for a new request, (seed, temperature, top_k, top_p)."""
    buf = np.zeros((T + REQ_FIELDS,), np.int32)
    buf[:len(tokens)] = tokens
    buf[T] = len(tokens)
    if request is not None:
        seed, *sp = request
        t, k, p = _sampling_scalars(*sp)
        buf[T + 1] = 1
        buf[T + 2:T + 4] = _key_data(seed).view(np.int32)
        buf[T + 4:T + 7] = t.view(np.int32), k, p.view(np.int32)
    return buf


def _prefill_step(cfg: LlamaConfig, kv_len: int, params: W.Weights, state: DecodeState, req: jax.Array,
                  gemv: str | None = None, gemm: str | None = None, fused: str | None = None,
                  wo: str | None = None):
    """Write the chunk's n tokens at positions pos..pos+n-1 (rows up to pos+T-1 are scratch) and pick the
    next token; `req` as `pack_request` makes it (a fresh request starts at position 0 with its own key
    and sampling parameters). `gemm`: the projections of short chunks (T <= gemv.ROWS_MAX) through the
    kernels of gemv.py; `fused`: the attention of a prompt's own bucket (kv_len = T) as one fused kernel
    (model.fused_attention); `wo`: the output projection alone through gemv.py's kernels (model.trunk)."""
    T = req.shape[0] - REQ_FIELDS
    tokens, meta = req[:T], req[T:]
    n, fresh = meta[0], meta[1] != 0
    f32 = lambda v: jax.lax.bitcast_convert_type(v, jnp.float32)
    state = state.replace(
        pos=jnp.where(fresh, 0, state.pos),
        key=jnp.where(fresh, jax.lax.bitcast_convert_type(meta[2:4], jnp.uint32), state.key),
        sp=SamplingParams(temperature=jnp.where(fresh, f32(meta[4]), state.sp.temperature),
                          top_k=jnp.where(fresh, meta[5], state.sp.top_k),
                          top_p=jnp.where(fresh, f32(meta[6]), state.sp.top_p)))
    positions = state.pos + jnp.arange(T, dtype=jnp.int32)
    x, cache = model.trunk(cfg, params, state.cache, tokens, positions, kv_len, gemm, fused=fused, wo=wo)
    last = jax.lax.dynamic_index_in_dim(x, n - 1, axis=0, keepdims=False)  # final norm on this row only
    logits = model.logits_from_hidden(cfg, params, last, gemv, normed=False)
    key, sub = jax.random.split(state.key)
    nxt = sampling.sample(logits, sub, state.sp)
    return state.replace(cache=cache, pos=state.pos + n, token=nxt, key=key), nxt


def prefill_jit(cfg: LlamaConfig, kv_len: int, gemv: str | None = None, gemm: str | None = None,
                fused: str | None = None, wo: str | None = None, **jit_kw):
    """The prefill step of a chunk attending over `kv_len` cache rows, jitted with the state donated (what
    `Runtime` lowers and compiles for a prefill bucket; scripts/gpu_compile_stall.py times its phases)."""
    def prefill_step(p, s, req):
        return _prefill_step(cfg, kv_len, p, s, req, gemv, gemm, fused, wo)
    return jax.jit(prefill_step, donate_argnums=(1,), **jit_kw)


def _logits_fn(cfg: LlamaConfig, params: W.Weights, tokens: jax.Array):
    cache = kv_cache.zeros(cfg, tokens.shape[0])
    logits, _ = model.forward(cfg, params, cache, tokens, jnp.arange(tokens.shape[0], dtype=jnp.int32))
    return logits


@dataclasses.dataclass
class Stats:
    compiles: int = 0  # executables compiled by this runtime (not loaded from disk)
    compile_seconds: float = 0.0
    background_compiles_started: int = 0


class Runtime:
    def __init__(self, cfg: LlamaConfig, params: W.Weights, max_seq_len: int,
                 prefill_buckets: Sequence[int] | None = None, cache_dir: str | Path | None = None,
                 use_disk_cache: bool = True, decode_kv_buckets: Sequence[int] | None = None,
                 compile_sampling: bool = True, mesh: jax.sharding.Mesh | None = None, compile_workers: int = 4,
                 gemv: str | None = "auto", decode_attention: str | None = "auto", prefill_gemm: str | None = "auto",
                 prefill_attention: str | None = "auto", prefill_wo: str | None = "auto",
                 prefill_matmuls: str = "auto", token_memory: str | None = "auto", background_compiles: bool = True):
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        self.cfg = cfg
        self.params = params
        self.max_seq_len = int(max_seq_len)
        buckets = tuple(sorted(set(int(b) for b in (prefill_buckets or default_buckets(self.max_seq_len)))))
        if not buckets or buckets[0] < 1:
            raise ValueError(f"prefill_buckets must be positive integers, got {prefill_buckets}")
        self.min_bucket = buckets[0]
        # Cache rows: room for a smallest-bucket chunk starting at any position < max_seq_len.
        self.cache_len = -(-self.max_seq_len // self.min_bucket) * self.min_bucket + self.min_bucket
        self.buckets = tuple(b for b in buckets if b <= self.cache_len)
        kv = sorted(set(int(b) for b in (decode_kv_buckets or ())) | {self.cache_len})
        self.decode_kv_buckets = tuple(b for b in kv if b <= self.cache_len)
        self.exec_cache = ExecCache(cache_dir) if use_disk_cache else None
        # Queue the bucket of a prompt that has none compiled (for the requests after it). Off for a process
        # that serves one request (the command line's `generate`): the compile would only compete with it.
        self.background_compiles = bool(background_compiles)
        self.stats_ = Stats()
        self._lock = threading.Lock()
        self._execs: dict[tuple, object] = {}
        self._pending: dict[tuple, cf.Future] = {}
        # XLA compiles release the GIL: several executables compile at once.
        self.last_prefill_chunks = 0  # chunks the last prefill ran as (1 = its own bucket)
        self._pool = cf.ThreadPoolExecutor(max_workers=compile_workers, thread_name_prefix="hybrid_jax-compile")
        self._env = {**environment_key(), "source": _source_digest()}
        # Tensor parallel (see sharding.py): params arrive placed on `mesh`; the cache is split on kv heads,
        # the small state is replicated. Without a mesh everything lives on the default device.
        self.mesh = mesh
        self._cache_sharding = sharding.cache_sharding(mesh) if mesh is not None else None
        self._small_sharding = sharding.replicated(mesh) if mesh is not None else None
        # The devices the executables run on, in mesh order (needed to load them from disk).
        self._devices = (list(mesh.devices.flat) if mesh is not None
                         else sorted(jax.tree.leaves(params)[0].sharding.device_set, key=lambda d: d.id))
        self.gemv = resolve_gemv(gemv, self._devices, mesh)
        self.attn = resolve_attention(decode_attention, self.gemv, mesh)
        self.gemm = resolve_prefill_gemm(prefill_gemm, self.gemv, mesh)
        self.fused = resolve_prefill_attention(prefill_attention, cfg, self._devices, mesh)
        self.fused_min_rows = fused_min_rows(prefill_attention)
        self.wo = resolve_prefill_wo(prefill_wo, self.gemv, mesh)
        self.matmuls = resolve_prefill_matmuls(prefill_matmuls)
        self.token_memory = resolve_token_memory(token_memory, self._devices, mesh)
        self._abs_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), params)
        self._abs_state = self._abstract_state()
        self.state = self._fresh_state()
        # The static path: compiled now (concurrently). The smallest prefill bucket over the whole cache
        # serves any chunk.
        now = [("decode", kvb, False) for kvb in self.decode_kv_buckets] + [self._universal()]
        for f in [self._get_async(s) for s in now]:
            if f is not None:
                f.result()
        if compile_sampling:
            for kvb in self.decode_kv_buckets:
                self._get_async(("decode", kvb, True))

    # ---- state -------------------------------------------------------------------------------
    def _small(self, shape, dtype) -> jax.ShapeDtypeStruct:
        kw = {"sharding": self._small_sharding} if self._small_sharding is not None else {}
        return jax.ShapeDtypeStruct(shape, dtype, **kw)

    def _abstract_state(self) -> DecodeState:
        i32, f32 = self._small((), jnp.int32), self._small((), jnp.float32)
        return DecodeState(cache=kv_cache.abstract(self.cfg, self.cache_len, self._cache_sharding), pos=i32, token=i32,
                           key=self._small((2,), jnp.uint32), sp=SamplingParams(f32, i32, f32))

    def _fresh_state(self) -> DecodeState:
        return self.reset_state(kv_cache.zeros(self.cfg, self.cache_len, self._cache_sharding), seed=0)

    def ensure_state(self) -> None:
        """Replace a state whose buffers were donated to a call that never returned its result (interrupted
        between the two): rows in the cache are scratch for the next request anyway."""
        if any(a.is_deleted() for a in jax.tree.leaves(self.state)):
            log.warning("the decode state was lost mid-step (interrupted?); starting from a fresh one")
            self.state = self._fresh_state()

    def reset_state(self, cache: KVCache, seed: int = 0, temperature=0.0, top_k=None, top_p=None) -> DecodeState:
        """A state at position 0 reusing `cache`'s buffers (stale rows are masked, then overwritten)."""
        small = jax.device_put((np.int32(0), np.int32(0), _key_data(seed),
                                *_sampling_scalars(temperature, top_k, top_p)),
                               self._small_sharding)  # one transfer call; replicated over the mesh if any
        pos, token, key, t, k, p = small
        return DecodeState(cache=cache, pos=pos, token=token, key=key, sp=SamplingParams(t, k, p))

    # ---- compile / load --------------------------------------------------------------------------
    def _universal(self) -> tuple:
        return ("prefill", self.min_bucket, self.cache_len)

    def _matmuls(self, spec: tuple) -> str | None:
        """What a prefill executable's matmuls are compiled with (PREFILL_MATMULS); None for a decode step."""
        if spec[0] != "prefill":
            return None
        return prefill_matmuls_for(self.matmuls, spec[1], self.cfg.n_params, self.mesh)

    def _fused(self, spec: tuple) -> str | None:
        """The fused attention a prefill executable is compiled with: `prefill_attention`'s, in buckets of at
        least `fused_min_rows` rows (fused_min_rows); None for a decode step."""
        return self.fused if spec[0] == "prefill" and spec[1] >= self.fused_min_rows else None

    def _key(self, spec: tuple) -> dict:
        return {"spec": list(spec), "model": self.cfg.to_dict(), "cache_len": self.cache_len,
                "params": [str(a.sharding) for a in jax.tree.leaves(self._abs_params)],
                "mesh": sharding.describe(self.mesh), "gemv": self.gemv, "attn": self.attn,
                # the prefill's kernels (a decode step does not depend on them: shared between ablations)
                "gemm": [self.gemm, self.wo, gemv_lib.ROWS_MAX] if spec[0] == "prefill" else None,
                "fused_attention": self._fused(spec),
                "matmuls": self._matmuls(spec),
                "token_memory": self.token_memory,
                # switches read when the step is traced (not in the source digest): the attention kernel's and
                # the XLA path's matmul form and the projections written as row reductions
                "kernel_flags": [attn_lib.SKIP_EMPTY_PARTITIONS, model.MATMUL_2D,
                                 sorted(model.row_reduce_names(self.gemv))],
                **self._env}

    def _lower(self, spec: tuple):
        cfg = self.cfg
        # With a mesh the returned state keeps the input state's shardings, so it feeds the next step as is.
        # On one device the next token is written to pinned host memory where token_memory says so.
        if self.mesh is not None:
            kw = {"out_shardings": (jax.tree.map(lambda a: a.sharding, self._abs_state), self._small_sharding)}
        elif self.token_memory is not None:
            dev = self._devices[0]
            kw = {"out_shardings": (jax.sharding.SingleDeviceSharding(dev),
                                    jax.sharding.SingleDeviceSharding(dev, memory_kind=self.token_memory))}
        else:
            kw = {}
        if spec[0] == "logits":
            def logits_all(p, t):
                return _logits_fn(cfg, p, t)
            return jax.jit(logits_all).lower(self._abs_params, self._small((spec[1],), jnp.int32))
        if spec[0] == "decode":
            _, kvb, do_sample = spec
            def decode_step(p, s):
                return _decode_step(cfg, kvb, do_sample, p, s, self.gemv, self.attn)
            return jax.jit(decode_step, donate_argnums=(1,), **kw).lower(self._abs_params, self._abs_state)
        _, T, kvb = spec
        return prefill_jit(cfg, kvb, self.gemv, self.gemm, self._fused(spec), self.wo, **kw).lower(
            self._abs_params, self._abs_state, self._small((T + REQ_FIELDS,), jnp.int32))

    def _build(self, spec: tuple):
        key = self._key(spec)
        if self.exec_cache is not None:
            ex = self.exec_cache.load(key, self._devices)
            if ex is not None:
                return ex
        t0 = time.perf_counter()
        opts = PREFILL_MATMULS.get(self._matmuls(spec))  # None for a decode step and for "autotune"
        ex = self._lower(spec).compile(compiler_options=opts)
        dt = time.perf_counter() - t0
        with self._lock:
            self.stats_.compiles += 1
            self.stats_.compile_seconds += dt
        log.info("compiled %s in %.2fs", spec, dt)
        if self.exec_cache is not None:
            self.exec_cache.store(key, ex)
        return ex

    def _get(self, spec: tuple):
        """The executable for `spec`, compiling (or loading) it now if needed."""
        with self._lock:
            ex = self._execs.get(spec)
            fut = self._pending.get(spec)
        if ex is not None:
            return ex
        if fut is not None:
            return fut.result()
        ex = self._build(spec)
        with self._lock:
            self._execs[spec] = ex
        return ex

    def _get_async(self, spec: tuple) -> cf.Future | None:
        with self._lock:
            if spec in self._execs or spec in self._pending:
                return self._pending.get(spec)
            fut = self._pool.submit(self._bg_build, spec)
            self._pending[spec] = fut
            self.stats_.background_compiles_started += 1
        return fut

    def _bg_build(self, spec):
        try:
            ex = self._build(spec)
            with self._lock:
                self._execs[spec] = ex
            return ex
        except Exception:
            log.exception("background compile of %s failed", spec)
            raise
        finally:
            with self._lock:
                self._pending.pop(spec, None)

    def compiled(self, spec: tuple) -> bool:
        with self._lock:
            return spec in self._execs

    def bucket_for(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def warmup(self, background: bool = False, progress: bool = False) -> list[cf.Future]:
        """Compile (or load from the disk cache) every prefill bucket (prompt from position 0) and the sampling
        decode steps; in the foreground with a progress bar where `progress`."""
        specs = [("prefill", b, b) for b in self.buckets] + [("decode", k, True) for k in self.decode_kv_buckets]
        if background:
            return [f for f in (self._get_async(s) for s in specs) if f is not None]
        from tqdm import tqdm

        bar = tqdm(specs, desc="executables", unit="exe", disable=not progress)
        for s in bar:
            bar.set_postfix_str(f"{s[0]} {s[1]}")
            self._get(s)
        return []

    def wait_background(self, timeout: float | None = None) -> None:
        with self._lock:
            futs = list(self._pending.values())
        cf.wait(futs, timeout=timeout)

    # ---- planning -----------------------------------------------------------------------------
    def plan_prefill(self, n: int) -> list[tuple[tuple, int]]:
        """Chunks [(spec, n_valid)] for a prompt of n tokens at position 0, using compiled executables only.

        The prompt's own bucket is used when compiled; otherwise it is queued for a background compile
        (unless `background_compiles` is off) and the prompt goes through compiled ones (at worst the
        smallest bucket over the whole cache).
        """
        if n > self.max_seq_len:
            raise ValueError(f"prompt of {n} tokens exceeds max_seq_len {self.max_seq_len}")
        b = self.bucket_for(n)
        own = ("prefill", b, b) if b is not None else None
        if own is not None and self.compiled(own):
            return [(own, n)]
        if own is not None and self.background_compiles:
            self._get_async(own)
        with self._lock:
            avail = [s for s in self._execs if s[0] == "prefill"]
        plan, s = [], 0
        while s < n:
            r = n - s
            fits = [sp for sp in avail if s + sp[1] <= sp[2]]  # the chunk's rows lie inside attended rows
            done = [sp for sp in fits if sp[1] >= r]
            sp = min(done, key=lambda x: (x[1], x[2])) if done else max(fits, key=lambda x: (x[1], -x[2]))
            k = min(sp[1], r)
            plan.append((sp, k))
            s += k
        return plan

    def decode_spec(self, pos: int, do_sample: bool) -> tuple:
        kvb = next(k for k in self.decode_kv_buckets if k > pos)
        return ("decode", kvb, do_sample)

    # ---- execution ----------------------------------------------------------------------------
    def prefill(self, state: DecodeState, tokens: Sequence[int], request: tuple | None = None
                ) -> tuple[DecodeState, jax.Array]:
        """Write `tokens` into `state` from its position and return (state, next token). With `request`
        = (seed, temperature, top_k, top_p) a new request starts at position 0 with that key and those
        sampling parameters (the state's cache buffers are reused, stale rows masked then overwritten):
        no separate `reset_state` call."""
        n = len(tokens)
        toks = np.asarray(tokens, np.int32)
        nxt = None
        s = 0
        plan = self.plan_prefill(n)
        self.last_prefill_chunks = len(plan)
        for spec, k in plan:
            state, nxt = self._get(spec)(self.params, state, pack_request(toks[s:s + k], spec[1], request))
            request = None
            s += k
        return state, nxt

    def decode(self, state: DecodeState, spec: tuple) -> tuple[DecodeState, jax.Array]:
        return self._get(spec)(self.params, state)

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """[n, V] float32 logits of `tokens` from position 0, through one executable per prefill bucket
        (compiled, counted and cached like the others; padded rows come after the real ones and are dropped)."""
        n = len(tokens)
        if n < 1:
            raise ValueError("token_ids is empty")
        T = self.bucket_for(n) or n
        buf = np.zeros((T,), np.int32)
        buf[:n] = np.asarray(tokens, np.int32)
        return np.asarray(self._get(("logits", T))(self.params, buf))[:n]

    def stats(self) -> dict:
        with self._lock:
            return {
                "compiles": self.stats_.compiles,
                "compile_seconds": round(self.stats_.compile_seconds, 3),
                "cache_hits": self.exec_cache.hits if self.exec_cache else 0,
                "cache_misses": self.exec_cache.misses if self.exec_cache else 0,
                "cache_rejected": self.exec_cache.rejected if self.exec_cache else 0,
                "cache_enabled": bool(self.exec_cache is not None and self.exec_cache.enabled),
                "cache_disabled_reason": self.exec_cache.disabled_reason if self.exec_cache else "use_disk_cache=False",
                "buckets_compiled": sorted(s[1] for s in self._execs if s[0] == "prefill" and s[1] == s[2]),
                "decode_steps_compiled": sorted([list(s[1:]) for s in self._execs if s[0] == "decode"]),
                "logits_lengths_compiled": sorted(s[1] for s in self._execs if s[0] == "logits"),
                "background_compiles_running": len(self._pending),
                "background_compiles_started": self.stats_.background_compiles_started,
                "prefill_buckets": list(self.buckets),
                "cache_len": self.cache_len,
                "gemv": self.gemv,
                "decode_attention": self.attn,
                "prefill_gemm": self.gemm,
                "prefill_wo": self.wo,
                "prefill_matmuls": self.matmuls,
                # the buckets compiled with cuBLAS's heuristics (GPU flags: other backends ignore them)
                "prefill_cublas_buckets": [b for b in self.buckets if self._matmuls(("prefill", b, b)) == "cublas"],
                "prefill_attention": self.fused,
                "prefill_attention_buckets": [b for b in self.buckets if self._fused(("prefill", b, b))],
                "token_memory": self.token_memory,
            }

    def close(self):
        self._pool.shutdown(wait=True, cancel_futures=True)


def _explicit_mode(mode: str | None, name: str, mesh) -> str | None:
    """A decode-kernel mode the caller named: "xla"/None (XLA's fusions), "pallas" or "interpret"."""
    if mode in ("xla", None):
        return None
    if mode not in model.GEMV_MODES:
        raise ValueError(f"{name} must be 'auto', 'xla', 'pallas' or 'interpret', got {mode!r}")
    if mesh is not None:
        raise ValueError(f"the Pallas {name} kernels run on one device; use {name}='xla' with tensor_parallel > 1")
    return mode


def _env_mode(var: str) -> str:
    """An ablation switch from the environment: "" (unset or auto), "xla" or "pallas"."""
    env = os.environ.get(var, "").strip().lower()
    if env not in ("", "auto", "xla", "pallas"):
        raise ValueError(f"{var} must be xla or pallas, got {env!r}")
    return "" if env == "auto" else env


def resolve_gemv(gemv: str | None, devices, mesh) -> str | None:
    """The decode step's matrix-vector kernels: "auto" takes the Pallas kernels (gemv.py) on one GPU and
    XLA's fusions elsewhere (CPU; a mesh, which the SPMD partitioner cannot split a custom call over).
    The environment variable HYBRID_JAX_GEMV (xla | pallas) overrides "auto", for ablations."""
    if gemv != "auto":
        return _explicit_mode(gemv, "gemv", mesh)
    env = os.environ.get("HYBRID_JAX_GEMV", "").strip().lower()
    if env in ("xla", "off", "none"):
        return None
    if env not in ("", "auto", "pallas"):
        raise ValueError(f"HYBRID_JAX_GEMV must be xla or pallas, got {env!r}")
    if mesh is not None:
        return None
    return "pallas" if env == "pallas" or all(d.platform in ("gpu", "cuda") for d in devices) else None


def resolve_attention(mode: str | None, gemv: str | None, mesh) -> str | None:
    """The decode step's attention (rope, cache write and attention over the filled rows in one kernel,
    decode_attention.py). "auto" runs it where the matrix-vector kernels run (one GPU): on an H200 it made
    the 7B step faster at every context measured (docs/ENGINEERING_LOG.md, session 3). The environment
    variable HYBRID_JAX_DECODE_ATTN=xla (or pallas) overrides "auto", for ablations."""
    if mode != "auto":
        return _explicit_mode(mode, "decode_attention", mesh)
    return None if _env_mode("HYBRID_JAX_DECODE_ATTN") == "xla" else gemv


def resolve_prefill_gemm(mode: str | None, gemv: str | None, mesh) -> str | None:
    """The prefill's projections for chunks of up to gemv.ROWS_MAX tokens through `gemv.gemm` (norms
    inside). "auto" keeps XLA's matmuls: on an H200 the kernel was no faster than XLA's for the 7B's
    matrices at 16-128 rows, and the prefill slower (docs/ENGINEERING_LOG.md, run 19). The environment
    variable HYBRID_JAX_PREFILL_GEMM=pallas turns it on where the decode kernels run, for ablations."""
    if mode != "auto":
        return _explicit_mode(mode, "prefill_gemm", mesh)
    return gemv if _env_mode("HYBRID_JAX_PREFILL_GEMM") == "pallas" else None


def resolve_prefill_wo(mode: str | None, gemv: str | None, mesh) -> str | None:
    """The prefill's output projection alone through `gemv.gemm` for chunks of up to gemv.ROWS_MAX tokens
    (model.trunk's `wo`; longer chunks and the other projections keep XLA's matmuls unless `prefill_gemm`
    says otherwise). "auto" takes it where the decode kernels run (one GPU): there XLA runs this product
    through cuBLAS at 16-128 rows and first copies the layer's slice of the stacked wo, 32 MB a layer for the
    7B (run 32, docs/ENGINEERING_LOG.md). The environment variable HYBRID_JAX_PREFILL_WO=xla turns it off,
    for ablations."""
    if mode != "auto":
        return _explicit_mode(mode, "prefill_wo", mesh)
    return None if _env_mode("HYBRID_JAX_PREFILL_WO") == "xla" else gemv


# How XLA compiles the prefill's matmuls (compile options of the prefill executables only; the decode step's
# products are Pallas kernels on one GPU). "autotune": XLA's default, which times Triton GEMM configurations
# and cuBLAS algorithms on the GPU while it compiles (a 7B bucket: 30-36 s, and the decode steps beside it run
# ~25% slower; runs 48-49). "cublas": every matmul through cuBLAS's own heuristics, nothing timed. Run 51 (H200,
# 7B, one process, docs/ENGINEERING_LOG.md session 9), device time back to back, autotuned -> cuBLAS: 16 rows
# 4.50 -> 4.58 ms, 128 rows 5.6 -> 5.2-5.5, 256 rows 8.6 -> 6.8, 512 rows 14.0 -> 11.9 (H100 alike, run 54); TTFT
# at 16 and 128 rows was 0.7-4 ms worse with cuBLAS (host time), at 256 and 512 rows 0.5-1.9 ms better; compiles
# 26-38 s -> 3-4 s.
# The cuBLAS path costs the host 2.5-4 ms a call (XLA re-records the captured cuBLAS calls when it updates the
# graph: run 55), which only a long prefill hides: the real SmolLM2's 512-row bucket through cuBLAS gave TTFT
# 7.09 ms against 4.42 autotuned (runs 58 and 43, two machines). "split" (the default): cuBLAS for buckets of
# at least CUBLAS_MIN_ROWS rows whose matmuls are at least CUBLAS_MIN_FLOPS (2 x parameters x rows: the 7B's
# 256 rows are 3.4e12, ~5 ms at the matrix rate; its 128 rows, 1.7e12, stay autotuned; SmolLM2 never takes
# it), autotuned otherwise; one GPU only (with a mesh it autotunes: unmeasured there). The options are GPU
# compiler flags that other backends ignore.
PREFILL_MATMULS = {"autotune": None,
                   "cublas": {"xla_gpu_autotune_level": 0, "xla_gpu_enable_triton_gemm": False}}
PREFILL_MATMUL_MODES = ("split",) + tuple(PREFILL_MATMULS)
CUBLAS_MIN_ROWS = 256
CUBLAS_MIN_FLOPS = 3e12


def resolve_prefill_matmuls(mode: str) -> str:
    """`prefill_matmuls`: "split", "autotune" or "cublas" (PREFILL_MATMULS); "auto" reads the environment
    variable HYBRID_JAX_PREFILL_MATMULS (unset: "split")."""
    if mode == "auto":
        mode = os.environ.get("HYBRID_JAX_PREFILL_MATMULS", "").strip().lower() or "split"
        where = "HYBRID_JAX_PREFILL_MATMULS"
    else:
        where = "prefill_matmuls"
    if mode not in PREFILL_MATMUL_MODES:
        raise ValueError(f"{where} must be one of {', '.join(PREFILL_MATMUL_MODES)} (or 'auto'), got {mode!r}")
    return mode


def prefill_matmuls_for(mode: str, rows: int, n_params: int, mesh) -> str:
    """The PREFILL_MATMULS entry a prefill executable of `rows` rows of a model of `n_params` parameters is
    compiled with under `mode`."""
    if mode == "split":
        big = rows >= CUBLAS_MIN_ROWS and 2 * n_params * rows >= CUBLAS_MIN_FLOPS
        return "cublas" if big and mesh is None else "autotune"
    return mode


def resolve_prefill_attention(mode: str | None, cfg: LlamaConfig, devices, mesh) -> str | None:
    """The attention of a prompt's own bucket (model.fused_attention). "auto" takes cuDNN's fused flash
    attention on one GPU where cuDNN supports the model (bfloat16 or float16, head dim a multiple of 8 up to
    128), XLA's unfused attention elsewhere. "cudnn" and "xla" (jax.nn.dot_product_attention through XLA, for
    tests) force one; None (or the environment variable HYBRID_JAX_PREFILL_ATTN=off, for ablations) keeps
    model.attention. Under "auto" only buckets of at least FUSED_MIN_ROWS rows take it (fused_min_rows)."""
    if mode != "auto":
        if mode not in model.FUSED_ATTENTION:
            raise ValueError(f"prefill_attention must be 'auto', 'cudnn', 'xla' or None, got {mode!r}")
        if mode == "cudnn" and mesh is not None:
            raise ValueError("prefill_attention='cudnn' runs on one device; use None with tensor_parallel > 1")
        return mode
    env = _prefill_attn_env()
    if env == "off" or mesh is not None or not all(d.platform in ("gpu", "cuda") for d in devices):
        return None
    ok = cfg.dtype in ("bfloat16", "float16") and cfg.hd % 8 == 0 and cfg.hd <= 128
    return "cudnn" if ok else None


def _prefill_attn_env() -> str:
    env = os.environ.get("HYBRID_JAX_PREFILL_ATTN", "").strip().lower()
    if env not in ("", "auto", "off", "all"):
        raise ValueError(f"HYBRID_JAX_PREFILL_ATTN must be off, all or auto, got {env!r}")
    return env


# The smallest bucket whose prompt attention "auto" runs through cuDNN's fused kernel; below it XLA's attention
# (model.attention). At 16-64 rows the 7B's prefill ran 0.08-0.18 ms faster on the device with XLA's (run 81,
# H200: 4.353 / 4.608 / 4.931 against 4.533 / 4.765 / 5.053 ms back to back at 16 / 32 / 64 rows; run 76: 4.38
# against 4.55 at 16) and ~0.05 ms slower at 128 (5.747 against 5.704); SmolLM2's shape alike (16 rows 1.063
# against 1.149, 128 rows 1.525 against 1.448). docs/ENGINEERING_LOG.md, session 13.
FUSED_MIN_ROWS = 128


def fused_min_rows(mode: str | None) -> int:
    """The smallest bucket that takes `prefill_attention`'s fused attention: FUSED_MIN_ROWS under "auto" (the
    environment variable HYBRID_JAX_PREFILL_ATTN=all takes it at every bucket, for ablations), every bucket
    when the caller names the kernel."""
    if mode != "auto":
        return 0
    return 0 if _prefill_attn_env() == "all" else FUSED_MIN_ROWS


def resolve_token_memory(mode: str | None, devices, mesh) -> str | None:
    """The memory kind the decode and prefill executables write the next token to (their one output that is
    not the donated state): "auto" takes "pinned_host" on one device that has it, None (the device's own
    memory) with a mesh or elsewhere. The environment variable HYBRID_JAX_TOKEN_MEMORY=device turns it off,
    for ablations.

    Why: a new device buffer for the token at every call is the one allocation of the step whose address
    changes, and XLA's buffer assignment reuses that allocation for small temporaries earlier in the step
    (the norms' rsqrt scalars, the argmax's partial results). Each call then re-points every CUDA-graph node
    that touches them before the graph launches: ~130 nodes of the 7B decode step, 0.7 ms of host time
    (runs 76-77, docs/ENGINEERING_LOG.md session 12). In host memory the token shares nothing with the
    step's temporaries, and the host reads it without a device-to-host copy."""
    if mode not in ("auto", "pinned_host", None, "device"):
        raise ValueError(f"token_memory must be 'auto', 'pinned_host' or None, got {mode!r}")
    if mode != "auto":
        if mode == "pinned_host" and mesh is not None:
            raise ValueError("token_memory='pinned_host' runs on one device; use None with tensor_parallel > 1")
        return None if mode == "device" else mode
    env = os.environ.get("HYBRID_JAX_TOKEN_MEMORY", "").strip().lower()
    if env not in ("", "auto", "device", "pinned_host"):
        raise ValueError(f"HYBRID_JAX_TOKEN_MEMORY must be device or pinned_host, got {env!r}")
    if env == "device" or mesh is not None or len(devices) != 1:
        return None
    kinds = {m.kind for m in devices[0].addressable_memories()}
    return "pinned_host" if "pinned_host" in kinds else None


def _sampling_scalars(temperature, top_k, top_p) -> tuple[np.float32, np.int32, np.float32]:
    """The state's sampling parameters (sampling.SamplingParams' conventions: top_k 0 and top_p 1 mean none)."""
    return np.float32(temperature), np.int32(top_k or 0), np.float32(1.0 if top_p is None else top_p)


def _key_data(seed: int) -> np.ndarray:
    """The raw uint32[2] threefry key for `seed`, made on the host (no device computation, no compile)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return np.array([seed >> 32, seed & 0xFFFFFFFF], dtype=np.uint32)
