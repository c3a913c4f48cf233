"""The hybrid runtime against the reference: greedy ids equal HF transformers' at and around every bucket
edge and through the chunked path; no recompilation once compiled; the on-disk executable cache."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import hf_params, make_hf_model
from hybrid_jax.config import LlamaConfig
from hybrid_jax.engine import Engine, generate
from hybrid_jax.options import KernelOptions

MAX = 72  # max_seq_len; buckets 16, 32, 64, 72
NEW = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    m = make_hf_model("gqa", seed=3)
    cfg = LlamaConfig.from_hf(m.config.to_dict(), dtype="float32")
    return m, cfg, hf_params(m, cfg)


@pytest.fixture(scope="module")
def engine(tiny, tmp_path_factory):
    _, cfg, p = tiny
    e = Engine(cfg, p, max_seq_len=MAX, cache_dir=tmp_path_factory.mktemp("xc"))
    e.warmup(run=True)  # as on a GPU: every step run once on the state, whose rows the requests then overwrite
    yield e
    e.close()


def hf_greedy(m, ids, n):
    out = m.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                     pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


def prompt(n, seed=0):
    return [int(t) for t in np.random.RandomState(seed + n).randint(3, 160, size=n)]


@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 31, 32, 33, 47, 48, 63, 64, 65, 71])
def test_greedy_equals_hf_at_bucket_edges(tiny, engine, n):
    m = tiny[0]
    ids = prompt(n)
    new = min(NEW, MAX - n)
    r = generate(engine, ids, max_new_tokens=new, ignore_eos=True)
    assert r.timings.prefill_chunks == 1  # warmed up: the prompt's own bucket
    assert r.token_ids == hf_greedy(m, ids, new)
    assert r.finish_reason == "length"


def test_request_travels_with_the_prefill(tiny, engine):
    """A request's position, key and sampling parameters are set by its first prefill chunk (no separate
    state reset): after a sampled request the state holds its parameters, and the next greedy request
    starts from position 0 again."""
    from hybrid_jax.runtime import REQ_FIELDS, _key_data, pack_request
    buf = pack_request(np.array([5, 6, 7], np.int32), 16, (9, 0.5, 3, 0.25))
    assert buf.shape == (16 + REQ_FIELDS,) and buf[:3].tolist() == [5, 6, 7] and not buf[3:16].any()
    assert buf[16:18].tolist() == [3, 1] and np.array_equal(buf[18:20].view(np.uint32), _key_data(9))
    assert buf[20:24].view(np.float32)[[0, 2]].tolist() == [0.5, 0.25] and buf[21] == 3
    assert pack_request(np.array([5], np.int32), 16, None)[17] == 0  # a continuing chunk keeps the state
    ids = prompt(9, seed=2)
    greedy = generate(engine, ids, max_new_tokens=5, ignore_eos=True).token_ids
    generate(engine, ids, max_new_tokens=5, temperature=0.5, top_k=3, top_p=0.25, seed=9, ignore_eos=True)
    sp = engine.runtime.state.sp
    assert (float(sp.temperature), int(sp.top_k), float(sp.top_p)) == (0.5, 3, 0.25)
    assert int(engine.runtime.state.pos) == 9 + 5 - 1  # the last token is produced, not yet written
    assert generate(engine, ids, max_new_tokens=5, ignore_eos=True).token_ids == greedy == hf_greedy(tiny[0], ids, 5)


def test_chunked_prefill_while_bucket_compiles(tiny, tmp_path):
    m, cfg, p = tiny
    e = Engine(cfg, p, max_seq_len=MAX, cache_dir=tmp_path, compile_sampling=False)
    try:
        assert e.stats()["buckets_compiled"] == []  # only decode + the smallest bucket over the cache exist
        ids = prompt(40, seed=7)
        r = generate(e, ids, max_new_tokens=NEW, ignore_eos=True)
        assert r.timings.prefill_chunks == 3  # 16 + 16 + 8 through the smallest bucket, not waiting
        assert r.token_ids == hf_greedy(m, ids, NEW)
        e.runtime.wait_background()
        assert 64 in e.stats()["buckets_compiled"]  # compiled in the background meanwhile
        r2 = generate(e, ids, max_new_tokens=NEW, ignore_eos=True)
        assert r2.timings.prefill_chunks == 1 and r2.token_ids == r.token_ids
    finally:
        e.close()


def test_no_recompilation(engine, compile_counter):
    generate(engine, prompt(5), max_new_tokens=4, ignore_eos=True)  # any lazy jax-side setup
    engine.runtime.wait_background()
    before, stats_before = compile_counter.n, engine.stats()["compiles"]
    r = generate(engine, [5], max_new_tokens=MAX - 1, ignore_eos=True)  # 70 decode steps
    assert len(r.token_ids) == MAX - 1
    steps = len(r.token_ids)
    for i in range(20):
        n = [3, 9, 16, 20, 40, 60][i % 6]
        r = generate(engine, prompt(n, seed=i), max_new_tokens=min(7, MAX - n), ignore_eos=True)
        steps += len(r.token_ids)
    for _ in range(2):
        steps += len(generate(engine, [7], max_new_tokens=MAX - 1, ignore_eos=True).token_ids)
    assert steps >= 200
    assert compile_counter.n == before, "a compile happened inside a request"
    assert engine.stats()["compiles"] == stats_before


CHILD = textwrap.dedent("""
    import json, sys
    sys.path[:0] = {paths!r}
    from test_runtime import child_main
    child_main({cache!r})
""")


def child_main(cache_dir):
    """Fresh process: build the same engine, serve one prompt, report JAX compile events and stats."""
    from conftest import CompileCounter, hf_params, make_hf_model

    counter = CompileCounter()
    m = make_hf_model("gqa", seed=3)
    cfg = LlamaConfig.from_hf(m.config.to_dict(), dtype="float32")
    p = hf_params(m, cfg)
    base = counter.n  # weight conversion's own small jax ops
    e = Engine(cfg, p, max_seq_len=MAX, cache_dir=cache_dir)
    e.warmup()
    r = generate(e, prompt(20), max_new_tokens=NEW, ignore_eos=True)
    print("CHILD " + json.dumps({"compiles": counter.n - base, "stats": e.stats(), "tokens": r.token_ids,
                                 "ref": hf_greedy(m, prompt(20), NEW)}))


def run_child(cache_dir):
    here = Path(__file__).parent
    code = CHILD.format(paths=[str(here), str(here.parent)], cache=str(cache_dir))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    line = [x for x in out.stdout.splitlines() if x.startswith("CHILD ")]
    assert line, out.stderr[-3000:]
    return json.loads(line[0][6:])


def test_warm_cache_in_fresh_process_compiles_nothing_and_corrupt_entry_is_rebuilt(tmp_path):
    cold = run_child(tmp_path)
    assert cold["stats"]["compiles"] > 0 and cold["tokens"] == cold["ref"]
    entries = sorted(tmp_path.glob("*.xla"))
    assert len(entries) == cold["stats"]["compiles"]
    warm = run_child(tmp_path)
    assert warm["stats"]["compiles"] == 0
    assert warm["stats"]["cache_hits"] == len(entries)
    # jax's own events: only the zero-filled cache allocation (a tiny broadcast) may compile
    assert warm["compiles"] <= 2, warm
    assert warm["tokens"] == warm["ref"]
    # corrupt one entry (flip payload bytes), truncate another, replace a third with garbage
    b = bytearray(entries[0].read_bytes())
    b[-100] ^= 0xFF
    entries[0].write_bytes(bytes(b))
    entries[1].write_bytes(entries[1].read_bytes()[:1000])
    entries[2].write_bytes(b"not an executable")
    fixed = run_child(tmp_path)
    assert fixed["stats"]["cache_rejected"] == 3
    assert fixed["stats"]["compiles"] == 3
    assert fixed["tokens"] == fixed["ref"]
    again = run_child(tmp_path)  # rebuilt entries are trusted again
    assert again["stats"]["compiles"] == 0 and again["stats"]["cache_rejected"] == 0


def test_fused_prefill_attention_greedy_equals_hf(tiny, tmp_path):
    """The prompt's own bucket through model.fused_attention (here through XLA, cuDNN's kernel on a GPU);
    chunks through the smallest bucket keep the attention over the cache: greedy ids equal HF's both ways."""
    m, cfg, p = tiny
    e = Engine(cfg, p, max_seq_len=MAX, cache_dir=tmp_path, compile_sampling=False,
               options=KernelOptions(prefill_attention="xla"))
    try:
        assert e.stats()["prefill_attention"] == "xla"
        ids = prompt(40, seed=11)
        r = generate(e, ids, max_new_tokens=NEW, ignore_eos=True)
        assert r.timings.prefill_chunks == 3 and r.token_ids == hf_greedy(m, ids, NEW)
        e.runtime.wait_background()
        for n in (5, 16, 40):
            ids = prompt(n, seed=12)
            r = generate(e, ids, max_new_tokens=NEW, ignore_eos=True)
            assert r.timings.prefill_chunks == 1 and r.token_ids == hf_greedy(m, ids, NEW)
        pre = ("prefill", 16, 16)
        key = e.runtime.cache_key(pre)
        dec = e.runtime.cache_key(e.runtime.decode_spec(1, False))
        e.runtime.options = e.runtime.options.replace(prefill_attention="off")
        assert e.runtime.cache_key(pre) != key  # its own executables on disk
        assert e.runtime.cache_key(e.runtime.decode_spec(1, False)) == dec  # decode steps shared
    finally:
        e.close()


def test_fused_attention_from_a_bucket_size(tiny, tmp_path, monkeypatch):
    """The fused attention only in buckets of at least prefill_attention_min_rows rows (options.FUSED_MIN_ROWS
    under "auto" on a GPU), XLA's attention below: each bucket's key and compiled program say which, the stats list the
    fused buckets, and the greedy ids equal HF's in both kinds of bucket."""
    m, cfg, p = tiny
    e = Engine(cfg, p, max_seq_len=MAX, cache_dir=tmp_path, compile_sampling=False, prefill_buckets=(16, 32),
               options=KernelOptions(prefill_attention="xla"))
    try:
        rt = e.runtime
        assert rt.options.prefill_attention_min_rows == 0 and e.stats()["prefill_attention_buckets"] == [16, 32]
        rt.options = rt.options.replace(prefill_attention_min_rows=32)  # as "auto" does at 128 rows on a GPU
        assert e.stats()["prefill_attention_buckets"] == [32]
        assert rt.cache_key(("prefill", 16, 16))["options"]["prefill_attention"] == "off"
        assert rt.cache_key(("prefill", 32, 32))["options"]["prefill_attention"] == "xla"
        from hybrid_jax import model
        traced = []
        real = model.fused_attention
        monkeypatch.setattr(model, "fused_attention", lambda *a: traced.append(a[-1]) or real(*a))
        for b, calls in ((16, []), (32, ["xla"] * cfg.n_layers)):
            traced.clear()
            rt.lower(("prefill", b, b))  # what the bucket's executable is compiled from
            assert traced == calls
        monkeypatch.undo()
        e.warmup()
        for n in (12, 30):
            ids = prompt(n, seed=13)
            r = generate(e, ids, max_new_tokens=NEW, ignore_eos=True)
            assert r.timings.prefill_chunks == 1 and r.token_ids == hf_greedy(m, ids, NEW)
    finally:
        e.close()


def _on_cpu(opts: dict | None) -> dict | None:
    """`opts` as the CPU compiles them: with runtime.cpu_compile_options()."""
    from hybrid_jax.runtime import cpu_compile_options
    return {**(opts or {}), **cpu_compile_options()} or None


def _record_compile_options(rt) -> list:
    """From now on, every (spec, compiler_options) `rt` compiles an executable with, in order."""
    compiled, lower = [], rt.lower

    def spy(spec):
        low = lower(spec)

        class Spy:
            def compile(self, compiler_options=None):
                compiled.append((spec, compiler_options))
                return low.compile(compiler_options=compiler_options)
        return Spy()

    rt.lower = spy
    return compiled


def test_cpu_prefill_does_not_hold_every_layers_weights_at_once(tiny):
    """On the CPU the prefill's matmuls read each layer's weights from a copy (a slice of the stacked arrays); XLA's
    default CPU scheduler makes all of them before the first layer runs (a temp buffer the size of the layers,
    faulted in on every call: SmolLM2's 425 MB). Compiled as the runtime compiles it, the temp buffer holds a few
    of them at most."""
    import jax
    _, cfg, p = tiny
    e = Engine(cfg, p, max_seq_len=MAX, use_disk_cache=False, compile_sampling=False)
    try:
        layers = sum(a.nbytes for a in jax.tree.leaves(p.layers))
        temp = e.runtime.executable(("prefill", 16, 16)).memory_analysis().temp_size_in_bytes
        assert temp < layers / 2, (temp, layers)
    finally:
        e.close()


def test_cpu_holds_a_16bit_checkpoint_in_float32(tiny, tmp_path, monkeypatch):
    """XLA's CPU dots take no 16-bit operands: computed in bfloat16, every decode step converted each matrix and the
    LM head to float32 (a temp buffer the LM head's size; SmolLM2 decoded 3x slower). On the CPU load() holds a
    bfloat16 checkpoint in float32: the step's temp buffer a fraction of that, and the greedy ids HF's on the same
    bfloat16 weights. dtype="bfloat16" keeps the stored dtype, and so does a float32 copy that would not fit."""
    import copy

    import jax
    import jax.numpy as jnp

    from hybrid_jax import checkpoint, engine as E, weights as W
    m, cfg, p = tiny
    bf = jax.tree.map(lambda a: np.asarray(a.astype(jnp.bfloat16)), W.to_dict(p))
    ckpt = checkpoint.save(tmp_path / "bf16", cfg.replace(dtype="bfloat16"), bf)
    m16 = copy.deepcopy(m)
    with torch.no_grad():
        for t in m16.parameters():
            t.copy_(t.bfloat16().float())
    head = cfg.vocab_size * cfg.dim * 4

    def decode_temp(e):
        return e.runtime.executable(e.runtime.decode_spec(1, False)).memory_analysis().temp_size_in_bytes

    ids = prompt(20, seed=5)
    e = E.load(ckpt, max_seq_len=MAX, use_disk_cache=False, compile_sampling=False)
    try:
        assert e.cfg.dtype == "float32" and e.runtime.params.embed.dtype == jnp.float32
        assert decode_temp(e) < head / 2, (decode_temp(e), head)
        assert generate(e, ids, max_new_tokens=NEW, ignore_eos=True).token_ids == hf_greedy(m16, ids, NEW)
    finally:
        e.close()
    e = E.load(ckpt, max_seq_len=MAX, use_disk_cache=False, compile_sampling=False, dtype="bfloat16")
    try:
        assert e.cfg.dtype == "bfloat16" and e.runtime.params.embed.dtype == jnp.bfloat16
        assert decode_temp(e) >= head, (decode_temp(e), head)  # the conversion this avoids
    finally:
        e.close()
    monkeypatch.setattr(E, "_available_memory", lambda: 2 * sum(a.nbytes for a in jax.tree.leaves(bf)))
    assert E.cpu_dtype(checkpoint.load_config(ckpt), ckpt) is None
    # a draft decides for itself, not from the target's choice: here the target's float32 copy fits, the draft's not
    draft = checkpoint.save(tmp_path / "draft", cfg.replace(dtype="bfloat16"), bf)
    real = E.cpu_dtype
    monkeypatch.setattr(E, "cpu_dtype", lambda c, path: "float32" if Path(path) == Path(ckpt) else real(c, path))
    e = E.load(ckpt, max_seq_len=MAX, use_disk_cache=False, compile_sampling=False, speculative="draft", draft=draft)
    try:
        assert e.runtime.params.embed.dtype == jnp.float32 and e.runtime.draft.params.embed.dtype == jnp.bfloat16
    finally:
        e.close()


def test_prefill_matmuls_cublas_compiles_prefills_with_its_options_and_equals_hf(tiny, tmp_path):
    """prefill_matmuls="cublas": the prefill executables (only) are compiled with PREFILL_MATMULS' options,
    keyed apart on disk, and the greedy ids still equal HF's (the options are GPU flags the CPU ignores)."""
    from hybrid_jax.runtime import PREFILL_MATMULS
    m, cfg, p = tiny
    e = Engine(cfg, p, max_seq_len=MAX, cache_dir=tmp_path, compile_sampling=False,
               options=KernelOptions(prefill_matmuls="cublas"))
    try:
        rt = e.runtime
        assert e.stats()["prefill_matmuls"] == "cublas"
        compiled = _record_compile_options(rt)
        ids = prompt(20, seed=13)
        r = generate(e, ids, max_new_tokens=NEW, ignore_eos=True)
        assert r.token_ids == hf_greedy(m, ids, NEW)
        e.runtime.wait_background()  # the prompt's bucket (32), compiled in the background
        rt.executable(("decode", rt.cache_len, True))
        seen = [(spec[0], o) for spec, o in compiled]
        assert ("prefill", _on_cpu(PREFILL_MATMULS["cublas"])) in seen and ("decode", _on_cpu(None)) in seen
        assert all(o == _on_cpu(PREFILL_MATMULS["cublas"]) for k, o in seen if k == "prefill")
        r = generate(e, ids, max_new_tokens=NEW, ignore_eos=True)
        assert r.timings.prefill_chunks == 1 and r.token_ids == hf_greedy(m, ids, NEW)
        pre, dec = ("prefill", 32, 32), rt.decode_spec(1, False)
        keys = rt.cache_key(pre), rt.cache_key(dec)
        rt.options = rt.options.replace(prefill_matmuls="autotune")
        assert rt.cache_key(pre) != keys[0] and rt.cache_key(dec) == keys[1]  # its own prefill executables on disk
    finally:
        e.close()


def test_prefill_matmuls_split_by_rows_keys_and_equals_hf(tiny, tmp_path, monkeypatch):
    """The default ("split"): prefill buckets of at least CUBLAS_MIN_ROWS rows are compiled with cuBLAS's
    options, smaller ones autotuned (no options), decode steps with none; each executable is keyed on disk by
    what it was compiled with (shared with the all-autotune or all-cuBLAS mode of the same bucket), and the
    greedy ids through both kinds of bucket equal HF's."""
    from hybrid_jax import runtime as R
    from bench.worker import SHAPES
    n7b, nsmol = SHAPES["llama2-7b"].n_params, SHAPES["smollm2"].n_params  # 6.74e9, 1.35e8
    split = functools.partial(R.prefill_matmuls_for, "split")
    assert split(256, n7b, None) == split(1024, n7b, None) == "cublas"  # runs 51-55
    assert split(128, n7b, None) == "autotune" and split(16, n7b, None) == "autotune"
    assert split(512, nsmol, None) == split(2048, nsmol, None) == "autotune"  # too little work (run 58)
    assert split(512, n7b, object()) == "autotune"  # several GPUs: unmeasured, autotuned
    assert R.prefill_matmuls_for("autotune", 512, n7b, None) == "autotune"
    assert R.prefill_matmuls_for("cublas", 16, nsmol, None) == "cublas"
    m, cfg, p = tiny
    # the tiny model's buckets: 16 autotuned, 32 and 64 through cuBLAS
    monkeypatch.setattr(R, "CUBLAS_MIN_ROWS", 32)
    monkeypatch.setattr(R, "CUBLAS_MIN_FLOPS", 2 * cfg.n_params * 32)
    e = Engine(cfg, p, max_seq_len=MAX, cache_dir=tmp_path, compile_sampling=False)
    try:
        rt = e.runtime
        assert e.stats()["prefill_matmuls"] == "split" and e.stats()["prefill_cublas_buckets"] == [32, 64, 72]
        compiled = _record_compile_options(rt)
        for n in (12, 20, 40):  # buckets 16, 32, 64
            ids = prompt(n, seed=15)
            rt.executable(("prefill", rt.bucket_for(n), rt.bucket_for(n)))
            r = generate(e, ids, max_new_tokens=NEW, ignore_eos=True)
            assert r.timings.prefill_chunks == 1 and r.token_ids == hf_greedy(m, ids, NEW)
        rt.executable(("decode", rt.cache_len, True))
        seen = dict(compiled)
        assert seen[("prefill", 16, 16)] == seen[("decode", rt.cache_len, True)] == _on_cpu(None)
        assert seen[("prefill", 32, 32)] == seen[("prefill", 64, 64)] == _on_cpu(R.PREFILL_MATMULS["cublas"])
        k16, k32 = rt.cache_key(("prefill", 16, 16)), rt.cache_key(("prefill", 32, 32))
        rt.options = rt.options.replace(prefill_matmuls="autotune")
        assert rt.cache_key(("prefill", 16, 16)) == k16 and rt.cache_key(("prefill", 32, 32)) != k32
        rt.options = rt.options.replace(prefill_matmuls="cublas")
        assert rt.cache_key(("prefill", 16, 16)) != k16 and rt.cache_key(("prefill", 32, 32)) == k32
        rt.options = rt.options.replace(matmul_2d=False)  # another traced form: another executable on disk
        assert rt.cache_key(("prefill", 32, 32)) != k32
    finally:
        e.close()


def test_background_compiles_off_serves_through_compiled_buckets(tiny, tmp_path):
    m, cfg, p = tiny
    e = Engine(cfg, p, max_seq_len=MAX, cache_dir=tmp_path, compile_sampling=False, background_compiles=False)
    try:
        started = e.stats()["background_compiles_started"]  # the executables compiled at load
        for n in (20, 40):
            ids = prompt(n, seed=14)
            r = generate(e, ids, max_new_tokens=NEW, ignore_eos=True)
            assert r.timings.prefill_chunks == -(-n // 16) and r.token_ids == hf_greedy(m, ids, NEW)
        assert e.stats()["background_compiles_started"] == started and e.stats()["buckets_compiled"] == []
    finally:
        e.close()


def test_pipelined_step_seconds_after_a_context(engine):
    """The pipelined step timing decodes from position 1 by default, or after a prompt of `context` tokens:
    one warm-up step, then n timed steps, the state left where they ended."""
    rt = engine.runtime
    assert engine.pipelined_step_seconds(3) > 0
    assert int(rt.state.pos) == 1 + 1 + 3
    assert engine.pipelined_step_seconds(3, context=20) > 0  # two buckets' worth of cached rows
    assert int(rt.state.pos) == 20 + 1 + 3
    assert engine.pipelined_step_seconds(100, context=MAX - 3) > 0  # the steps are capped at the cache's end
    assert int(rt.state.pos) == MAX - 1
    for bad in (0, MAX - 2):
        with pytest.raises(ValueError, match="context must be"):
            engine.pipelined_step_seconds(3, context=bad)


def test_token_in_pinned_host_memory(tiny, tmp_path):
    """By default the prefill and decode executables write the next token to pinned host memory (not to a
    new device buffer, whose allocation XLA shares with the step's temporaries: runs 76-77); the choice is in
    the executables' disk key, and the greedy ids equal HF's with the token in either memory."""
    m, cfg, p = tiny
    ids = prompt(11, seed=4)
    ref = hf_greedy(m, ids, NEW)
    for mode, kind in (("auto", "pinned_host"), ("device", "device")):
        e = Engine(cfg, p, max_seq_len=MAX, cache_dir=tmp_path, prefill_buckets=(16,), compile_sampling=False)
        e.close()
        e = Engine(cfg, p, max_seq_len=MAX, cache_dir=tmp_path, prefill_buckets=(16,), compile_sampling=False,
                   options=KernelOptions(token_memory=mode))
        try:
            rt = e.runtime
            assert rt.stats()["token_memory"] == (None if mode == "device" else "pinned_host")
            # the default's executables are on disk: the other memory's are compiled, not loaded
            assert (rt.stats()["cache_hits"], rt.stats()["compiles"] > 0) == ((2, False) if mode == "auto" else
                                                                                (0, True))
            state, tok = rt.prefill(rt.state, ids, request=(0, 0.0, None, None))
            assert tok.sharding.memory_kind == kind
            state, tok2 = rt.decode(state, rt.decode_spec(len(ids), False))
            assert tok2.sharding.memory_kind == kind and int(tok) == ref[0] and int(tok2) == ref[1]
            rt.state = state
            assert generate(e, ids, max_new_tokens=NEW, ignore_eos=True).token_ids == ref
        finally:
            e.close()


def test_source_digest_covers_every_traced_module():
    """The executables' key hashes the source of every package module that the traced code reaches (a cached
    executable compiled from older code of any of them must not be loaded): the closure of the modules
    model.py and runtime.py's step functions import, within hybrid_jax."""
    import ast
    import importlib
    from pathlib import Path

    from hybrid_jax import runtime

    pkg = Path(runtime.__file__).parent
    hashed = {m.__name__.split(".")[-1] for m in runtime.TRACED_MODULES}
    todo, seen = ["model", "speculative", "sampling", "kv_cache"], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse((pkg / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
                todo += [n for n in names if (pkg / f"{n}.py").exists() and n not in ("config",)]
    missing = seen - hashed
    assert not missing, f"modules traced but not in runtime.TRACED_MODULES: {sorted(missing)}"
    assert importlib.import_module("hybrid_jax.quant") in runtime.TRACED_MODULES
