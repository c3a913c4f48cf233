"""Tensor parallelism on 8 virtual CPU devices (conftest sets --xla_force_host_platform_device_count=8):
TP = 1, 2, 4, 8 give TP=1's logits and HF's greedy ids; restore lands in shards; bad N is refused; no
recompilation; a psum across two JAX processes (the multi-host path) on one machine; bench/probes/tp_check.py
(sharded random init, one process per TP) on the tiny model."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hybrid_jax
from conftest import hf_params, make_hf_model, rel_err
from hybrid_jax import checkpoint, model, sharding
from hybrid_jax import weights as W
from hybrid_jax.config import LlamaConfig
from hybrid_jax.engine import Engine, generate
from hybrid_jax.options import KernelOptions

if len(jax.devices()) < 8:
    pytest.fail(f"needs 8 devices, got {len(jax.devices())}: XLA_FLAGS must hold "
                "--xla_force_host_platform_device_count=8 before jax is imported (tests/conftest.py sets it)",
                pytrace=False)

MAX = 40  # buckets 16, 32, 40
NEW = 8
CONFIGS = {  # name: (make_hf_model args, TP degrees)
    "mha8": (dict(variant="mha", num_attention_heads=8, num_key_value_heads=8), (1, 2, 4, 8)),
    # GQA, tied embeddings (the logits come from the replicated embed), head dim 8
    "gqa16_tied": (dict(variant="tied", hidden_size=128, num_attention_heads=16, num_key_value_heads=4), (1, 2, 4)),
}
PROMPTS = ([5, 17, 33, 90, 12, 7, 44, 3, 9, 100], [int(t) for t in np.random.RandomState(0).randint(3, 160, 23)])


def hf_greedy(m, ids, n):
    out = m.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                     pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def models():
    out = {}
    for name, (kw, _) in CONFIGS.items():
        kw = dict(kw)
        m = make_hf_model(kw.pop("variant"), seed=11, **kw)
        cfg = LlamaConfig.from_hf(m.config.to_dict(), dtype="float32")
        out[name] = (m, cfg, hf_params(m, cfg), [hf_greedy(m, p, NEW) for p in PROMPTS])
    return out


@pytest.fixture(scope="module")
def tp1_logits(models):
    out = {}
    for name, (_, cfg, p, _) in models.items():
        e = Engine(cfg, p, max_seq_len=MAX, use_disk_cache=False, compile_sampling=False)
        out[name] = e.logits(PROMPTS[1])
        e.close()
    return out


@pytest.mark.parametrize("name, tp", [(n, tp) for n, (_, tps) in CONFIGS.items() for tp in tps])
def test_tp_matches_tp1_and_hf(models, tp1_logits, name, tp, tmp_path):
    m, cfg, p, ref_ids = models[name]
    e = Engine(cfg, p, max_seq_len=MAX, cache_dir=tmp_path, tensor_parallel=tp, compile_sampling=False)
    try:
        if tp > 1:
            assert e.runtime.params.layers.wqkv.sharding.spec == sharding.PARAM_SPECS["wqkv"]
            assert e.runtime.state.cache.k.sharding.spec == sharding.CACHE_SPEC
            assert len(e.runtime.params.layers.w2.addressable_shards) == tp
        # float32, same math; only the all-reduce's summation order differs (measured ~3e-7)
        assert rel_err(e.logits(PROMPTS[1]), tp1_logits[name]) < 1e-5
        for ids, ref in zip(PROMPTS, ref_ids):  # 10 tokens: one chunk; 23: two chunks of the smallest bucket
            assert generate(e, ids, max_new_tokens=NEW, ignore_eos=True).token_ids == ref
    finally:
        e.close()


KERNELS = KernelOptions(gemv="interpret", decode_attention="interpret")  # Pallas' interpreter: the GPU's kernels


@pytest.mark.parametrize("name, tp", [("mha8", 2), ("mha8", 4), ("gqa16_tied", 2), ("gqa16_tied", 4)])
def test_kernels_on_shards_match_tp1_and_hf(models, name, tp, tmp_path):
    """With the kernels named, each device runs them on its shard inside shard_map and the output and down
    projections' partial sums are psum'd: a chunk's and a decode step's logits equal one device's, and greedy ids
    HF's (one chunk and two), through the engine."""
    m, cfg, p, ref_ids = models[name]
    e = Engine(cfg, p, max_seq_len=MAX, cache_dir=tmp_path, tensor_parallel=tp, compile_sampling=False,
               options=KERNELS)
    try:
        for ids, ref in zip(PROMPTS, ref_ids):
            assert generate(e, ids, max_new_tokens=NEW, ignore_eos=True).token_ids == ref
        rt, ids = e.runtime, PROMPTS[1]
        n = len(ids) - 1
        chunk_o, step_o = rt.step_options(("prefill", 32, rt.cache_len)), rt.step_options(("decode", rt.cache_len, False))

        def run(params, cache, o, toks, start):
            f = jax.jit(lambda p, c: model.forward(cfg, p, c, jnp.asarray(toks, jnp.int32),
                                                   start + jnp.arange(len(toks), dtype=jnp.int32), opts=o))
            return f(params, cache), f
        one = Engine(cfg, p, max_seq_len=MAX, use_disk_cache=False, compile_sampling=False)
        c1 = one.runtime.state.cache
        (ref_chunk, c1), _ = run(one.runtime.params, c1, None, ids[:n], 0)
        (ref_step, _), _ = run(one.runtime.params, c1, None, ids[n:], n)
        one.close()
        with jax.set_mesh(e.mesh):
            (lg, c), f = run(rt.params, rt.state.cache, chunk_o, ids[:n], 0)
            assert rel_err(lg, ref_chunk) < 1e-5
            (lg, _), f = run(rt.params, c, step_o, ids[n:], n)
            assert rel_err(lg, ref_step) < 1e-5
            jaxpr = str(jax.make_jaxpr(f)(rt.params, c))
        assert "shard_map" in jaxpr and jaxpr.count("pallas_call") >= 2 * cfg.n_layers
    finally:
        e.close()


def test_sharded_restore_and_load(models, tmp_path):
    m, cfg, p, ref_ids = models["mha8"]
    path = checkpoint.save(tmp_path / "ckpt", cfg, jax.tree.map(np.asarray, W.to_dict(p)))
    n = 4
    mesh = sharding.mesh(n)
    _, got = checkpoint.restore(path, sharding_fn=sharding.sharding_fn(mesh))
    split = {"wqkv": 1, "wo": 2, "w13": 2, "w2": 2, "lm_head": 1}  # the axis each tensor is split on
    flat = dict(W.to_dict(got), **W.to_dict(got)["layers"])
    flat.pop("layers")
    for name, arr in flat.items():
        spec = sharding.PARAM_SPECS.get(name, jax.sharding.PartitionSpec())
        assert arr.sharding.spec == spec and arr.sharding.mesh == mesh, name
        assert {s.device for s in arr.addressable_shards} == set(jax.devices()[:n]), name
        want = list(arr.shape)
        if name in split:
            want[split[name]] //= n
        for s in arr.addressable_shards:
            assert s.data.shape == tuple(want), (name, s.data.shape)
    np.testing.assert_array_equal(np.asarray(got.layers.wqkv), np.asarray(p.layers.wqkv))

    e = hybrid_jax.load(path, tensor_parallel=n, max_seq_len=MAX, use_disk_cache=False, compile_sampling=False)
    try:
        assert e.runtime.params.lm_head.sharding.spec == sharding.PARAM_SPECS["lm_head"]
        assert generate(e, PROMPTS[0], max_new_tokens=NEW, ignore_eos=True).token_ids == ref_ids[0]
    finally:
        e.close()


def test_bad_tensor_parallel_is_refused(models):
    _, cfg, p, _ = models["gqa16_tied"]  # 4 kv heads
    with pytest.raises(ValueError, match=r"tensor_parallel=8 does not divide n_kv_heads=4"):
        Engine(cfg, p, max_seq_len=MAX, tensor_parallel=8)
    with pytest.raises(ValueError, match=r"ffn_dim=102"):
        sharding.check(cfg.replace(ffn_dim=102), 4)
    with pytest.raises(ValueError, match=r"needs 16 devices but only 8"):
        sharding.mesh(16)
    with pytest.raises(ValueError, match=r"integer >= 1"):
        sharding.check(cfg, 0)
    with pytest.raises(ValueError, match=r"decode_attention='interpret' with tensor_parallel > 1 runs inside shard_map"):
        Engine(cfg, p, max_seq_len=MAX, tensor_parallel=2, options=KernelOptions(gemv="xla", decode_attention="interpret"))
    with pytest.raises(ValueError, match=r"token_memory='pinned_host' runs on one device"):
        Engine(cfg, p, max_seq_len=MAX, tensor_parallel=2, options=KERNELS.replace(token_memory="pinned_host"))


def test_no_recompilation_tp2_and_warm_exec_cache(models, compile_counter, tmp_path):
    m, cfg, p, ref_ids = models["mha8"]
    e = Engine(cfg, p, max_seq_len=MAX, cache_dir=tmp_path, tensor_parallel=2)
    try:
        e.warmup()
        generate(e, PROMPTS[0], max_new_tokens=4, temperature=0.8, seed=1, ignore_eos=True)
        e.runtime.wait_background()
        before, compiles = compile_counter.n, e.stats()["compiles"]
        steps = 0
        for i in range(12):
            n = [1, 3, 16, 17, 30, 33][i % 6]
            ids = [int(t) for t in np.random.RandomState(i).randint(3, 160, n)]
            r = generate(e, ids, max_new_tokens=min(7, MAX - n), temperature=0.7 * (i % 2), seed=i, ignore_eos=True)
            steps += len(r.token_ids)
        steps += len(generate(e, [7], max_new_tokens=MAX - 1, ignore_eos=True).token_ids)
        assert steps >= 100
        assert compile_counter.n == before, "a compile happened inside a request"
        assert e.stats()["compiles"] == compiles
    finally:
        e.close()
    # The same mesh in a new engine: every executable comes from the disk cache.
    e2 = Engine(cfg, p, max_seq_len=MAX, cache_dir=tmp_path, tensor_parallel=2, compile_sampling=False)
    try:
        assert generate(e2, PROMPTS[0], max_new_tokens=NEW, ignore_eos=True).token_ids == ref_ids[0]
        assert e2.stats()["compiles"] == 0 and e2.stats()["cache_hits"] >= 2
    finally:
        e2.close()


PSUM_CHILD = textwrap.dedent("""
    import os, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=sys.argv[2], num_processes=2, process_id=int(sys.argv[1]))
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.array(jax.devices()), ("tp",))
    assert jax.process_count() == 2 and len(jax.devices()) == 2 and len(jax.local_devices()) == 1
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("tp")),
                                               np.full((1,), jax.process_index() + 1.0, np.float32), (2,))
    psum = jax.jit(jax.shard_map(lambda a: jax.lax.psum(a, "tp"), mesh=mesh, in_specs=P("tp"), out_specs=P()))
    print("PSUM", float(psum(x).addressable_data(0)[0]), flush=True)
    jax.distributed.shutdown()
""")


def test_psum_across_two_processes():
    """The multi-host wiring of sharding.py's docstring, on one machine: 2 processes, 1 CPU device each."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    procs = [subprocess.Popen([sys.executable, "-c", PSUM_CHILD, str(i), f"localhost:{port}"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "PSUM 3.0" in out, err[-3000:]


def _tp_check_module():
    from bench.probes import tp_check
    return tp_check


def test_tp_check_random_weights_are_made_in_their_shards():
    """bench/probes/tp_check.py draws random weights straight into their TP shards, the same values at every TP."""
    mod = _tp_check_module()
    cfg = LlamaConfig(vocab_size=96, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=48, dtype="float32")
    # blocks of at most 512 elements: whole rows of axis 0 (embed, lm_head), within a layer rows of the first
    # axis not split over the devices (wqkv: axis 2, its kv-head axis 1 whole; w13: axis 1; wo, w2: axis 1)
    one = mod.sharded_random(cfg, 1, jax.random.PRNGKey(3), chunk_elems=512)
    two = mod.sharded_random(cfg, 2, jax.random.PRNGKey(3), chunk_elems=512)
    target = sharding.sharding_fn(sharding.mesh(2))
    for name, a in dict(W.to_dict(two), **W.to_dict(two)["layers"]).items():
        if name != "layers":
            assert a.sharding.is_equivalent_to(target(name, a.shape), a.ndim), name
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for w in np.asarray(two.layers.w13), np.asarray(two.embed):  # random, a different draw per block
        assert 0.015 < np.std(w) < 0.025 and abs(np.mean(w)) < 0.002
        rows = w.reshape(-1, w.shape[-1])
        assert not np.allclose(w[0], w[1]) and not np.allclose(rows[0, :8], rows[0, 8:16])
        assert not np.allclose(rows[0], rows[1])
    assert abs(np.mean(np.asarray(two.layers.attn_norm)) - 1) < 0.02
    assert mod.shard_bytes(two, jax.devices()[0]) == mod.estimate_bytes_per_gpu(cfg, 2) < cfg.weight_bytes


def test_tp_check_script_runs_on_cpu(tmp_path):
    """The whole script (floors, one process per TP degree, summary) on the tiny model; a bad TP is recorded."""
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "bench.probes.tp_check",
                        "--shape", "tiny", "--tp", "1,2,3", "--out", str(out), "--reps", "2", "--lengths", "10,20",
                        "--new-tokens", "6", "--pipelined-steps", "10", "--floor-bytes", str(2**22)],
                       capture_output=True, text=True, timeout=300, cwd=os.path.join(os.path.dirname(__file__), ".."))
    assert p.returncode == 0, p.stderr[-3000:]
    res = {r["tp"]: r for r in json.load(open(out / "summary.json"))["results"]}
    assert res[1]["status"] == res[2]["status"] == "ok" and res[3]["status"] == "error"
    assert "does not divide n_kv_heads" in res[3]["error"]
    for r in res[1], res[2]:
        assert r["engine_kept_weight_buffers"] and r["compiles_in_timed"] == 0 and r["tokens_match_first"]
        assert r["floor_ms"] > 0 and r["tpot_p50_ms"] > 0 and set(r["ttft_p50_ms"]) == {"10", "20"}
    assert res[2]["weight_bytes_per_gpu"] < res[1]["weight_bytes_per_gpu"]
    assert (out / "tp2.json").exists() and "| 2 | ok |" in (out / "summary.md").read_text()
    assert "| 2 | ok |" in p.stdout  # the table is printed last
