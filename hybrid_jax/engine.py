"""load(), generate(), streaming, stop conditions and timings.

The decode loop keeps the host off the critical path: it enqueues step n+1 before it reads token n, so
the device never waits for the host; stop conditions are therefore checked one step late and the token
computed past a stop is dropped.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import jax
import numpy as np

from . import checkpoint, sharding
from .config import LlamaConfig
from .runtime import Runtime
from .tokenizer import IncrementalDecoder, Tokenizer

log = logging.getLogger(__name__)

SAMPLING_ARGS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "stream", "raw", "ignore_eos",
                 "system", "stop_token_ids", "speculative")
SPECULATIVE = ("ngram", "draft")  # load(speculative=...): prompt lookup, or a draft model (speculative.py)
SPEC_BREAK_EVEN = {"cpu": 2.0, "gpu": 1.25}  # a verify step's cost in one-token steps where a cache is too short
# to time it in (H100, 7B shape: 1.22 at K = 4; docs/performance.md)
MAX_SPECULATIVE_TOKENS = 15  # K + 1 rows must fit the cache's slack past max_seq_len (at least 16 rows)
# K when none is given. Prompt lookup: 8, measured on the real SmolLM2 (H100, bench/results/
# 2026-12-07_NVIDIA-H100_speculative_smollm2: grounded 2.24x plain at 8 against 1.86x at 4, chat 1.04x at both).
# A draft: 4, since each proposal costs one of the draft's own steps.
DEFAULT_SPECULATIVE_TOKENS = {"ngram": 8, "draft": 4}


@dataclasses.dataclass
class Timings:
    ttft_s: float = 0.0  # prompt ids on the host -> first generated id on the host
    itl_s: list[float] = dataclasses.field(default_factory=list)  # each inter-token interval
    total_s: float = 0.0
    prefill_chunks: int = 0
    # speculative decoding: verify steps run, proposals they checked, proposals accepted. A verify step's
    # tokens arrive together; each gets an equal share of the interval before them in itl_s.
    verify_steps: int = 0
    proposed: int = 0
    accepted: int = 0
    reused_tokens: int = 0  # the prompt's first tokens whose cache rows an earlier request left (KV reuse)

    @property
    def tokens_per_s(self) -> float:
        n = 1 + len(self.itl_s)
        return n / self.total_s if self.total_s > 0 else 0.0

    @property
    def tpot_s(self) -> float:
        return float(np.median(self.itl_s)) if self.itl_s else 0.0


@dataclasses.dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, stop token or string), "length", "cancelled" (stream closed or taken over)
    prompt_token_ids: list[int]
    timings: Timings


@dataclasses.dataclass
class Piece:
    token_id: int
    text: str


class Engine:
    """A loaded model: the runtime (compiled executables, device state) plus the tokenizer.

    `tensor_parallel=N` (> 1) splits the model over the first N devices (see sharding.py); `params` are
    placed into their shards (a no-op for arrays restored into them).
    """

    def __init__(self, cfg: LlamaConfig, params, tokenizer: Tokenizer | None = None, max_seq_len: int | None = None,
                 path: str | None = None, tensor_parallel: int = 1, allow_long_context: bool = False,
                 speculative: str | None = None, num_speculative_tokens: int | None = None,
                 draft: tuple[LlamaConfig, object] | None = None, kv_reuse: bool = True, **runtime_kw):
        """`draft`: (config, weights) of the draft model, for speculative="draft". `kv_reuse`: a request whose
        token ids begin with those whose rows the cache holds (the previous request's prompt and answer: a
        chat's earlier turns) prefills only the rest (not with a draft model, whose cache is its own)."""
        num_speculative_tokens = speculative_tokens(speculative, num_speculative_tokens)
        if (speculative == "draft") != (draft is not None):
            raise ValueError('speculative="draft" needs a draft model (load(..., draft=DIR)), and a draft model '
                             'needs speculative="draft"')
        if draft is not None:
            check_draft(cfg, draft[0])
            if tensor_parallel != 1:
                raise ValueError('speculative="draft" runs on one device (tensor_parallel=1)')
        self.speculative = speculative
        self.num_speculative_tokens = int(num_speculative_tokens) if speculative else 0
        self.spec_totals = {"verify_steps": 0, "proposed": 0, "accepted": 0}
        self.kv_reuse = bool(kv_reuse) and draft is None
        self._kv_ids: list[int] = []  # the token ids whose rows the cache holds, from position 0
        self.reuse_totals = {"requests": 0, "reused_tokens": 0, "prefilled_tokens": 0}

        self.cfg = cfg
        self.path = path
        self.tokenizer = tokenizer
        self.max_seq_len = check_max_seq_len(max_seq_len, cfg, allow_long_context)
        if self.max_seq_len > cfg.max_position_embeddings:
            log.warning("max_seq_len %d exceeds the model's max_position_embeddings %d: quality past them is "
                        "untested", self.max_seq_len, cfg.max_position_embeddings)
        sharding.check(cfg, tensor_parallel)
        self.mesh = sharding.mesh(tensor_parallel) if tensor_parallel > 1 else None
        if self.mesh is not None:
            params = sharding.shard_params(params, cfg, self.mesh)
        self.draft_runtime = None
        if draft is not None:  # its prefill executables and state; its one-token steps run inside the draft step
            dkw = {k: v for k, v in runtime_kw.items() if k not in ("compile_sampling",)}
            self.draft_runtime = Runtime(draft[0], draft[1], self.max_seq_len, compile_sampling=False, **dkw)
        self.runtime = Runtime(cfg, params, self.max_seq_len, mesh=self.mesh,
                               speculative_k=self.num_speculative_tokens, draft=self.draft_runtime, **runtime_kw)
        # Enqueue the first decode step before reading the first token (True) or after (False).
        self.lookahead_first = True
        # Steps in flight while the host reads one: 2 enqueues step n+1 before reading step n; 1 reads each
        # token before enqueuing the next (the benchmarks' ablation of the pipelining, bench hybrid_nopipe).
        self.pipeline_depth = 2
        # Guards the runtime's device state. Held while a request uses it, never across a yield to user code
        # (re-entrant: a stream dropped inside a locked section releases its claim there).
        self._lock = threading.RLock()
        self._owner: object | None = None  # the request that owns the state between its pieces
        # tokens a verify step must yield to beat plain decode: its cost in one-token steps, timed now; below
        # it over a window of steps, a request decodes plainly for a while (_Adapt)
        self.spec_break_even = self.verify_cost() if self.speculative else 0.0

    def _claim(self, owner: object) -> list[int]:
        """Make `owner` the request that owns the device state (under `_lock`); a stream waiting between its
        pieces is thereby cancelled. A state lost mid-step (an interrupt between a donating call and its
        result's assignment) is replaced by a fresh one. Returns the ids whose rows the cache holds (none after
        a replacement); from now the claimant says which they are."""
        self._owner = owner
        held, self._kv_ids = self._kv_ids, []
        return [] if self.runtime.ensure_state() else held

    def _release(self, owner: object) -> None:
        with self._lock:
            if self._owner is owner:
                self._owner = None

    # -- helpers users call ---------------------------------------------------------------------
    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """[T, vocab] float32 logits of a sequence (scored from position 0)."""
        ids = _check_ids(token_ids, self.cfg)
        if len(ids) > self.max_seq_len:
            raise ValueError(f"sequence of {len(ids)} tokens exceeds max_seq_len {self.max_seq_len}")
        return self.runtime.logits(ids)  # (its own buffers: the request state is not touched)

    def warmup(self, background: bool = False, progress: bool = False, run: bool | None = None):
        """Compile every prefill bucket and the sampling decode step now (or load them from the disk cache).

        A bucket compiled while a request decodes slows that request's steps (XLA's autotuning shares the GPU:
        on an H200 a 7B bucket's compile took 36 s and the steps beside it averaged 4.7 ms instead of 3.8,
        run 48), so a latency-bound server warms up before it takes requests, or once per machine with
        `hybrid-jax warmup` (the executables then load from the disk cache). With KV reuse on, the buckets of a
        prompt's rest after reused rows are compiled too.

        `run` (default: on a GPU) then runs each executable once in the foreground (on the engine's state: no
        cached rows are reused after it), since a first execution on a GPU builds the step's CUDA graph and what
        cuDNN compiles at run time (up to ~0.1 s a step on an H100); the CPU has neither."""
        rt = self.runtime
        futures = rt.warmup(background=background, progress=progress, reuse=self.kv_reuse)
        if run is None:
            run = rt._devices[0].platform != "cpu"
        if run and not background:
            with self._lock:
                self._claim(object())
                rt.run_once()
        return futures

    def stats(self) -> dict:
        st = self.runtime.stats()
        if self.speculative:
            st["speculative"] = {"method": self.speculative, "num_speculative_tokens": self.num_speculative_tokens,
                                 **self.spec_totals}
        st["kv_reuse"] = {"enabled": self.kv_reuse, **self.reuse_totals}
        return st

    def wait_background(self, timeout: float | None = None) -> None:
        """Wait for background compiles (buckets queued by earlier prompts or warmup(background=True))."""
        self.runtime.wait_background(timeout)

    def encode(self, prompt: str | Sequence[int], raw: bool = False, system: str | None = None) -> list[int]:
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("prompt is empty")
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass the prompt as token ids")
            return self.tokenizer.encode(prompt, chat=not raw, system=system)
        return _check_ids(prompt, self.cfg)

    def pipelined_step_seconds(self, n_steps: int = 100, context: int = 1) -> float:
        """Device time per decode step with no host reads in between (a bound for streaming TPOT), after a
        prompt of `context` tokens (the steps attend over that many cached rows and more)."""
        if not 1 <= context <= self.max_seq_len - 3:
            raise ValueError(f"context must be in [1, {self.max_seq_len - 3}], got {context}")
        spec = self.runtime.decode_spec(min(context + n_steps, self.max_seq_len - 1), False)
        return self.step_seconds([spec], min(n_steps, self.max_seq_len - 2 - context), [1] * context)[0]

    def verify_cost(self) -> float:
        """A verify step's time over a decode step's, both queued back to back on this model and device (the
        cost a verify step's tokens must cover). Runs ~20 steps (3 + 3 on a CPU)."""
        rt, k = self.runtime, self.num_speculative_tokens
        n = 3 if jax.devices()[0].platform == "cpu" else 16
        context = 8
        top = context + (n + 1) * (k + 2)
        if top + 1 >= self.max_seq_len:
            return float(SPEC_BREAK_EVEN.get(jax.devices()[0].platform, 1.25))  # too short a cache to time in
        decode, verify = self.step_seconds([rt.decode_spec(top, False), rt.verify_spec(top, k, False)], n,
                                           [1] * context)
        return verify / decode

    def step_seconds(self, specs: Sequence[tuple], n: int, prompt: Sequence[int]) -> list[float]:
        """Seconds per step of each step spec (decode, verify or draft), n of each queued back to back (one
        untimed first) after `prompt` (token ids); the caller keeps every step inside the cache."""
        rt = self.runtime
        out = []
        with self._lock:
            self._claim(object())
            state, _ = rt.prefill(rt.reset_state(rt.state.cache), list(prompt))
            for spec in specs:
                state, r = rt.decode(state, spec)
                r.block_until_ready()
                t0 = time.perf_counter()
                for _ in range(n):
                    state, r = rt.decode(state, spec)
                r.block_until_ready()
                out.append((time.perf_counter() - t0) / n)
            rt.state = state
        return out

    def close(self):
        self.runtime.close()
        if self.draft_runtime is not None:
            self.draft_runtime.close()


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _check_ids(ids, cfg: LlamaConfig | None = None) -> list[int]:
    """Token ids as a list of ints: integers only (no bools, no floats), in [0, vocab) when `cfg` is given."""
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"token ids must be a 1-D array of integers, got shape {ids.shape} dtype {ids.dtype}")
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)):
        raise TypeError(f"prompt must be a string or a sequence of token ids, got {type(ids).__name__}")
    if not _all_ints(ids):
        raise TypeError(f"token ids must be integers, got {[t for t in ids if not _is_int(t)][:3]!r}")
    ids = list(map(int, ids))
    if not ids:
        raise ValueError("prompt is empty")
    if cfg is not None and (min(ids) < 0 or max(ids) >= cfg.vocab_size):
        out = [t for t in ids if not 0 <= t < cfg.vocab_size]
        raise ValueError(f"token ids out of range [0, {cfg.vocab_size}): {out[:5]}")
    return ids


def _all_ints(seq) -> bool:
    """Whether every element is an integer (`_is_int`); plain ints (a JSON body's) are checked by type in one
    pass, ~20x faster than `_is_int` each (a 500-token prompt: ~0.3 ms of a request's TTFT)."""
    return set(map(type, seq)) <= {int} or all(_is_int(t) for t in seq)


def check_max_seq_len_arg(max_seq_len) -> None:
    """`max_seq_len` as a caller may give it: None (the model's default) or an integer >= 2."""
    if max_seq_len is not None and (not _is_int(max_seq_len) or max_seq_len < 2):
        raise ValueError(f"max_seq_len must be an integer >= 2 (or None for the model's default), got {max_seq_len!r}")


def _check_load_args(max_seq_len, prefill_buckets, cache_dir, dtype, tensor_parallel, verify) -> None:
    """Checks of `load`'s arguments that need no model (before anything is read)."""
    from .config import DTYPES

    check_max_seq_len_arg(max_seq_len)
    if prefill_buckets is not None:
        if isinstance(prefill_buckets, (str, bytes)) or not hasattr(prefill_buckets, "__iter__"):
            raise TypeError(f"prefill_buckets must be a sequence of integers, got {prefill_buckets!r}")
        if not prefill_buckets or any(not _is_int(b) or b < 1 for b in prefill_buckets):
            raise ValueError(f"prefill_buckets must be positive integers, got {list(prefill_buckets)!r}")
    if cache_dir is not None and not isinstance(cache_dir, (str, Path)):
        raise TypeError(f"cache_dir must be a path, got {type(cache_dir).__name__}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (or None for the checkpoint's), got {dtype!r}")
    if not _is_int(tensor_parallel) or tensor_parallel < 1:
        raise ValueError(f"tensor_parallel must be an integer >= 1, got {tensor_parallel!r}")
    if not isinstance(verify, bool):
        raise TypeError(f"verify must be True or False, got {verify!r}")


def speculative_tokens(speculative, k) -> int:
    """K for `speculative` (checked), DEFAULT_SPECULATIVE_TOKENS's where `k` is None."""
    if speculative is not None and speculative not in SPECULATIVE:
        raise ValueError(f"speculative must be one of {', '.join(map(repr, SPECULATIVE))} or None, got {speculative!r}")
    if k is None:
        return DEFAULT_SPECULATIVE_TOKENS.get(speculative, DEFAULT_SPECULATIVE_TOKENS["ngram"])
    if not _is_int(k) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
        raise ValueError(f"num_speculative_tokens must be an integer in 1..{MAX_SPECULATIVE_TOKENS}, got {k!r}")
    return int(k)


def check_draft(cfg: LlamaConfig, dcfg: LlamaConfig, path=None, draft_path=None) -> None:
    """A draft model must share the target's vocabulary: the same size, and the same tokens where both
    folders hold a tokenizer.json."""
    if dcfg.vocab_size != cfg.vocab_size:
        raise ValueError(f"the draft model's vocabulary has {dcfg.vocab_size} tokens, the model's {cfg.vocab_size}: "
                         f"a draft must share the model's tokenizer")
    if path is not None and draft_path is not None:
        import json
        a, b = Path(path, "tokenizer.json"), Path(draft_path, "tokenizer.json")
        if a.is_file() and b.is_file():
            va, vb = (json.loads(f.read_text(encoding="utf-8")).get("model", {}).get("vocab") for f in (a, b))
            if va != vb:
                raise ValueError(f"the draft model {draft_path} has another vocabulary than {path} (their "
                                 f"tokenizer.json differ): a draft must share the model's tokenizer")


def check_max_seq_len(max_seq_len: int | None, cfg: LlamaConfig, allow_long_context: bool = False) -> int:
    """The cache length to serve: `max_seq_len`, or the model's positions capped at 2048. Beyond the model's
    max_position_embeddings RoPE runs on positions it was never trained on: refused unless `allow_long_context`."""
    check_max_seq_len_arg(max_seq_len)
    if max_seq_len is None:
        return min(cfg.max_position_embeddings, 2048)
    if max_seq_len > cfg.max_position_embeddings and not allow_long_context:
        raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings} (pass allow_long_context=True, or "
                         f"--allow-long-context, to run past the positions it was trained on)")
    return int(max_seq_len)


def load(path: str | Path | None = None, max_seq_len: int | None = None,
         prefill_buckets: Sequence[int] | None = None, cache_dir: str | Path | None = None, dtype: str | None = None,
         tensor_parallel: int = 1, verify: bool = False, allow_long_context: bool = False,
         speculative: str | None = None, num_speculative_tokens: int | None = None, draft: str | Path | None = None,
         kv_reuse: bool = True, **runtime_kw) -> Engine:
    """Load a converted checkpoint folder (see `python -m convert`) into a ready engine.

    `path=None` loads the embedded default model (SmolLM2-135M-Instruct, converted on first use). With
    `tensor_parallel=N` > 1 each weight is restored straight into its shards on N devices. Every file's size
    is checked against the checkpoint's manifest; `verify=True` also checks every file's sha256 first.
    `speculative="ngram"`: prompt-lookup speculative decoding, K = `num_speculative_tokens` proposals a step
    (default 8; 4 with a draft) (exact: greedy output is the output without it; sampled tokens keep the model's distribution);
    `speculative="draft", draft=DIR`: the proposals come from a smaller converted model of the same vocabulary.
    `kv_reuse=True`: a request that begins with the previous request's tokens (a chat's history) prefills only
    the rest (Engine).
    """
    _check_load_args(max_seq_len, prefill_buckets, cache_dir, dtype, tensor_parallel, verify)
    num_speculative_tokens = speculative_tokens(speculative, num_speculative_tokens)
    if (speculative == "draft") != (draft is not None):
        raise ValueError('speculative="draft" needs draft=DIR (a converted model of the same vocabulary), and '
                         'draft=DIR needs speculative="draft"')
    if path is None:
        path, precompiled = _default_model(max_seq_len, allow_long_context, prefill_buckets, cache_dir,
                                           precompile=dtype is None and tensor_parallel == 1, **runtime_kw)
    else:
        precompiled = 0
    cfg = checkpoint.load_config(path)
    max_seq_len = check_max_seq_len(max_seq_len, cfg, allow_long_context)
    target_dtype = dtype or cpu_dtype(cfg, path)  # the draft decides from the caller's `dtype`, for itself
    fn = None
    if tensor_parallel != 1:
        sharding.check(cfg, tensor_parallel)
        fn = sharding.sharding_fn(sharding.mesh(tensor_parallel))
    draft_model = None
    if draft is not None:
        draft_cfg = checkpoint.load_config(draft)
        check_draft(cfg, draft_cfg, path, draft)
        draft_model = checkpoint.restore(draft, dtype=dtype or cpu_dtype(draft_cfg, draft), verify=verify)
    cfg, params = checkpoint.restore(path, sharding_fn=fn, dtype=target_dtype, verify=verify)
    tok = Tokenizer(path, checkpoint.tokenizer_record(path)) if checkpoint.has_tokenizer(path) else None
    engine = Engine(cfg, params, tok, max_seq_len=max_seq_len, path=str(path), prefill_buckets=prefill_buckets,
                    cache_dir=cache_dir, tensor_parallel=tensor_parallel, allow_long_context=allow_long_context,
                    speculative=speculative, num_speculative_tokens=num_speculative_tokens, draft=draft_model,
                    kv_reuse=kv_reuse, **runtime_kw)
    engine.runtime.stats_.precompiled = precompiled
    return engine


def cpu_dtype(cfg: LlamaConfig, path) -> str | None:
    """"float32" for a bfloat16 / float16 checkpoint on the CPU where its float tensors fit in float32, else None
    (the stored dtype). XLA's CPU dots take no 16-bit operands: it converts every matrix, and the LM head, to
    float32 on every call (2-core CPU, SmolLM2 stored in bfloat16: decode 124-130 ms a token, 28 held in float32)."""
    if cfg.dtype == "float32" or jax.devices()[0].platform != "cpu":
        return None
    from . import weights as W

    sizes = jax.tree.leaves(W.shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    n = sum(math.prod(shape) for shape, f in zip(sizes, jax.tree.leaves(W.float_mask(cfg))) if f)
    need = n * (4 + cfg.dtype_bytes)  # the float32 copy beside the stored tensors while restoring
    avail = _available_memory()
    if avail is not None and need > avail / 2:
        log.info("%s: computed in %s on the CPU, ~3x slower than in float32 (XLA converts each matrix on every "
                 "call): its float32 copy (%.1f GB while restoring) does not fit in half of the %.1f GB available",
                 path, cfg.dtype, need / 1e9, avail / 1e9)
        return None
    log.info("%s: held in float32 on the CPU (stored as %s; XLA's CPU converts 16-bit matrices on every call); "
             "dtype=%r keeps it", path, cfg.dtype, cfg.dtype)
    return "float32"


def _available_memory() -> int | None:
    """Bytes of memory available now (Linux's MemAvailable; elsewhere half the physical memory), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (AttributeError, ValueError, OSError):
        return None


def _default_model(max_seq_len, allow_long_context, prefill_buckets, cache_dir, precompile,
                   **runtime_kw) -> tuple[Path, int]:
    """The default model's folder, converted if needed. A conversion first reads the model's shapes, which are
    all the executables depend on: they compile into the disk cache beside the rest of the conversion, and
    the load finds them there (the first answer on 2 cores came ~10 s sooner). Returns (folder, how many
    executables compiled beside the conversion)."""
    from . import runtime as runtime_lib
    from .default_model import ensure_default_model

    threads: list[threading.Thread] = []
    compiled: list[int] = []

    def compile_beside(cfg: LlamaConfig) -> None:
        kw = {k: v for k, v in runtime_kw.items() if k not in ("compile_sampling", "background_compiles")}
        msl = check_max_seq_len(max_seq_len, cfg, allow_long_context)

        def run():
            try:
                compiled.append(runtime_lib.precompile(cfg, msl, prefill_buckets=prefill_buckets,
                                                       cache_dir=cache_dir, **kw))
            except Exception as e:  # noqa: BLE001 - the load compiles what is missing, and says so
                log.warning("compiling beside the conversion failed (%s: %s); the load compiles instead",
                            type(e).__name__, e)

        threads.append(threading.Thread(target=run, name="hybrid_jax-precompile", daemon=True))
        threads[-1].start()

    try:
        path = ensure_default_model(on_config=compile_beside if precompile else None)
    finally:
        for t in threads:
            t.join()
    return path, sum(compiled)


_ENGINES: dict[str | None, Engine] = {}
_ENGINES_LOCK = threading.Lock()  # one load per path, however many threads ask at once


def _resolve(engine_or_path) -> Engine:
    if isinstance(engine_or_path, Engine):
        return engine_or_path
    if engine_or_path is not None and not isinstance(engine_or_path, (str, Path)):
        raise TypeError(f"generate() takes an Engine or a model folder path, got {type(engine_or_path).__name__}")
    key = None if engine_or_path is None else str(Path(engine_or_path).absolute())  # None: the default model
    with _ENGINES_LOCK:
        if key not in _ENGINES:
            _ENGINES[key] = load(engine_or_path)
        return _ENGINES[key]


def _check_request(prompt, max_new_tokens, temperature, top_k, top_p, seed, stop, stop_token_ids, flags: dict,
                   system) -> tuple[list[str], set[int]]:
    """Checks of generate()'s arguments that need no model; returns (stop strings, stop token ids)."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("prompt is empty")
    else:
        _check_ids(prompt)
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not _is_real(temperature):
        raise TypeError(f"temperature must be a number, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 or None: no limit), got {top_k!r}")
    if top_p is not None:
        if not _is_real(top_p):
            raise TypeError(f"top_p must be a number, got {top_p!r}")
        if not 0 < top_p <= 1:  # (NaN fails too)
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if seed is not None and not _is_int(seed):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise TypeError(f"stop must be a string or a list of strings, got {stop!r}")
    if any(not s for s in stops):
        raise ValueError("stop strings must be non-empty")
    if stop_token_ids is None:
        stop_ids = set()
    elif isinstance(stop_token_ids, (list, tuple, set, frozenset)) and all(_is_int(t) for t in stop_token_ids):
        stop_ids = {int(t) for t in stop_token_ids}
    else:
        raise TypeError(f"stop_token_ids must be a list of integers, got {stop_token_ids!r}")
    for name, v in flags.items():
        if not isinstance(v, (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False, got {v!r}")
    if system is not None and not isinstance(system, str):
        raise TypeError(f"system must be a string, got {type(system).__name__}")
    return stops, stop_ids


def _validate(engine: Engine, n_prompt: int, max_new_tokens: int):
    if n_prompt + max_new_tokens > engine.max_seq_len:
        raise ValueError(f"prompt ({n_prompt} tokens) plus max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_seq_len {engine.max_seq_len}")


@dataclasses.dataclass
class _Progress:
    """A request's output so far, written by its generator and read by its Stream (no reference back)."""
    prompt_ids: list[int]
    out: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    finish: str | None = None  # set when the request ends
    timings: Timings = dataclasses.field(default_factory=Timings)
    on_enqueued: Callable[[], None] | None = None  # Stream.when_enqueued's

    def result(self) -> GenerationResult:
        return GenerationResult(text=self.text, token_ids=list(self.out), finish_reason=self.finish or "cancelled",
                                prompt_token_ids=list(self.prompt_ids), timings=self.timings)


class Stream:
    """Iterate for `Piece`s as tokens arrive; `.result` holds the GenerationResult once the stream ends.

    A stream holds the engine only while it computes the next piece. Another request (from this thread or any
    other) cancels a stream that is waiting between pieces: that stream then ends with finish_reason
    "cancelled". `close()` (or leaving a `with` block, or dropping the stream) cancels it too.
    """

    def __init__(self, it: Iterator[Piece], progress: _Progress):
        self._it = it
        self._progress = progress
        self.result: GenerationResult | None = None

    def __iter__(self):
        return self

    def __next__(self) -> Piece:
        if self._it is None:
            raise StopIteration
        try:
            return next(self._it)
        except StopIteration:
            self._finish()
            raise

    def _finish(self):
        self._it = None
        self.result = self._progress.result()

    def when_enqueued(self, fn: Callable[[], None]) -> None:
        """Call fn() once, from the iterating thread, when the request's first steps are enqueued on the device and
        before it waits for the first token: while the device computes, the caller's other threads can work
        without delaying it (the server sends the response's headers then)."""
        self._progress.on_enqueued = fn

    def close(self) -> None:
        """Stop the request now (it ends with finish_reason "cancelled" unless it had already ended)."""
        if self._it is not None:
            self._it.close()
            self._finish()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass


def generate(engine_or_path=None, prompt: str | Sequence[int] | None = None, *, max_new_tokens: int = 128,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop: str | Sequence[str] | None = None, stop_token_ids: Sequence[int] | None = None,
             stream: bool = False, raw: bool = False, ignore_eos: bool = False, system: str | None = None,
             speculative: bool = True, **unknown):
    """Generate a continuation of `prompt` (text through the chat template unless raw=True, or token ids).

    `engine_or_path`: an Engine, a converted model folder (loaded once per process, thread-safe), or None for
    the embedded default model. Returns a GenerationResult, or with stream=True a `Stream` yielding
    `Piece(token_id, text)`. Every argument is checked before any model loads. `speculative=False` turns the
    engine's speculative decoding off for this request.
    """
    if unknown:
        raise ValueError(f"unknown generation argument(s): {sorted(unknown)} (known: {', '.join(SAMPLING_ARGS)})")
    if prompt is None:
        if isinstance(engine_or_path, str) and not Path(engine_or_path).exists():
            raise TypeError("generate() got no prompt: call generate(engine_or_path, prompt), or "
                            "generate(prompt=...) for the embedded default model")
        raise TypeError("prompt must be a string or a sequence of token ids, got None")
    stops, stop_ids = _check_request(prompt, max_new_tokens, temperature, top_k, top_p, seed, stop, stop_token_ids,
                                     dict(stream=stream, raw=raw, ignore_eos=ignore_eos, speculative=speculative),
                                     system)
    engine = _resolve(engine_or_path)
    ids = engine.encode(prompt, raw=raw, system=system)
    _validate(engine, len(ids), max_new_tokens)
    if not ignore_eos:
        stop_ids |= set(engine.cfg.eos_token_ids)
        if engine.tokenizer is not None and engine.tokenizer.eos_token_id is not None:
            stop_ids.add(int(engine.tokenizer.eos_token_id))
    if seed is None:
        seed = int(time.time_ns() % 2**31) if temperature > 0 else 0
    # top_k at or past the vocabulary keeps every token: the same as no limit, and it fits the state's int32
    top_k = min(int(top_k), engine.cfg.vocab_size) if top_k else None
    progress = _Progress(prompt_ids=list(ids))
    it = _run(engine, ids, progress, int(max_new_tokens), float(temperature), top_k,
              None if top_p is None else float(top_p), int(seed), stops, stop_ids,
              engine.num_speculative_tokens if speculative else 0)
    st = Stream(it, progress)
    if stream:
        return st
    with engine._lock:  # the whole request: no other request can cancel it between its pieces
        for _ in st:
            pass
    return st.result


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                best = max(best, k)
                break
    return best


class _Adapt:
    """Whether the next step speculates. A verify step pays off while its tokens (accepted proposals + 1)
    exceed its cost in one-token steps (`break_even`); after a window of verify steps below that, plain
    decode runs `pause` tokens before speculation is tried again."""
    WINDOW, PAUSE = 4, 128  # a window that loses costs ~(cost - 1) x WINDOW steps per PAUSE tokens

    def __init__(self, k: int, break_even: float):
        self.k, self.break_even = k, break_even
        self.recent: list[int] = []
        self.pause = 0

    def speculate(self) -> bool:
        return self.k > 0 and self.pause <= 0

    def saw_verify(self, n: int) -> None:
        self.recent.append(n)
        if len(self.recent) >= self.WINDOW:
            if sum(self.recent) / len(self.recent) < self.break_even:
                self.pause = self.PAUSE
            self.recent.clear()

    def saw_decode(self) -> None:
        self.pause -= 1


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """How many leading ids a and b share, at most `limit`."""
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _run(engine: Engine, ids: list[int], pr: _Progress, max_new: int, temperature, top_k, top_p, seed,
         stops: list[str], stop_ids: set[int], spec_k: int = 0) -> Iterator[Piece]:
    """The request's pieces. The engine's lock is held only while the device state is used, never across a
    yield; the request owns the state from its prefill until it ends or another request claims the engine.
    With spec_k > 0, verify steps (K proposals each) replace decode steps while they pay off (_Adapt)."""
    rt = engine.runtime
    do_sample = temperature > 0
    dec = IncrementalDecoder(engine.tokenizer) if engine.tokenizer is not None else None
    out, timings = pr.out, pr.timings
    emitted = 0
    longest_stop = max(map(len, stops), default=0)
    me = object()  # this request's claim on the engine
    pending: list = []  # [(result on the device, its width: 0 for a token, K + 1 for a verify step's [n, ...])]
    # a draft's cache would miss the rows of plain steps: a draft request speculates throughout
    adapt = _Adapt(spec_k, engine.spec_break_even if engine.draft_runtime is None else 0.0)
    try:
        with engine._lock:
            held = engine._claim(me)
            t0 = time.perf_counter()
            # KV reuse: the rows of the ids this request shares with the cache's stay; at least one is prefilled
            # (its logits pick the first token)
            p = _common_prefix(held, ids, len(ids) - 1) if engine.kv_reuse else 0
            # the request's position, key and sampling parameters travel with its first prefill chunk
            rt.state, tok = rt.prefill(rt.state, ids[p:], request=(seed, temperature, top_k, top_p), start=p)
            engine._kv_ids = list(ids)
            timings.prefill_chunks = rt.last_prefill_chunks
            timings.reused_tokens = p
            engine.reuse_totals["requests"] += 1
            engine.reuse_totals["reused_tokens"] += p
            engine.reuse_totals["prefilled_tokens"] += len(ids) - p
            if spec_k and engine.draft_runtime is not None:  # the draft's cache holds the prompt too
                d = engine.draft_runtime
                d.state, _ = d.prefill(d.state, ids, request=(seed, temperature, top_k, top_p))
        pending.append((tok, 0))
        pos = len(ids)  # position after every token read so far (the device's, once pending is empty)
        last = t0
        done = False
        while not done:
            with engine._lock:
                if engine._owner is not me:  # another request claimed the engine while this one waited
                    pending.clear()
                    pr.finish = "cancelled"
                    return
                # The first token is read before the next step is enqueued when that step's executable is
                # still compiling (a first sampled request), so that the compile does not delay it.
                upper = pos + sum(max(w, 1) for _, w in pending)  # the device's position at most
                ahead = out or (engine.lookahead_first and rt.compiled(rt.decode_spec(upper, do_sample)))
                depth = engine.pipeline_depth if ahead else 1
                # enqueue step n+1 before reading step n; each unread step yields at least one token
                while len(out) + len(pending) < max_new and len(pending) < depth:
                    upper = pos + sum(max(w, 1) for _, w in pending)
                    vspec = rt.verify_spec(upper, spec_k, do_sample) if adapt.speculate() else None
                    if vspec is not None and (out or rt.compiled(vspec)):
                        rt.state, res = rt.decode(rt.state, vspec)
                        pending.append((res, spec_k + 1))
                    else:
                        rt.state, nxt = rt.decode(rt.state, rt.decode_spec(upper, do_sample))
                        pending.append((nxt, 0))
            if not pending:
                break
            if pr.on_enqueued is not None:
                fn, pr.on_enqueued = pr.on_enqueued, None
                fn()
            res, width = pending.pop(0)
            if width:
                a = np.asarray(res)
                toks = [int(t) for t in a[1:1 + int(a[0])]]
                adapt.saw_verify(len(toks))
                timings.verify_steps += 1
                timings.proposed += spec_k
                timings.accepted += len(toks) - 1
            else:
                toks = [int(np.asarray(res))]
                adapt.saw_decode()
            pos += len(toks)
            now = time.perf_counter()
            share = (now - last) / len(toks)
            last = now
            for t in toks:
                if not out and not timings.ttft_s:
                    timings.ttft_s = now - t0
                else:
                    timings.itl_s.append(share)
                if t in stop_ids:
                    pr.finish = "stop"
                    done = True
                    break
                out.append(t)
                piece = dec.push(t) if dec is not None else ""
                if dec is not None:
                    pr.text += piece
                    # a stop string first seen now ends inside the new piece: search only the tail
                    lo = max(0, len(pr.text) - len(piece) - longest_stop + 1)
                    hit = [i for i in (pr.text.find(s, lo) for s in stops) if i >= 0]
                    if hit:
                        pr.text = pr.text[:min(hit)]
                        pr.finish = "stop"
                        if len(pr.text) > emitted:
                            yield Piece(t, pr.text[emitted:])
                            emitted = len(pr.text)
                        done = True
                        break
                    safe = len(pr.text) - _held_back(pr.text, stops)
                    if safe > emitted or not stops:
                        yield Piece(t, pr.text[emitted:safe])
                        emitted = safe
                    else:
                        yield Piece(t, "")
                else:
                    yield Piece(t, "")
                if len(out) >= max_new:
                    done = True
                    break
        for p, _ in pending:  # steps computed past the end: dropped
            p.block_until_ready()
        pending.clear()
        timings.total_s = time.perf_counter() - t0
        pr.finish = pr.finish or "length"
        with engine._lock:
            if spec_k:
                for k in ("verify_steps", "proposed", "accepted"):
                    engine.spec_totals[k] += getattr(timings, k)
            if engine._owner is me:  # each token but the last was a step's input: its row is written
                engine._kv_ids = ids + out[:-1]
        engine._release(me)
        if dec is not None and emitted < len(pr.text):  # text held back as a possible stop-string prefix
            yield Piece(out[-1], pr.text[emitted:])
    finally:
        if pr.finish is None:  # closed, collected or interrupted before its end
            pr.finish = "cancelled"
        engine._release(me)
