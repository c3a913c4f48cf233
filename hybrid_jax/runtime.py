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
import sys
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
from . import kv_cache, model, qgemv, quant, sampling, sharding, speculative
from . import options as options_lib
from . import weights as W
from .config import LlamaConfig
from .exec_cache import ExecCache, environment_key
from .kv_cache import KVCache
from .options import FUSED_MIN_ROWS, KernelOptions  # noqa: F401 (FUSED_MIN_ROWS: named in bench/README.md)
from .sampling import SamplingParams

log = logging.getLogger(__name__)


@struct.dataclass
class DecodeState:
    cache: KVCache
    pos: jax.Array  # [] int32: position where `token` goes next (= tokens in the cache)
    token: jax.Array  # [] int32: the last token produced, fed to the next step
    key: jax.Array  # [2] uint32: PRNG key
    sp: SamplingParams
    hist: jax.Array  # [S] int32: the tokens at positions 0 .. pos-1 (speculative.ngram_propose reads it)


def default_buckets(max_seq_len: int, smallest: int = 16) -> tuple[int, ...]:
    out, b = [], smallest
    while b < max_seq_len:
        out.append(b)
        b *= 2
    out.append(max_seq_len)
    return tuple(out)


# Every module whose code the compiled steps trace (tests/test_runtime.py checks the package's imports against it).
TRACED_MODULES = (model, kv_cache, quant, qgemv, sampling, speculative, W, gemv_lib, attn_lib, options_lib, sharding)


def _source_digest() -> str:
    """Changes to the traced code invalidate cached executables."""
    h = hashlib.sha256()
    for mod in TRACED_MODULES:
        h.update(inspect.getsource(mod).encode())
    h.update(inspect.getsource(_decode_step).encode())
    h.update(inspect.getsource(_verify).encode())
    h.update(inspect.getsource(_verify_step).encode())
    h.update(inspect.getsource(_draft_step).encode())
    h.update(inspect.getsource(_prefill_step).encode())
    h.update(inspect.getsource(pack_request).encode())
    h.update(inspect.getsource(_logits_fn).encode())
    return h.hexdigest()[:16]


# ---- the traced functions ---------------------------------------------------------------------------

def _decode_step(cfg: LlamaConfig, kv_len: int, do_sample: bool, params: W.Weights, state: DecodeState,
                 opts: KernelOptions | None = None):
    logits, cache = model.forward(cfg, params, state.cache, state.token[None], state.pos[None], kv_len, opts)
    key, sub = jax.random.split(state.key)
    nxt = sampling.sample(logits[0], sub, state.sp) if do_sample else sampling.greedy(logits[0])
    hist = jax.lax.dynamic_update_slice(state.hist, state.token[None], (state.pos,))
    return state.replace(cache=cache, pos=state.pos + 1, token=nxt, key=key, hist=hist), nxt


def _verify(cfg: LlamaConfig, kv_len: int, do_sample: bool, params: W.Weights, state: DecodeState,
            proposals: jax.Array, opts: KernelOptions | None, draft_logits: jax.Array | None = None):
    """The last token and K proposals as one K+1-row forward, accepted on the device (speculative.py; against
    the draft's distributions `draft_logits` [K, V] when a draft model proposed them). Returns the state advanced
    by the n emitted tokens (cache rows past them are scratch) and int32 [K + 2] = [n, the K + 1 candidates], of
    which the first n are emitted. Rows pos .. pos + K must lie inside the cache."""
    k = proposals.shape[0]
    tokens = jnp.concatenate([state.token[None], proposals])
    positions = state.pos + jnp.arange(k + 1, dtype=jnp.int32)
    logits, cache = model.forward(cfg, params, state.cache, tokens, positions, kv_len, opts)
    key, sub = jax.random.split(state.key)
    if not do_sample:
        out, n = speculative.accept_greedy(logits, proposals)
    elif draft_logits is None:
        out, n = speculative.accept_sample(logits, proposals, sub, state.sp)
    else:
        out, n = speculative.accept_draft_sample(logits, draft_logits, proposals, sub, state.sp)
    hist = jax.lax.dynamic_update_slice(state.hist, tokens, (state.pos,))
    state = state.replace(cache=cache, pos=state.pos + n, token=out[n - 1], key=key, hist=hist)
    return state, jnp.concatenate([n[None], out])


def _verify_step(cfg: LlamaConfig, kv_len: int, k: int, do_sample: bool, params: W.Weights, state: DecodeState,
                 opts: KernelOptions | None = None):
    """One prompt-lookup iteration: K proposals made from the token history (with the last token in it), then
    `_verify`."""
    hist = jax.lax.dynamic_update_slice(state.hist, state.token[None], (state.pos,))
    proposals = speculative.ngram_propose(hist, state.pos + 1, k)
    return _verify(cfg, kv_len, do_sample, params, state, proposals, opts)


def _draft_step(cfg: LlamaConfig, dcfg: LlamaConfig, kv_len: int, k: int, do_sample: bool, params: W.Weights,
                dparams: W.Weights, state: DecodeState, dstate: DecodeState, opts: KernelOptions | None = None,
                dopts: KernelOptions | None = None):
    """One draft-model iteration: the draft (dcfg, dparams, dstate) proposes K tokens with K + 1 of its own
    one-token steps from the target's position and last token (the last step writes the K-th proposal's row,
    needed when all K are accepted), then `_verify`, accepting against the draft's distributions when sampling.
    Both states come back at the target's new position; the draft's cache rows up to it hold the accepted
    tokens (proposals it fed itself). Returns (state, dstate, [n, K + 1 candidates])."""
    def body(i, carry):
        ds, toks, qlog = carry
        logits, cache = model.forward(dcfg, dparams, ds.cache, ds.token[None], ds.pos[None], kv_len, dopts)
        key, sub = jax.random.split(ds.key)
        nxt = sampling.sample(logits[0], sub, ds.sp) if do_sample else sampling.greedy(logits[0])
        ds = ds.replace(cache=cache, pos=ds.pos + 1, token=nxt, key=key)
        return ds, toks.at[i].set(nxt), qlog.at[i].set(logits[0].astype(jnp.float32))

    ds = dstate.replace(pos=state.pos, token=state.token, sp=state.sp)
    toks = jnp.zeros((k + 1,), jnp.int32)
    qlog = jnp.zeros((k + 1, dcfg.vocab_size), jnp.float32)
    ds, toks, qlog = jax.lax.fori_loop(0, k + 1, body, (ds, toks, qlog))
    state, out = _verify(cfg, kv_len, do_sample, params, state, toks[:k], opts, draft_logits=qlog[:k])
    return state, ds.replace(pos=state.pos, token=state.token), out


# The prefill's one host->device argument: int32 [T + REQ_FIELDS] = the chunk's T token slots, then
# n (valid tokens), fresh (1 + p: a new request at position p, with the key and sampling parameters below, whose
# cache rows 0..p-1 are kept from the previous one: KV reuse; 0: continue `state`), the PRNG key's 2 words, temperature (float32 bits), top_k, top_p (float32 bits), unused.
# One transfer per chunk, and no separate state reset before a request (see docs/performance.md).
REQ_FIELDS = 8


def pack_request(tokens: np.ndarray, T: int, request: tuple | None, start: int = 0) -> np.ndarray:
    """The prefill argument for `tokens` (<= T) and, for a new request, (seed, temperature, top_k, top_p), its
    tokens written from position `start` (the rows before it kept)."""
    buf = np.zeros((T + REQ_FIELDS,), np.int32)
    buf[:len(tokens)] = tokens
    buf[T] = len(tokens)
    if request is not None:
        seed, *sp = request
        t, k, p = _sampling_scalars(*sp)
        buf[T + 1] = 1 + start
        buf[T + 2:T + 4] = _key_data(seed).view(np.int32)
        buf[T + 4:T + 7] = t.view(np.int32), k, p.view(np.int32)
    return buf


def _prefill_step(cfg: LlamaConfig, kv_len: int, params: W.Weights, state: DecodeState, req: jax.Array,
                  opts: KernelOptions | None = None):
    """Write the chunk's n tokens at positions pos..pos+n-1 (rows up to pos+T-1 are scratch) and pick the
    next token; `req` as `pack_request` makes it (a fresh request starts at position 0 with its own key
    and sampling parameters, at the position it names). `opts`: the resolved kernel options (model.trunk)."""
    T = req.shape[0] - REQ_FIELDS
    tokens, meta = req[:T], req[T:]
    n, fresh = meta[0], meta[1] != 0
    f32 = lambda v: jax.lax.bitcast_convert_type(v, jnp.float32)
    state = state.replace(
        pos=jnp.where(fresh, meta[1] - 1, state.pos),
        key=jnp.where(fresh, jax.lax.bitcast_convert_type(meta[2:4], jnp.uint32), state.key),
        sp=SamplingParams(temperature=jnp.where(fresh, f32(meta[4]), state.sp.temperature),
                          top_k=jnp.where(fresh, meta[5], state.sp.top_k),
                          top_p=jnp.where(fresh, f32(meta[6]), state.sp.top_p)))
    positions = state.pos + jnp.arange(T, dtype=jnp.int32)
    state = state.replace(hist=jax.lax.dynamic_update_slice(state.hist, tokens, (state.pos,)))
    x, cache = model.trunk(cfg, params, state.cache, tokens, positions, kv_len, opts)
    last = jax.lax.dynamic_index_in_dim(x, n - 1, axis=0, keepdims=False)  # final norm on this row only
    logits = model.logits_from_hidden(cfg, params, last, opts, normed=False)
    key, sub = jax.random.split(state.key)
    nxt = sampling.sample(logits, sub, state.sp)
    return state.replace(cache=cache, pos=state.pos + n, token=nxt, key=key), nxt


def prefill_jit(cfg: LlamaConfig, kv_len: int, opts: KernelOptions | None = None, **jit_kw):
    """The prefill step of a chunk attending over `kv_len` cache rows, jitted with the state donated (what
    `Runtime` lowers and compiles for a prefill bucket)."""
    def prefill_step(p, s, req):
        return _prefill_step(cfg, kv_len, p, s, req, opts)
    return jax.jit(prefill_step, donate_argnums=(1,), **jit_kw)


def _logits_fn(cfg: LlamaConfig, params: W.Weights, tokens: jax.Array, opts: KernelOptions | None = None):
    cache = kv_cache.zeros(cfg, tokens.shape[0])
    logits, _ = model.forward(cfg, params, cache, tokens, jnp.arange(tokens.shape[0], dtype=jnp.int32), opts=opts)
    return logits


@dataclasses.dataclass
class Stats:
    compiles: int = 0  # executables compiled by this runtime (not loaded from disk)
    compile_seconds: float = 0.0
    background_compiles_started: int = 0  # compiles queued for later requests (not those waited for at load)
    compiled: list = dataclasses.field(default_factory=list)  # [(spec, seconds)] compiled here
    loaded: list = dataclasses.field(default_factory=list)  # specs loaded from the disk cache
    precompiled: int = 0  # of those, compiled by this process beside the model's conversion (precompile)


class Runtime:
    def __init__(self, cfg: LlamaConfig, params: W.Weights, max_seq_len: int,
                 prefill_buckets: Sequence[int] | None = None, cache_dir: str | Path | None = None,
                 use_disk_cache: bool = True, decode_kv_buckets: Sequence[int] | None = None,
                 compile_sampling: bool = True, mesh: jax.sharding.Mesh | None = None, compile_workers: int = 4,
                 options: KernelOptions | None = None, background_compiles: bool = True, speculative_k: int = 0,
                 draft: "Runtime | None" = None):
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
        # Every kernel choice, "auto" resolved once here (options.py); the library never reads the environment.
        self.options = options_lib.resolve(options, cfg, self._devices, mesh)
        self._abs_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), params)
        self._abs_state = self._abstract_state()
        self.state = self._fresh_state()
        # The static path: compiled now (concurrently). The smallest prefill bucket over the whole cache
        # serves any chunk.
        # With speculation (speculative_k = K proposals a step) its verify steps too: prompt lookup's, or with a
        # draft model (`draft`: its Runtime, of the same cache length) the draft-and-verify steps.
        self.speculative_k = int(speculative_k)
        self.draft = draft
        if draft is not None and (draft.cache_len != self.cache_len or draft.mesh is not None or mesh is not None):
            raise ValueError("a draft model needs one device and the target's cache length")
        verify = [(self.verify_kind, kvb, self.speculative_k, False) for kvb in self.decode_kv_buckets
                  if self.speculative_k and kvb >= self.speculative_k + 1]
        now = [("decode", kvb, False) for kvb in self.decode_kv_buckets] + [self.universal_spec] + verify
        for f in [self._get_async(s, background=False) for s in now]:
            if f is not None:
                f.result()
        if compile_sampling:
            for kvb in self.decode_kv_buckets:
                self._get_async(("decode", kvb, True))
            for s in verify:
                self._get_async(s[:3] + (True,))

    # ---- state -------------------------------------------------------------------------------
    def _small(self, shape, dtype) -> jax.ShapeDtypeStruct:
        kw = {"sharding": self._small_sharding} if self._small_sharding is not None else {}
        return jax.ShapeDtypeStruct(shape, dtype, **kw)

    def _abstract_state(self) -> DecodeState:
        i32, f32 = self._small((), jnp.int32), self._small((), jnp.float32)
        return DecodeState(cache=kv_cache.abstract(self.cfg, self.cache_len, self._cache_sharding), pos=i32, token=i32,
                           key=self._small((2,), jnp.uint32), sp=SamplingParams(f32, i32, f32),
                           hist=self._small((self.cache_len,), jnp.int32))

    def _fresh_state(self) -> DecodeState:
        return self.reset_state(kv_cache.zeros(self.cfg, self.cache_len, self._cache_sharding), seed=0)

    def ensure_state(self) -> bool:
        """Replace a state whose buffers were donated to a call that never returned its result (interrupted
        between the two): rows in the cache are scratch for the next request anyway. Returns whether it did."""
        if any(a.is_deleted() for a in jax.tree.leaves(self.state)):
            log.warning("the decode state was lost mid-step (interrupted?); starting from a fresh one")
            self.state = self._fresh_state()
            return True
        return False

    def reset_state(self, cache: KVCache, seed: int = 0, temperature=0.0, top_k=None, top_p=None) -> DecodeState:
        """A state at position 0 reusing `cache`'s buffers (stale rows are masked, then overwritten)."""
        small = jax.device_put((np.int32(0), np.int32(0), _key_data(seed),
                                *_sampling_scalars(temperature, top_k, top_p), np.zeros(self.cache_len, np.int32)),
                               self._small_sharding)  # one transfer call; replicated over the mesh if any
        pos, token, key, t, k, p, hist = small
        return DecodeState(cache=cache, pos=pos, token=token, key=key, sp=SamplingParams(t, k, p), hist=hist)

    # ---- compile / load --------------------------------------------------------------------------
    @property
    def universal_spec(self) -> tuple:
        """The prefill executable that serves any chunk: (smallest bucket, the whole cache), compiled at load."""
        return ("prefill", self.min_bucket, self.cache_len)

    def step_options(self, spec: tuple) -> KernelOptions:
        """The options the executable of `spec` is traced and compiled with: the runtime's, narrowed to what
        that step reads, so that executables that compute the same thing share one key. A prefill bucket:
        its fused attention (or "off" below `prefill_attention_min_rows` rows), its matmuls' compile mode
        (PREFILL_MATMULS, per bucket under "split") and its quantized products' path (`quant_prefill` up to
        qgemv.GEMM_ROWS_MAX rows (per scheme: model._project_quantized), XLA's above); a decode step: none of the prefill's choices; the logits
        executable: XLA's path."""
        o = self.options
        if spec[0] in ("prefill", "verify", "draft"):  # a verify step is a (K + 1)-row chunk over the cache
            T = spec[1] if spec[0] == "prefill" else spec[2] + 1
            return o.replace(prefill_attention=o.prefill_attention if T >= o.prefill_attention_min_rows else "off",
                             prefill_attention_min_rows=0,
                             prefill_matmuls=prefill_matmuls_for(o.prefill_matmuls, T, self.cfg.n_params, self.mesh),
                             quant_prefill=o.quant_prefill if T <= qgemv.GEMM_ROWS_MAX else "xla")
        if spec[0] == "decode":
            return o.replace(prefill_wo="xla", prefill_attention="off", prefill_attention_min_rows=0,
                             prefill_matmuls="autotune", quant_prefill="xla", chunk_attention="xla")
        return KernelOptions.xla(matmul_2d=o.matmul_2d)

    def cache_key(self, spec: tuple) -> dict:
        """The executable cache's key of `spec`: everything its compiled program depends on."""
        return {"spec": list(spec), "model": self.cfg.to_dict(), "cache_len": self.cache_len,
                "params": [str(a.sharding) for a in jax.tree.leaves(self._abs_params)],
                "mesh": sharding.describe(self.mesh),
                # everything the traced step reads besides the source (the digest in self._env) and the shapes
                "options": self.step_options(spec).to_dict(), "compiler_options": self.compiler_options(spec),
                "rows_max": gemv_lib.ROWS_MAX if spec[0] in ("prefill", "verify", "draft") else None,
                # a draft step's other model: its shapes, placement and one-token step options
                "draft": None if spec[0] != "draft" else {
                    "model": self.draft.cfg.to_dict(), "cache_len": self.draft.cache_len,
                    "params": [str(a.sharding) for a in jax.tree.leaves(self.draft._abs_params)],
                    "options": self.draft.step_options(("decode",) + tuple(spec[1:2]) + tuple(spec[3:])).to_dict()},
                **self._env}

    def compiler_options(self, spec: tuple) -> dict | None:
        """The XLA options `spec`'s executable is compiled with: the prefill's matmul options (PREFILL_MATMULS),
        and cpu_compile_options() on the CPU."""
        opts = PREFILL_MATMULS[self.step_options(spec).prefill_matmuls]  # None for "autotune" (and decode steps)
        if self._devices[0].platform == "cpu":
            opts = {**(opts or {}), **cpu_compile_options()} or None
        return opts

    def lower(self, spec: tuple):
        """jax's Lowered of `spec`'s step (abstract arguments: nothing runs); `executable` compiles it. Under a
        mesh it is traced with the mesh as the context mesh (model.trunk's shard_map path reads it)."""
        if self.mesh is None:
            return self._lower(spec)
        with jax.set_mesh(self.mesh):
            return self._lower(spec)

    def _lower(self, spec: tuple):
        cfg = self.cfg
        opts = self.step_options(spec)
        # With a mesh the returned state keeps the input state's shardings, so it feeds the next step as is.
        # On one device the next token is written to pinned host memory where token_memory says so.
        if self.mesh is not None:
            kw = {"out_shardings": (jax.tree.map(lambda a: a.sharding, self._abs_state), self._small_sharding)}
        elif opts.token_memory != "device":
            dev = self._devices[0]
            kw = {"out_shardings": (jax.sharding.SingleDeviceSharding(dev),
                                    jax.sharding.SingleDeviceSharding(dev, memory_kind=opts.token_memory))}
        else:
            kw = {}
        if spec[0] == "logits":
            def logits_all(p, t):
                return _logits_fn(cfg, p, t, opts)
            return jax.jit(logits_all).lower(self._abs_params, self._small((spec[1],), jnp.int32))
        if spec[0] == "decode":
            _, kvb, do_sample = spec
            def decode_step(p, s):
                return _decode_step(cfg, kvb, do_sample, p, s, opts)
            return jax.jit(decode_step, donate_argnums=(1,), **kw).lower(self._abs_params, self._abs_state)
        if spec[0] == "verify":
            _, kvb, k, do_sample = spec
            def verify_step(p, s):
                return _verify_step(cfg, kvb, k, do_sample, p, s, opts)
            return jax.jit(verify_step, donate_argnums=(1,), **kw).lower(self._abs_params, self._abs_state)
        if spec[0] == "draft":
            _, kvb, k, do_sample = spec
            d = self.draft
            dopts = d.step_options(("decode", kvb, do_sample))
            def draft_step(p, dp, s, ds):
                return _draft_step(cfg, d.cfg, kvb, k, do_sample, p, dp, s, ds, opts, dopts)
            if "out_shardings" in kw:
                kw = {"out_shardings": (kw["out_shardings"][0],) + kw["out_shardings"]}
            return jax.jit(draft_step, donate_argnums=(2, 3), **kw).lower(
                self._abs_params, d._abs_params, self._abs_state, d._abs_state)
        _, T, kvb = spec
        return prefill_jit(cfg, kvb, opts, **kw).lower(
            self._abs_params, self._abs_state, self._small((T + REQ_FIELDS,), jnp.int32))

    def _load(self, spec: tuple, key: dict):
        """`spec`'s executable from the disk cache (counted in stats), or None: no entry, or one not trusted."""
        ex = self.exec_cache.load(key, self._devices) if self.exec_cache is not None else None
        if ex is not None:
            with self._lock:
                self.stats_.loaded.append(spec)
        return ex

    def _build(self, spec: tuple):
        key = self.cache_key(spec)
        ex = self._load(spec, key)
        if ex is not None:
            return ex
        t0 = time.perf_counter()
        ex = self.lower(spec).compile(compiler_options=key["compiler_options"])  # what the key says
        dt = time.perf_counter() - t0
        with self._lock:
            self.stats_.compiles += 1
            self.stats_.compile_seconds += dt
            self.stats_.compiled.append((spec, dt))
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

    def executable(self, spec: tuple):
        """The compiled executable of `spec` (a step spec: ("decode", kv_len, do_sample), ("prefill", T, kv_len),
        ("logits", T)), compiling or loading it now if needed; `.as_text()` gives its optimised HLO."""
        return self._get(spec)

    def compile_async(self, spec: tuple) -> cf.Future | None:
        """Compile (or load) `spec`'s executable in the background: its future (the pending one if a compile is
        under way), None if it is already built."""
        return self._get_async(spec)

    def _get_async(self, spec: tuple, background: bool = True) -> cf.Future | None:
        with self._lock:
            if spec in self._execs or spec in self._pending:
                return self._pending.get(spec)
            fut = self._pool.submit(self._bg_build, spec)
            self._pending[spec] = fut
            self.stats_.background_compiles_started += background
        return fut

    def _load_from_disk(self, spec: tuple) -> bool:
        """Load `spec`'s executable where the disk cache holds an entry for it (a warmup's, or an earlier
        process'); never compiles. True when it is now in memory."""
        xc = self.exec_cache
        if xc is None or not xc.enabled:
            return False
        key = self.cache_key(spec)
        if not xc.path(key).is_file():  # (no entry: not counted as a cache miss)
            return False
        ex = self._load(spec, key)
        if ex is None:
            return False
        with self._lock:
            self._execs.setdefault(spec, ex)
        return True

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

    def reuse_specs(self) -> list[tuple]:
        """The prefill executables of a prompt's rest after reused cache rows: each bucket over the whole cache."""
        return [("prefill", b, self.cache_len) for b in self.buckets if b < self.cache_len]

    def warmup_specs(self, reuse: bool = False) -> list[tuple]:
        """What `warmup` compiles: every prefill bucket (prompt from position 0; with `reuse`, the rest of a prompt
        after reused rows too) and the sampling decode (and verify) steps."""
        specs = [("prefill", b, b) for b in self.buckets] + (self.reuse_specs() if reuse else []) + \
            [("decode", k, True) for k in self.decode_kv_buckets]
        if self.speculative_k:  # the sampling variants of the verify (or draft) steps
            specs += [(self.verify_kind, kvb, self.speculative_k, True) for kvb in self.decode_kv_buckets
                      if kvb >= self.speculative_k + 1]
        return specs

    def run_once(self) -> None:
        """Execute every step in memory (compiled or loaded; not the logits executables, which take no state) once
        on the state, whose rows are scratch afterwards (the caller owns the state). An executable's first
        execution instantiates its CUDA graph and builds what cuDNN compiles at run time (docs/performance.md):
        `Engine.warmup` takes that off the requests."""
        one = np.ones((1,), np.int32)
        with self._lock:
            specs = [s for s in self._execs if s[0] != "logits"]
        for spec in specs:
            st = self.reset_state(self.state.cache)
            if spec[0] == "prefill":
                st, out = self._get(spec)(self.params, st, pack_request(one, spec[1], (0, 0.0, None, None)))
            else:
                st, out = self.decode(st, spec)
            self.state = st
            jax.block_until_ready(out)

    def warmup(self, background: bool = False, progress: bool = False, reuse: bool = False) -> list[cf.Future]:
        """Compile (or load from the disk cache) every executable of `warmup_specs`; in the foreground with,
        where `progress`, a bar on a terminal or a line per executable."""
        specs = self.warmup_specs(reuse)
        if background:
            return [f for f in (self._get_async(s) for s in specs) if f is not None]
        from tqdm import tqdm

        tty = sys.stderr.isatty()
        bar = tqdm(specs, desc="executables", unit="exe", disable=not (progress and tty), file=sys.stderr)
        for i, s in enumerate(bar, 1):
            bar.set_postfix_str(f"{s[0]} {s[1]}")
            n, t0 = self.stats_.compiles, time.perf_counter()
            self._get(s)
            if progress and not tty:
                how = "compiled" if self.stats_.compiles > n else "ready (loaded or in memory)"
                print(f"executable {i}/{len(specs)} ({s[0]} {s[1]}): {how} in {time.perf_counter() - t0:.1f} s",
                      file=sys.stderr, flush=True)
        return []

    def wait_background(self, timeout: float | None = None) -> None:
        with self._lock:
            futs = list(self._pending.values())
        cf.wait(futs, timeout=timeout)

    # ---- planning -----------------------------------------------------------------------------
    def plan_prefill(self, n: int, start: int = 0) -> list[tuple[tuple, int]]:
        """Chunks [(spec, n_valid)] for n tokens written from position `start` (0: a whole prompt; more: the rest
        of a prompt whose first `start` tokens' rows are in the cache), using compiled executables only.

        The tokens' own bucket is used when in memory, or loaded from the disk cache when an entry is there
        (`hybrid-jax warmup` puts them there); otherwise it is queued for a background compile (unless
        `background_compiles` is off) and the prompt goes through compiled ones (at worst the smallest bucket
        over the whole cache). From a position past 0 the own bucket is the tokens' bucket over the whole cache
        (`reuse_specs`).
        """
        if start + n > self.max_seq_len:
            raise ValueError(f"prompt of {start + n} tokens exceeds max_seq_len {self.max_seq_len}")
        b = self.bucket_for(n)
        own = None
        if b is not None:
            kv = b if start == 0 else self.cache_len
            own = ("prefill", b, kv) if start + b <= kv else None
        if own is not None and self.compiled(own):
            return [(own, n)]
        with self._lock:
            pending = own in self._pending
        if own is not None and not pending and self._load_from_disk(own):
            return [(own, n)]
        if own is not None and self.background_compiles:
            self._get_async(own)
        with self._lock:
            avail = [s for s in self._execs if s[0] == "prefill"]
        plan, s = [], 0
        while s < n:
            r = n - s
            fits = [sp for sp in avail if start + s + sp[1] <= sp[2]]  # the chunk's rows lie inside attended rows
            done = [sp for sp in fits if sp[1] >= r]
            sp = min(done, key=lambda x: (x[1], x[2])) if done else max(fits, key=lambda x: (x[1], -x[2]))
            k = min(sp[1], r)
            plan.append((sp, k))
            s += k
        return plan

    def decode_spec(self, pos: int, do_sample: bool) -> tuple:
        kvb = next(k for k in self.decode_kv_buckets if k > pos)
        return ("decode", kvb, do_sample)

    def verify_spec(self, pos: int, k: int, do_sample: bool) -> tuple | None:
        """The verify (or draft) step writing rows pos .. pos + k, or None where they do not fit the cache."""
        kvb = next((b for b in self.decode_kv_buckets if b >= pos + k + 1), None)
        return None if kvb is None else (self.verify_kind, kvb, k, do_sample)

    @property
    def verify_kind(self) -> str:
        """The speculative step's spec name: "verify" (prompt lookup), or "draft" with a draft model."""
        return "verify" if self.draft is None else "draft"

    # ---- execution ----------------------------------------------------------------------------
    def prefill(self, state: DecodeState, tokens: Sequence[int], request: tuple | None = None, start: int = 0
                ) -> tuple[DecodeState, jax.Array]:
        """Write `tokens` into `state` from its position and return (state, next token). With `request`
        = (seed, temperature, top_k, top_p) a new request starts at position `start` with that key and those
        sampling parameters (the state's cache buffers are reused, stale rows masked then overwritten; rows
        before `start` are kept: the caller knows they hold this request's first tokens): no separate
        `reset_state` call."""
        if start and request is None:
            raise ValueError("start= begins a new request: it needs request=")
        n = len(tokens)
        toks = np.asarray(tokens, np.int32)
        nxt = None
        s = 0
        plan = self.plan_prefill(n, start)
        self.last_prefill_chunks = len(plan)
        for spec, k in plan:
            state, nxt = self._get(spec)(self.params, state, pack_request(toks[s:s + k], spec[1], request, start))
            request = None
            s += k
        return state, nxt

    def decode(self, state: DecodeState, spec: tuple) -> tuple[DecodeState, jax.Array]:
        """A decode step ("decode", ...: the next token) or a verify step ("verify", ...: [n, candidates]); a
        draft step ("draft", ...) advances the draft's state (self.draft.state) too."""
        if spec[0] == "draft":
            d = self.draft
            state, d.state, out = self._get(spec)(self.params, d.params, state, d.state)
            return state, out
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
        o = self.options
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
                # exactly what this process compiled (with seconds) and what it loaded from the disk cache
                "compiled": [[list(sp), round(dt, 3)] for sp, dt in self.stats_.compiled],
                "loaded_from_disk": [list(sp) for sp in self.stats_.loaded],
                "compiled_beside_conversion": self.stats_.precompiled,
                "prefill_buckets": list(self.buckets),
                "cache_len": self.cache_len,
                # the resolved kernel options (options.KernelOptions), then a few of them as the keys read before
                # them (None: XLA's path / the device's memory)
                "options": o.to_dict(),
                "gemv": _xla_none(o.gemv),
                "decode_attention": _xla_none(o.decode_attention),
                "prefill_wo": _xla_none(o.prefill_wo),
                "prefill_matmuls": o.prefill_matmuls,
                # the buckets compiled with cuBLAS's heuristics (GPU flags: other backends ignore them)
                "prefill_cublas_buckets": [b for b in self.buckets
                                           if self.step_options(("prefill", b, b)).prefill_matmuls == "cublas"],
                "prefill_attention": None if o.prefill_attention == "off" else o.prefill_attention,
                "prefill_attention_buckets": [b for b in self.buckets
                                              if self.step_options(("prefill", b, b)).prefill_attention != "off"],
                "token_memory": None if o.token_memory == "device" else o.token_memory,
            }

    def close(self):
        self._pool.shutdown(wait=True, cancel_futures=True)


def precompile(cfg: LlamaConfig, max_seq_len: int, **runtime_kw) -> int:
    """Compile into the disk cache the executables a Runtime of these arguments compiles at load, from the
    model's shapes alone: run beside the conversion of its weights, it lets the load that follows find them
    there. Returns how many it compiled (0 when the disk cache is off, or they are there already)."""
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params = W.abstract(cfg, lambda name, shape: one)
    rt = Runtime(cfg, params, max_seq_len, compile_sampling=False, background_compiles=False, **runtime_kw)
    rt.close()
    return rt.stats_.compiles


def _xla_none(mode: str) -> str | None:
    return None if mode == "xla" else mode


# How XLA compiles the prefill's matmuls (compile options of the prefill executables only), by
# KernelOptions.prefill_matmuls: "autotune" is XLA's default (it times Triton GEMM configurations and cuBLAS
# algorithms while it compiles); "cublas" takes cuBLAS's own heuristics for every matmul, nothing timed;
# "split" (the default) takes cuBLAS for buckets of at least CUBLAS_MIN_ROWS rows whose matmuls are at least
# CUBLAS_MIN_FLOPS (2 x parameters x rows), autotuned otherwise, on one GPU only. Why: see docs/performance.md,
# 'Defaults and why'. The options are GPU compiler flags that other backends ignore.
PREFILL_MATMULS = {"autotune": None,
                   "cublas": {"xla_gpu_autotune_level": 0, "xla_gpu_enable_triton_gemm": False}}
# XLA's default CPU scheduler (for concurrency) hoists work that needs no activations (each layer's weights
# sliced out of the stacked arrays for a matmul, or unpacked from their codes) ahead of the layers, all of it live
# at once: a 425 MB temp buffer in SmolLM2's float32 prefill, faulted in afresh on every call. With the
# memory-optimized one its TTFT is ~2x lower on a 2-core CPU, its decode step as fast (docs/performance.md).
CPU_COMPILE = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def cpu_compile_options() -> dict:
    """CPU_COMPILE, or nothing for a jax older than its option (0.9.1; the project allows older ones)."""
    return dict(CPU_COMPILE) if jax.__version_info__ >= (0, 9, 1) else {}


CUBLAS_MIN_ROWS = 256
CUBLAS_MIN_FLOPS = 3e12


def prefill_matmuls_for(mode: str, rows: int, n_params: int, mesh) -> str:
    """The PREFILL_MATMULS entry a prefill executable of `rows` rows of a model of `n_params` parameters is
    compiled with under `mode`."""
    if mode == "split":
        big = rows >= CUBLAS_MIN_ROWS and 2 * n_params * rows >= CUBLAS_MIN_FLOPS
        return "cublas" if big and mesh is None else "autotune"
    return mode


def _sampling_scalars(temperature, top_k, top_p) -> tuple[np.float32, np.int32, np.float32]:
    """The state's sampling parameters (sampling.SamplingParams' conventions: top_k 0 and top_p 1 mean none)."""
    return np.float32(temperature), np.int32(top_k or 0), np.float32(1.0 if top_p is None else top_p)


def _key_data(seed: int) -> np.ndarray:
    """The raw uint32[2] threefry key for `seed`, made on the host (no device computation, no compile)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return np.array([seed >> 32, seed & 0xFFFFFFFF], dtype=np.uint32)
