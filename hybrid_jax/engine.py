"""load(), generate(), streaming, stop conditions and timings.

The decode loop keeps the host off the critical path: it enqueues step n+1 before it reads token n, so
the device never waits for the host; stop conditions are therefore checked one step late and the token
computed past a stop is dropped.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from . import checkpoint, sharding
from .config import LlamaConfig
from .runtime import Runtime
from .tokenizer import IncrementalDecoder, Tokenizer

SAMPLING_ARGS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "stream", "raw", "ignore_eos",
                 "system", "stop_token_ids")


@dataclasses.dataclass
class Timings:
    ttft_s: float = 0.0  # prompt ids on the host -> first generated id on the host
    itl_s: list[float] = dataclasses.field(default_factory=list)  # each inter-token interval
    total_s: float = 0.0
    prefill_chunks: int = 0

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
    finish_reason: str  # "stop" (EOS / stop token / stop string) or "length"
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
                 path: str | None = None, tensor_parallel: int = 1, **runtime_kw):
        self.cfg = cfg
        self.path = path
        self.tokenizer = tokenizer
        self.max_seq_len = int(max_seq_len or min(cfg.max_position_embeddings, 2048))
        sharding.check(cfg, tensor_parallel)
        self.mesh = sharding.mesh(tensor_parallel) if tensor_parallel > 1 else None
        if self.mesh is not None:
            params = sharding.shard_params(params, cfg, self.mesh)
        self.runtime = Runtime(cfg, params, self.max_seq_len, mesh=self.mesh, **runtime_kw)
        # Enqueue the first decode step before reading the first token (True) or after (False).
        self.lookahead_first = True
        self._lock = threading.Lock()

    # -- helpers users call ---------------------------------------------------------------------
    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """[T, vocab] float32 logits of a sequence (scored from position 0)."""
        ids = _check_ids(token_ids, self.cfg)
        if len(ids) > self.max_seq_len:
            raise ValueError(f"sequence of {len(ids)} tokens exceeds max_seq_len {self.max_seq_len}")
        return self.runtime.logits(ids)

    def warmup(self, background: bool = False, progress: bool = False):
        """Compile every prefill bucket and the sampling decode step now (or load them from the disk cache).

        A bucket compiled while a request decodes slows that request's steps (XLA's autotuning shares the GPU:
        on an H200 a 7B bucket's compile took 36 s and the steps beside it averaged 4.7 ms instead of 3.8,
        run 48), so a latency-bound server warms up before it takes requests, or once per machine with
        `hybrid-jax warmup` (the executables then load from the disk cache)."""
        return self.runtime.warmup(background=background, progress=progress)

    def stats(self) -> dict:
        return self.runtime.stats()

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
        ids = _check_ids(prompt, self.cfg)
        return ids

    def pipelined_step_seconds(self, n_steps: int = 100, context: int = 1) -> float:
        """Device time per decode step with no host reads in between (a bound for streaming TPOT), after a
        prompt of `context` tokens (the steps attend over that many cached rows and more)."""
        if not 1 <= context <= self.max_seq_len - 3:
            raise ValueError(f"context must be in [1, {self.max_seq_len - 3}], got {context}")
        rt = self.runtime
        with self._lock:
            state, _ = rt.prefill(rt.reset_state(rt.state.cache), [1] * context)
            spec = rt.decode_spec(min(context + n_steps, self.max_seq_len - 1), False)
            state, tok = rt.decode(state, spec)
            tok.block_until_ready()
            n = min(n_steps, self.max_seq_len - 2 - context)
            t0 = time.perf_counter()
            for _ in range(n):
                state, tok = rt.decode(state, spec)
            tok.block_until_ready()
            dt = (time.perf_counter() - t0) / n
            rt.state = state
        return dt

    def close(self):
        self.runtime.close()


def _check_ids(ids, cfg: LlamaConfig) -> list[int]:
    ids = [int(t) for t in ids]
    if not ids:
        raise ValueError("prompt is empty")
    bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ValueError(f"token ids out of range [0, {cfg.vocab_size}): {bad[:5]}")
    return ids


def load(path: str | Path, max_seq_len: int | None = None, prefill_buckets: Sequence[int] | None = None,
         cache_dir: str | Path | None = None, dtype: str | None = None, tensor_parallel: int = 1,
         **runtime_kw) -> Engine:
    """Load a converted checkpoint folder (see `python -m convert`) into a ready engine.

    With `tensor_parallel=N` > 1 each weight is restored straight into its shards on N devices.
    """
    fn = None
    if tensor_parallel != 1:
        cfg = checkpoint.load_config(path)
        sharding.check(cfg, tensor_parallel)
        fn = sharding.sharding_fn(sharding.mesh(tensor_parallel))
    cfg, params = checkpoint.restore(path, sharding_fn=fn, dtype=dtype)
    tok = Tokenizer(path) if any(Path(path, f).exists() for f in ("tokenizer.json", "tokenizer.model",
                                                                    "tokenizer_config.json")) else None
    return Engine(cfg, params, tok, max_seq_len=max_seq_len, path=str(path), prefill_buckets=prefill_buckets,
                  cache_dir=cache_dir, tensor_parallel=tensor_parallel, **runtime_kw)


_ENGINES: dict[tuple, Engine] = {}


def _resolve(engine_or_path) -> Engine:
    if isinstance(engine_or_path, Engine):
        return engine_or_path
    key = (str(Path(engine_or_path).absolute()),)
    if key not in _ENGINES:
        _ENGINES[key] = load(engine_or_path)
    return _ENGINES[key]


def _validate(engine: Engine, n_prompt: int, max_new_tokens, temperature, top_k, top_p):
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if temperature is None or temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 0):
        raise ValueError(f"top_k must be an integer >= 0, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if n_prompt + max_new_tokens > engine.max_seq_len:
        raise ValueError(f"prompt ({n_prompt} tokens) plus max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_seq_len {engine.max_seq_len}")


class Stream:
    """Iterate for `Piece`s as tokens arrive; `.result` holds the GenerationResult once exhausted."""

    def __init__(self, it: Iterator[Piece]):
        self._it = it
        self.result: GenerationResult | None = None

    def __iter__(self):
        return self

    def __next__(self) -> Piece:
        return next(self._it)


def generate(engine_or_path, prompt: str | Sequence[int], *, max_new_tokens: int = 128, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop: str | Sequence[str] | None = None, stop_token_ids: Sequence[int] | None = None,
             stream: bool = False, raw: bool = False, ignore_eos: bool = False, system: str | None = None,
             **unknown):
    """Generate a continuation of `prompt` (text through the chat template unless raw=True, or token ids).

    Returns a GenerationResult, or with stream=True a `Stream` yielding `Piece(token_id, text)`.
    """
    if unknown:
        raise ValueError(f"unknown generation argument(s): {sorted(unknown)} (known: {', '.join(SAMPLING_ARGS)})")
    engine = _resolve(engine_or_path)
    ids = engine.encode(prompt, raw=raw, system=system)
    _validate(engine, len(ids), max_new_tokens, temperature, top_k, top_p)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stops):
        raise ValueError("stop strings must be non-empty")
    stop_ids = set(int(t) for t in (stop_token_ids or ()))
    if not ignore_eos:
        stop_ids |= set(engine.cfg.eos_token_ids)
        if engine.tokenizer is not None and engine.tokenizer.eos_token_id is not None:
            stop_ids.add(int(engine.tokenizer.eos_token_id))
    st = Stream(iter(()))
    st._it = _run(engine, ids, st, max_new_tokens, temperature, top_k, top_p,
                  seed if seed is not None else int(time.time_ns() % 2**31) if temperature > 0 else 0,
                  stops, stop_ids)
    if stream:
        return st
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


def _run(engine: Engine, ids: list[int], st: Stream, max_new: int, temperature, top_k, top_p, seed,
         stops: list[str], stop_ids: set[int]) -> Iterator[Piece]:
    rt = engine.runtime
    do_sample = temperature > 0
    dec = IncrementalDecoder(engine.tokenizer) if engine.tokenizer is not None else None
    out: list[int] = []
    timings = Timings()
    finish = "length"
    text, emitted = "", 0
    longest_stop = max(map(len, stops), default=0)
    with engine._lock:
        t0 = time.perf_counter()
        # the request's position, key and sampling parameters travel with its first prefill chunk
        state, tok = rt.prefill(rt.state, ids, request=(seed, temperature, top_k, top_p))
        timings.prefill_chunks = rt.last_prefill_chunks
        pending = [tok]
        issued = 1  # tokens requested from the device so far
        pos = len(ids)  # position the next decode step writes
        last = t0
        try:
            while True:
                # The first token is read before the next step is enqueued when that step's executable is
                # still compiling (a first sampled request), so that the compile does not delay it.
                ahead = out or (engine.lookahead_first and rt.compiled(rt.decode_spec(pos, do_sample)))
                depth = 2 if ahead else 1
                while issued < max_new and len(pending) < depth:  # enqueue step n+1 before reading token n
                    state, nxt = rt.decode(state, rt.decode_spec(pos, do_sample))
                    pending.append(nxt)
                    issued += 1
                    pos += 1
                if not pending:
                    break
                t = int(np.asarray(pending.pop(0)))
                now = time.perf_counter()
                if not out:
                    timings.ttft_s = now - t0
                else:
                    timings.itl_s.append(now - last)
                last = now
                if t in stop_ids:
                    finish = "stop"
                    break
                out.append(t)
                piece = dec.push(t) if dec is not None else ""
                if dec is not None:
                    text += piece
                    # a stop string first seen now ends inside the new piece: search only the tail
                    lo = max(0, len(text) - len(piece) - longest_stop + 1)
                    hit = [i for i in (text.find(s, lo) for s in stops) if i >= 0]
                    if hit:
                        text = text[:min(hit)]
                        finish = "stop"
                        if len(text) > emitted:
                            yield Piece(t, text[emitted:])
                            emitted = len(text)
                        break
                    safe = len(text) - _held_back(text, stops)
                    if safe > emitted or not stops:
                        yield Piece(t, text[emitted:safe])
                        emitted = safe
                    else:
                        yield Piece(t, "")
                else:
                    yield Piece(t, "")
                if len(out) >= max_new:
                    break
        finally:
            for p in pending:  # the step computed past a stop: dropped
                p.block_until_ready()
            rt.state = state
        timings.total_s = time.perf_counter() - t0
    if dec is not None and emitted < len(text):  # text held back as a possible stop-string prefix
        yield Piece(out[-1], text[emitted:])
        emitted = len(text)
    st.result = GenerationResult(text=text, token_ids=out, finish_reason=finish, prompt_token_ids=list(ids),
                                 timings=timings)
