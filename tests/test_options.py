"""The kernel options (hybrid_jax/options.py): resolving "auto" per device, mesh and config; validation that
names the field or the variable; the environment read by `from_env` only; the options in the executables'
key and as a jit static argument."""
from __future__ import annotations

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.config import LlamaConfig
from hybrid_jax.options import FUSED_MIN_ROWS, ROW_REDUCE_AUTO, KernelOptions, resolve

BF16 = LlamaConfig(vocab_size=64, dim=256, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64)  # head dim 128
CPU = jax.devices("cpu")[:1]


def gpu(*kinds):
    """A stand-in for one GPU with these memory kinds."""
    mems = [types.SimpleNamespace(kind=k) for k in kinds or ("device", "pinned_host")]
    return [types.SimpleNamespace(platform="gpu", addressable_memories=lambda: mems)]


def mesh2():
    return jax.sharding.Mesh(np.array(jax.devices("cpu")[:2]), ("tp",))


def test_resolve_on_the_cpu_takes_the_xla_paths():
    o = resolve(None, BF16, CPU, None)
    assert o.resolved and o == resolve(KernelOptions(), BF16, CPU, None)
    assert (o.gemv, o.decode_attention, o.prefill_wo, o.prefill_attention) == ("xla", "xla", "xla", "off")
    assert o.row_reduce == frozenset() and o.matmul_2d is True  # the CPU's matmul library takes the 2-D form
    assert o.prefill_matmuls == "split" and o.prefill_attention_min_rows == FUSED_MIN_ROWS == 128
    assert o.token_memory == "pinned_host"  # jax's CPU devices have it too


def test_resolve_on_one_gpu_takes_the_kernels():
    o = resolve(None, BF16, gpu(), None)
    assert (o.gemv, o.decode_attention, o.prefill_wo, o.prefill_attention) == ("pallas", "pallas", "pallas", "cudnn")
    assert o.row_reduce == ROW_REDUCE_AUTO == {"wqkv", "wo", "w13"} and o.matmul_2d is False
    assert o.prefill_attention_min_rows == 128 and o.prefill_matmuls == "split" and o.token_memory == "pinned_host"
    assert o.chunk_attention == "pallas"
    assert resolve(KernelOptions(chunk_attention="xla"), BF16, gpu(), None).chunk_attention == "xla"
    assert resolve(KernelOptions(decode_attention="xla"), BF16, gpu(), None).chunk_attention == "xla"
    assert resolve(KernelOptions(gemv="interpret"), BF16, CPU, None).chunk_attention == "xla"
    assert resolve(None, BF16, gpu("device"), None).token_memory == "device"  # no pinned host memory
    # cuDNN's fused attention: 16-bit, head dim a multiple of 8 up to 128
    assert resolve(None, BF16.replace(dtype="float32"), gpu(), None).prefill_attention == "off"
    assert resolve(None, BF16.replace(n_heads=1), gpu(), None).prefill_attention == "off"
    # a named field wins; the others follow from it
    o = resolve(KernelOptions(gemv="xla"), BF16, gpu(), None)
    assert (o.gemv, o.decode_attention, o.prefill_wo, o.row_reduce) == ("xla", "xla", "xla", frozenset())
    o = resolve(KernelOptions(gemv="interpret"), BF16, CPU, None)
    assert (o.decode_attention, o.prefill_wo, o.row_reduce) == ("interpret", "interpret", frozenset())
    o = resolve(KernelOptions(row_reduce={"w13", "w2"}, decode_attention="xla", prefill_wo=None), BF16, gpu(), None)
    assert (o.row_reduce, o.decode_attention, o.prefill_wo) == ({"w13", "w2"}, "xla", "xla")
    assert resolve(KernelOptions(prefill_attention="xla"), BF16, CPU, None).prefill_attention_min_rows == 0
    assert resolve(KernelOptions(prefill_attention_min_rows=0), BF16, gpu(), None).prefill_attention_min_rows == 0
    assert resolve(KernelOptions(prefill_attention=None, token_memory=None), BF16, gpu(), None).token_memory == "device"


def test_resolve_with_a_mesh():
    m = mesh2()
    devs = list(m.devices.flat)
    o = resolve(None, BF16, devs, m)
    assert (o.gemv, o.decode_attention, o.prefill_wo, o.prefill_attention, o.token_memory) == \
        ("xla", "xla", "xla", "off", "device")
    assert resolve(None, BF16, gpu() * 2, m).gemv == "xla"  # GPUs in a mesh: XLA's (SPMD-partitioned) path
    for kw, field in ((dict(gemv="xla", decode_attention="interpret"), "decode_attention"),
                      (dict(gemv="xla", prefill_wo="pallas"), "prefill_wo"),
                      (dict(prefill_attention="cudnn"), "prefill_attention"),
                      (dict(token_memory="pinned_host"), "token_memory"), (dict(quant_prefill="pallas"), "quant_prefill")):
        with pytest.raises(ValueError, match=f"{field}=.*tensor_parallel"):
            resolve(KernelOptions(**kw), BF16, devs, m)
    # named kernels run per shard inside shard_map (model._layers_on_shards): gemv's, the attention's, the prefill's
    o = resolve(KernelOptions(gemv="pallas"), BF16, devs, m)
    assert (o.gemv, o.decode_attention, o.prefill_wo, o.row_reduce) == ("pallas", "pallas", "pallas", ROW_REDUCE_AUTO)
    assert o.chunk_attention == "xla"  # the chunk kernel is timed on one GPU only
    assert resolve(KernelOptions(prefill_attention="xla"), BF16, devs, m).prefill_attention == "xla"


@pytest.mark.parametrize("field, value", [("gemv", "cuda"), ("decode_attention", "flash"), ("prefill_wo", "cublas"),
                                          ("prefill_attention", "flash"), ("prefill_matmuls", "fast"),
                                          ("token_memory", "host"), ("row_reduce", "w13"), ("row_reduce", {"mlp"}),
                                          ("matmul_2d", "yes"), ("prefill_attention_min_rows", -1),
                                          ("prefill_attention_min_rows", 1.5)])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        KernelOptions(**{field: value})
    with pytest.raises(TypeError, match="KernelOptions"):
        resolve({"gemv": "xla"}, BF16, CPU, None)


VARS = {  # variable, value -> the options it gives
    ("HYBRID_JAX_GEMV", "xla"): KernelOptions(gemv="xla"),
    ("HYBRID_JAX_GEMV", "PALLAS"): KernelOptions(gemv="pallas"),
    ("HYBRID_JAX_DECODE_ATTN", "xla"): KernelOptions(decode_attention="xla"),
    ("HYBRID_JAX_DECODE_ATTN", "pallas"): KernelOptions(),  # where the GEMVs run: the default
    ("HYBRID_JAX_ROW_REDUCE", "none"): KernelOptions(row_reduce=frozenset()),
    ("HYBRID_JAX_ROW_REDUCE", " w13, w2 "): KernelOptions(row_reduce={"w13", "w2"}),
    ("HYBRID_JAX_ROW_REDUCE", "auto"): KernelOptions(),
    ("HYBRID_JAX_PREFILL_WO", "xla"): KernelOptions(prefill_wo="xla"),
    ("HYBRID_JAX_CHUNK_ATTN", "pallas"): KernelOptions(chunk_attention="pallas"),
    ("HYBRID_JAX_PREFILL_ATTN", "off"): KernelOptions(prefill_attention="off"),
    ("HYBRID_JAX_PREFILL_ATTN", "all"): KernelOptions(prefill_attention_min_rows=0),
    ("HYBRID_JAX_PREFILL_MATMULS", "cublas"): KernelOptions(prefill_matmuls="cublas"),
    ("HYBRID_JAX_PREFILL_MATMULS", "autotune"): KernelOptions(prefill_matmuls="autotune"),
    ("HYBRID_JAX_TOKEN_MEMORY", "device"): KernelOptions(token_memory="device"),
}


@pytest.mark.parametrize("var, value", list(VARS), ids=[f"{k}={v.strip()}" for k, v in VARS])
def test_from_env_maps_each_variable(var, value, monkeypatch):
    monkeypatch.setenv(var, value)
    assert KernelOptions.from_env() == VARS[(var, value)]
    assert KernelOptions.from_env({var: value}) == VARS[(var, value)]  # or from a mapping


@pytest.mark.parametrize("var, value", [("HYBRID_JAX_GEMV", "fast"), ("HYBRID_JAX_DECODE_ATTN", "flash"),
                                        ("HYBRID_JAX_ROW_REDUCE", "w13,mlp"), ("HYBRID_JAX_PREFILL_WO", "cublas"),
                                        ("HYBRID_JAX_PREFILL_ATTN", "fast"), ("HYBRID_JAX_PREFILL_MATMULS", "fast"),
                                        ("HYBRID_JAX_TOKEN_MEMORY", "gpu"), ("HYBRID_JAX_PREFILL_GEMM", "pallas"),
                                        ("HYBRID_JAX_VERIFY_ROWS", "exact")])
def test_from_env_rejects_bad_values_naming_the_variable(var, value):
    with pytest.raises(ValueError, match=var):
        KernelOptions.from_env({var: value})


def test_from_env_unset_is_the_default():
    assert KernelOptions.from_env({}) == KernelOptions()


@pytest.fixture(scope="module")
def tiny_engine_args():
    from hybrid_jax import weights as W
    cfg = LlamaConfig(vocab_size=128, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=96, dtype="float32")
    return cfg, W.init_random(cfg, jax.random.PRNGKey(0))


def _runtime(cfg, params, **kw):
    from hybrid_jax.runtime import Runtime
    return Runtime(cfg, params, 32, prefill_buckets=(16,), use_disk_cache=False, compile_sampling=False, **kw)


def test_library_does_not_read_the_environment(tiny_engine_args, monkeypatch):
    cfg, params = tiny_engine_args
    for var, value in (("HYBRID_JAX_GEMV", "pallas"), ("HYBRID_JAX_PREFILL_MATMULS", "cublas"),
                       ("HYBRID_JAX_TOKEN_MEMORY", "device"), ("HYBRID_JAX_PREFILL_ATTN", "off")):
        monkeypatch.setenv(var, value)
    rt = _runtime(cfg, params)
    try:
        assert rt.options == resolve(None, cfg, CPU, None)
        assert rt.options.gemv == "xla" and rt.options.prefill_matmuls == "split"
        assert rt.options.token_memory == "pinned_host"
        assert rt.stats()["options"] == rt.options.to_dict()
    finally:
        rt.close()
    # only where the caller asks for it
    env = KernelOptions.from_env()
    assert resolve(env, cfg, CPU, None).prefill_matmuls == "cublas"
    assert resolve(env, cfg, CPU, None).token_memory == "device"


def test_options_are_in_the_executables_key(tiny_engine_args):
    cfg, params = tiny_engine_args
    rt = _runtime(cfg, params, options=KernelOptions(token_memory="device"))
    try:
        assert rt.options.token_memory == "device" and rt.stats()["token_memory"] is None
        dec, pre = rt.decode_spec(1, False), ("prefill", 16, 16)
        keys = {s: rt.cache_key(s) for s in (dec, pre)}
        assert keys[dec]["options"] == rt.step_options(dec).to_dict()
        base = rt.options
        for kw in (dict(matmul_2d=False), dict(gemv="interpret"), dict(decode_attention="interpret"),
                   dict(token_memory="pinned_host")):
            rt.options = base.replace(**kw)
            assert rt.cache_key(dec) != keys[dec] and rt.cache_key(pre) != keys[pre], kw
        for kw in (dict(prefill_wo="interpret"), dict(prefill_attention="xla", prefill_attention_min_rows=0),
                   dict(prefill_matmuls="cublas")):  # the prefill's choices: not in the decode step's key
            rt.options = base.replace(**kw)
            assert rt.cache_key(dec) == keys[dec] and rt.cache_key(pre) != keys[pre], kw
        rt.options = base.replace(prefill_matmuls="autotune")  # what "split" compiles a 16-row bucket with
        assert rt.cache_key(pre) == keys[pre]
    finally:
        rt.close()


def test_options_are_hashable_and_a_jit_static_argument():
    a = resolve(None, BF16, CPU, None)
    b = dataclasses.replace(a)
    assert a == b and hash(a) == hash(b) and len({a, b, a.replace(gemv="interpret")}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.gemv = "pallas"
    assert KernelOptions(row_reduce=["w2"]).row_reduce == frozenset({"w2"})  # any iterable: frozen
    traces = []

    def f(x, opts):
        traces.append(opts)
        return x * 2 if opts.matmul_2d else x + 1

    g = jax.jit(f, static_argnums=1)
    x = jnp.ones(3)
    assert float(g(x, a)[0]) == 2.0 and float(g(x, b)[0]) == 2.0 and len(traces) == 1  # equal options: one trace
    assert float(g(x, a.replace(matmul_2d=False))[0]) == 2.0 and len(traces) == 2


def test_quantized_model_options():
    """A quantized model: on one GPU every decode product through the kernel over the codes (qgemv.py, the measured
    path; XLA's reductions, where named, in the row-sum form); the CPU XLA's grouped form; both named fields can be
    overridden."""
    q = BF16.replace(quant="int8")
    o = resolve(None, q, gpu(), None)
    assert o.row_reduce == frozenset() and o.quant_matvec == "rowsum"
    assert resolve(None, BF16, gpu(), None).row_reduce == frozenset({"wqkv", "wo", "w13"})
    assert resolve(KernelOptions(row_reduce=("wo",)), q, gpu(), None).row_reduce == frozenset({"wo"})
    assert resolve(None, q, CPU, None).quant_matvec == "grouped"
    assert resolve(KernelOptions(quant_matvec="rowsum"), q, CPU, None).quant_matvec == "rowsum"
    assert KernelOptions.from_env({"HYBRID_JAX_QUANT_MATVEC": "grouped"}).quant_matvec == "grouped"
    with pytest.raises(ValueError, match="quant_matvec must be"):
        KernelOptions(quant_matvec="fast")
