"""The GPU's steps lower for CUDA on this CPU machine: every Pallas kernel goes through the Triton lowering that
runs on the GPU, which the interpreter used by the other tests does not check (it takes arrays of any shape,
Triton only powers of 2). The shapes are the real models' (SmolLM2-135M's 576 inputs = 18 blocks of 32, LLaMA-2
7B's 11008, LLaMA-3's GQA) with two layers; the options are what `options.resolve` picks on one GPU."""
import dataclasses

import jax
import jax.numpy as jnp
import pytest

from hybrid_jax import kv_cache, options as options_lib, runtime, weights
from hybrid_jax.config import LlamaConfig
from hybrid_jax.sampling import SamplingParams

SHAPES = {  # the real models' dimensions, two layers
    "smollm2-135m": dict(vocab_size=49152, dim=576, n_heads=9, n_kv_heads=3, ffn_dim=1536, tie_embeddings=True),
    "llama2-7b": dict(vocab_size=32000, dim=4096, n_heads=32, n_kv_heads=32, ffn_dim=11008),
    "llama3-8b": dict(vocab_size=128256, dim=4096, n_heads=32, n_kv_heads=8, ffn_dim=14336),
}
CASES = [("smollm2-135m", q) for q in (None, "int8", "int8-g32", "int4-g32-asym", "int4-g32-sym")] + \
    [("llama2-7b", None), ("llama2-7b", "int4-g32-asym"), ("llama3-8b", "int8")]


class _GPU:  # what options.resolve reads of a device
    platform = "gpu"

    def addressable_memories(self):
        return []


def _abstract_state(cfg, cache_len):
    i32, f32 = jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.float32)
    return runtime.DecodeState(cache=kv_cache.abstract(cfg, cache_len), pos=i32, token=i32,
                               key=jax.ShapeDtypeStruct((2,), jnp.uint32), sp=SamplingParams(f32, i32, f32),
                               hist=jax.ShapeDtypeStruct((cache_len,), jnp.int32))


def _lower(fn, *args):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("shape,quant,options", [c + (None,) for c in CASES] + [
    ("smollm2-135m", "int8", options_lib.KernelOptions(quant_prefill="xla")),
    ("llama2-7b", None, options_lib.KernelOptions(chunk_attention="xla")),
    ("smollm2-135m", None, options_lib.KernelOptions(chunk_attention="xla"))])
def test_steps_lower_for_cuda(shape, quant, options):
    cfg = LlamaConfig(n_layers=2, dtype="bfloat16", quant=quant, **SHAPES[shape])
    opts = options_lib.resolve(options, cfg, [_GPU()], None)
    assert opts.gemv == "pallas" and opts.decode_attention == "pallas"
    stub = dataclasses.make_dataclass("Stub", ["options", "cfg", "mesh"])(opts, cfg, None)
    cache_len = 512
    p, s = weights.abstract(cfg), _abstract_state(cfg, cache_len)
    hlo = []
    for kvb in (256, cache_len):
        o = runtime.Runtime.step_options(stub, ("decode", kvb, False))
        hlo.append(_lower(lambda p, s: runtime._decode_step(cfg, kvb, True, p, s, o), p, s).as_text())
    for T in (16, 128):  # below and at the fused attention's smallest bucket
        o = runtime.Runtime.step_options(stub, ("prefill", T, cache_len))
        req = jax.ShapeDtypeStruct((T + runtime.REQ_FIELDS,), jnp.int32)
        hlo.append(_lower(lambda p, s, r: runtime._prefill_step(cfg, cache_len, p, s, r, o), p, s, req).as_text())
    o = runtime.Runtime.step_options(stub, ("verify", cache_len, 4, False))
    hlo.append(_lower(lambda p, s: runtime._verify_step(cfg, cache_len, 4, False, p, s, o), p, s).as_text())
    # the decode steps' kernels are in the programs (as Triton calls), not replaced by XLA's path
    assert all("__gpu$xla.gpu.triton" in h for h in hlo[:2])
    if quant:
        assert "qgemv_" in hlo[0]
    # a quantized prefill's products: qgemv.gemm in the 16-row bucket, XLA's matmuls in the 128-row one (and
    # everywhere when quant_prefill is "xla")
    assert ("qgemm" in hlo[2]) == (quant is not None and options is None) and "qgemm" not in hlo[3]
    # a chunk over the cache (a prefill over the whole cache) attends through the chunk kernel unless XLA's
    # attention is named
    chunk = opts.chunk_attention == "pallas"
    assert all(("chunk_attention_l0" in h) == chunk for h in hlo[2:4]) and "chunk_attention" not in hlo[0]
    # a verify step's K + 1 rows: a chunk over the cache
    assert ("chunk_attention_l0" in hlo[4]) == chunk
