"""One measurement process: `python -m bench.latency --worker SYSTEM ... --out-jsonl FILE`.

XLA_FLAGS are read once per process, so the parent runs every system (and every flag set) in a process
of its own and merges the JSON lines. Systems:
  floors      copy bandwidth and matmul rate on jax.devices()[0]
  hybrid      hybrid_jax as designed, its kernel options from KernelOptions.from_env(): the hybrid_* ablations
              are the same system with XLA_FLAGS or HYBRID_JAX_* variables set by the parent
              (latency.HYBRID_VARIANTS; the variables: bench/README.md)
  coldstart   a second process building the hybrid engine again from the same (now warm) executable cache
  plainjit    bench/plainjit.py
  hf_eager    HF transformers generate, dynamic cache; hf_compile: static cache, compiled by transformers
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
import traceback
from importlib import metadata

import numpy as np

from hybrid_jax.config import PRESETS, LlamaConfig

SMOLLM2_135M = LlamaConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
                           rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True, max_position_embeddings=8192)
TINY = LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                   max_position_embeddings=2048)
SHAPES = {**PRESETS, "smollm2": PRESETS.get("smollm2", SMOLLM2_135M), "tiny": PRESETS.get("tiny", TINY)}
HF_SYSTEMS = ("hf_eager", "hf_compile", "hf_lookup")
HYBRID_SYSTEMS = ("hybrid", "hybrid_nocb", "hybrid_xlagemv", "hybrid_pallasgemv", "hybrid_devtoken", "hybrid_nofused", "hybrid_cudnnall", "hybrid_xlawo",
                  "hybrid_vmm", "hybrid_cublas", "hybrid_autotune", "hybrid_nopipe", "hybrid_nobuckets",
                  "hybrid_spec_ngram", "hybrid_spec_draft")
WORKLOADS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workloads")
# hybrid_spec_draft with random weights: a ~0.2 B draft of the model's vocabulary (only its cost is read)
DRAFT_DIMS = dict(dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, ffn_dim=2816)
JAX_SYSTEMS = HYBRID_SYSTEMS + ("plainjit",)


class Skip(Exception):
    """The system cannot run here; recorded with status 'skipped' and the reason."""


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "torch", "transformers", "torchao", "flax", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def sanitize(s: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(s)).strip("-") or "unknown"


class Emitter:
    def __init__(self, path: str, **base):
        self.f = open(path, "a")
        self.base = base

    def __call__(self, kind: str, **rec):
        self.f.write(json.dumps({"kind": kind, **self.base, **rec}) + "\n")
        self.f.flush()


def prompt_ids(vocab: int, n: int, rep: int, seed: int = 0) -> list[int]:
    """Random token ids (never zeros), the same for every system at (n, rep)."""
    rng = np.random.default_rng([seed, n, rep + 1000])
    return [int(t) for t in rng.integers(3, vocab, size=n)]


def resolve_cfg(args) -> LlamaConfig:
    if args.model:
        from hybrid_jax.checkpoint import load_config

        cfg = load_config(args.model)
    else:
        cfg = SHAPES[args.shape]
        if args.quantize:
            cfg = cfg.replace(quant=args.quantize)
    return cfg.replace(dtype=args.dtype_resolved) if args.dtype_resolved else cfg


def workload_path(name: str):
    """A workload file: a path, or the name of one under bench/workloads (with or without .json)."""
    from pathlib import Path

    for p in (Path(name), Path(WORKLOADS) / name, Path(WORKLOADS) / f"{name}.json"):
        if p.is_file():
            return p.absolute()
    raise SystemExit(f"no workload {name!r} (a file, or one of {sorted(os.listdir(WORKLOADS))} in {WORKLOADS})")


def workload_prompts(args) -> list[tuple[str, list[int]]]:
    """(id, token ids) of each prompt of --workload, through the checkpoint's tokenizer and chat template (the
    same ids for every system)."""
    from hybrid_jax import checkpoint
    from hybrid_jax.tokenizer import Tokenizer

    work = json.loads(open(args.workload).read())
    tok = Tokenizer(args.model, checkpoint.tokenizer_record(args.model))
    return [(f"{k}-{i}", tok.encode(text)) for k, v in work.items() if isinstance(v, list)
            for i, text in enumerate(v)]


def measure(gen, cfg, args, emit, prepare=None) -> None:
    """Warm up and time `gen(ids, new_tokens) -> (ttft_s, itl_s, token_ids[, extra])` at every prompt length, or
    on every prompt of --workload."""
    if args.workload:
        for pid, ids in workload_prompts(args):
            for _ in range(args.warmup):
                gen(ids, args.new_tokens)
            for rep in range(args.reps):
                ttft, itl, toks, *extra = gen(ids, args.new_tokens)
                emit("sample", prompt_len=len(ids), prompt_id=pid, rep=rep, ttft_s=ttft, itl_s=[float(x) for x in itl],
                     n_tokens=len(toks), tokens_head=[int(t) for t in toks[:8]], **(extra[0] if extra else {}))
        return
    for n in args.lengths:
        if prepare is not None:
            prepare(prompt_ids(cfg.vocab_size, n, -1, args.seed))
        for i in range(args.warmup):
            gen(prompt_ids(cfg.vocab_size, n, -2 - i, args.seed), args.new_tokens)
        for rep in range(args.reps):
            out = gen(prompt_ids(cfg.vocab_size, n, rep, args.seed), args.new_tokens)
            ttft, itl, toks = out[:3]
            emit("sample", prompt_len=n, rep=rep, ttft_s=ttft, itl_s=[float(x) for x in itl], n_tokens=len(toks),
                 tokens_head=[int(t) for t in toks[:8]], **(out[3] if len(out) > 3 else {}))


# ---- JAX systems -------------------------------------------------------------------------------------

def _jax_dtype(args):
    import jax

    on_acc = jax.devices()[0].platform != "cpu"
    return on_acc, args.dtype or ("bfloat16" if on_acc else "float32")


def _jax_mem() -> dict:
    """Peak and current device memory (the peak includes making the weights)."""
    import jax

    try:
        st = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - not every backend has it
        st = {}
    return {"peak_mem_bytes": st.get("peak_bytes_in_use"), "mem_in_use_bytes": st.get("bytes_in_use")}


def _card_jax() -> dict:
    import jax

    d = jax.devices()[0]
    return {"card": d.device_kind, "platform": d.platform, "n_devices": len(jax.devices())}


def run_floors(args, emit):
    from . import floors

    on_acc, dtype = _jax_dtype(args)
    args.dtype_resolved = dtype
    cfg = resolve_cfg(args)
    fl = floors.measure(on_acc, dtype, args.floor_bytes, args.matmul_n, args.floor_reps)
    emit("floors", **_card_jax(), dtype=dtype, weight_bytes=cfg.weight_bytes, n_params=cfg.n_params,
         cfg=cfg.to_dict(), **fl)


def _build_engine(args, cfg):
    """(engine, timings): random weights of cfg's shape made on the device, or the converted checkpoint."""
    import jax

    import hybrid_jax
    from hybrid_jax import weights as W
    from hybrid_jax.engine import Engine
    from hybrid_jax.options import KernelOptions

    # the ablations' kernel options from the HYBRID_JAX_* variables the parent set (latency.HYBRID_VARIANTS);
    # kv_reuse off: the workloads repeat a prompt to time its prefill (reuse would skip it)
    kw = dict(max_seq_len=args.max_seq_len, prefill_buckets=args.buckets, cache_dir=args.cache_dir, kv_reuse=False,
              options=KernelOptions.from_env())
    system = getattr(args, "worker", None) or ""
    if system.startswith("hybrid_spec_"):
        kind = system[len("hybrid_spec_"):]
        kw.update(speculative=kind, num_speculative_tokens=args.num_speculative_tokens)
        if kind == "draft":
            if args.draft:
                kw["draft"] = args.draft
            elif args.model:
                raise Skip("hybrid_spec_draft with --model needs --draft DIR")
            else:
                dcfg = cfg.replace(**DRAFT_DIMS)
                kw["draft"] = (dcfg, jax.block_until_ready(W.init_random(dcfg, jax.random.PRNGKey(1))))
    if system == "hybrid_nobuckets":  # a prefill executable of each prompt's exact length (the paper's prefill)
        kw["prefill_buckets"] = sorted({len(ids) for _, ids in workload_prompts(args)} if args.workload
                                       else set(args.lengths))
    if args.lean:
        kw["compile_sampling"] = False
    t = {}
    if args.model:
        t0 = time.perf_counter()
        eng = hybrid_jax.load(args.model, dtype=args.dtype_resolved, **kw)
        t["load_s"] = time.perf_counter() - t0
    else:
        t0 = time.perf_counter()
        params = jax.block_until_ready(W.init_random(cfg, jax.random.PRNGKey(0)))
        t["weights_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        eng = Engine(cfg, params, tokenizer=None, **kw)
        t["engine_build_s"] = time.perf_counter() - t0
    t["process_ready_s"] = time.time() - args.t_spawn if args.t_spawn else None
    return eng, t


def run_hybrid(args, emit, cold_only: bool = False):
    from hybrid_jax.engine import generate

    _, args.dtype_resolved = _jax_dtype(args)
    cfg = resolve_cfg(args)
    eng, t = _build_engine(args, cfg)
    if getattr(args, "worker", None) == "hybrid_nopipe":
        eng.pipeline_depth = 1  # the host reads each token before it enqueues the next step
    built = eng.stats()
    if cold_only:
        eng.runtime.wait_background()
        emit("coldstart", cache="warm", **t, stats_at_ready=built, stats=eng.stats(), **_card_jax())
        eng.close()
        return

    def gen(ids, new):
        r = generate(eng, ids, max_new_tokens=new, ignore_eos=not args.workload)  # a workload's answers end at EOS
        t = r.timings
        extra = {"prefill_chunks": t.prefill_chunks}
        if eng.speculative:
            extra.update(verify_steps=t.verify_steps, proposed=t.proposed, accepted=t.accepted)
        return t.ttft_s, t.itl_s, r.token_ids, extra

    def prepare(ids):  # compile this length's bucket (a first request is served in chunks meanwhile)
        gen(ids, 2)
        eng.runtime.wait_background()

    eng.runtime.wait_background()
    measure(gen, cfg, args, emit, prepare)
    pipe = [eng.pipelined_step_seconds(args.pipelined_steps) for _ in range(args.pipelined_reps)]
    emit("system", status="ok", cache="empty", dtype=cfg.dtype, quantize=cfg.quant, pipelined_step_s=pipe, **_jax_mem(),
         **t, stats_at_ready=built, stats=eng.stats(), xla_flags=os.environ.get("XLA_FLAGS", ""), **_card_jax())
    eng.close()


def run_plainjit(args, emit):
    import jax

    from hybrid_jax import checkpoint
    from hybrid_jax import weights as W

    from .plainjit import PlainJit

    _, args.dtype_resolved = _jax_dtype(args)
    cfg = resolve_cfg(args)
    if args.model:
        cfg, params = checkpoint.restore(args.model, dtype=args.dtype_resolved)
    else:
        params = jax.block_until_ready(W.init_random(cfg, jax.random.PRNGKey(0)))
    pj = PlainJit(cfg, params, args.max_seq_len)
    t0 = time.perf_counter()
    measure(pj.generate, cfg, args, emit)
    total = time.perf_counter() - t0
    pipe = [pj.pipelined_step_seconds(args.pipelined_steps) for _ in range(args.pipelined_reps)]
    emit("system", status="ok", dtype=cfg.dtype, quantize=cfg.quant, pipelined_step_s=pipe, **_jax_mem(),
         measure_s=total, xla_flags=os.environ.get("XLA_FLAGS", ""), **_card_jax())


# ---- HF peers ------------------------------------------------------------------------------------------

def run_hf(args, emit, system: str):
    import torch

    from . import peers

    dev = peers.hf_device()
    card = {"card": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "platform": dev}
    if system == "hf_compile" and dev != "cuda":
        raise Skip("transformers compiles the static-cache forward (CUDA graphs) on CUDA only; no GPU here")
    args.dtype_resolved = args.dtype or ("bfloat16" if dev == "cuda" else "float32")
    if args.model:
        cfg, w = peers.load_weights_numpy(args.model)
        cfg = cfg.replace(dtype=args.dtype_resolved)
    else:
        cfg, w = resolve_cfg(args).replace(quant=None), None
    if args.quantize:  # before the build: a scheme torchao has no kernel for is skipped at once
        tao = peers.torchao_config(args.quantize, dev)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = peers.build_model(cfg, dev, args.dtype_resolved, w)
    if args.quantize:
        peers.quantize_torchao(model, tao)
    build_s = time.perf_counter() - t0
    peer = peers.HFPeer(model, dev, static_cache=system == "hf_compile", max_seq_len=args.max_seq_len,
                        lookup=10 if system == "hf_lookup" else 0, eos=cfg.eos_token_ids if args.workload else None)
    t0 = time.perf_counter()
    first = workload_prompts(args)[0][1] if args.workload else prompt_ids(cfg.vocab_size, max(args.lengths), -1, args.seed)
    peer.generate(first, args.new_tokens)
    first_s = time.perf_counter() - t0  # includes torch.compile for hf_compile
    measure(peer.generate, cfg, args, emit)
    mem = torch.cuda.memory_allocated() if dev == "cuda" else None
    emit("system", status="ok", dtype=args.dtype_resolved, pipelined_step_s=[], peak_mem_bytes=peer.peak_memory(),
         mem_in_use_bytes=mem,
         engine_build_s=build_s, first_generate_s=first_s, weights="checkpoint" if args.model else "random",
         quantize=args.quantize, **card)


def main_worker(args) -> int:
    system = args.worker
    emit = Emitter(args.out_jsonl, run=args.run, label=args.label or system, system=args.system_name or system,
                   variant=args.variant)
    emit("meta", argv=sys.argv, pid=os.getpid(), xla_flags=os.environ.get("XLA_FLAGS", ""), versions=versions())
    try:
        if system == "floors":
            run_floors(args, emit)
        elif system in HYBRID_SYSTEMS:
            run_hybrid(args, emit)
        elif system == "coldstart":
            run_hybrid(args, emit, cold_only=True)
        elif system == "plainjit":
            run_plainjit(args, emit)
        elif system in HF_SYSTEMS:
            run_hf(args, emit, system)
        else:
            raise Skip(f"unknown system {system!r}")
    except Skip as e:
        emit("system", status="skipped", message=str(e))
    except Exception as e:  # noqa: BLE001 - recorded, and the exit status says so
        traceback.print_exc()
        emit("system", status="error", message=f"{type(e).__name__}: {e}")
        return 1
    return 0
