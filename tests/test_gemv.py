"""The decode step's matrix-vector kernels (hybrid_jax/gemv.py), run in Pallas' interpreter on the CPU:
the kernel against a float64 product for every tiling it may be given, the model's decode with the kernels
against HF transformers, and the runtime's choice of kernels."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import TINY_VARIANTS, hf_params, make_hf_model, rel_err
from hybrid_jax import gemv as G
from hybrid_jax import kv_cache, model
from hybrid_jax.config import LlamaConfig
from hybrid_jax.generate import Engine, generate
from hybrid_jax.runtime import resolve_attention, resolve_gemv


def ref_product(x, w, layer, transposed):
    m = np.asarray(w if layer is None else w[layer], np.float64)
    return np.asarray(x, np.float64) @ (m.T if transposed else m)


CASES = [  # (layers or None, kd, n, transposed, config or None for the default)
    (3, 256, 384, False, None),
    (3, 256, 384, False, G.GemvConfig(bn=128, bk=32, splits=4)),
    (2, 1376, 256, False, G.GemvConfig(bn=64, bk=32, splits=43)),  # 11008 / 8 rows: odd chunk counts
    (None, 128, 512, True, None),
    (None, 512, 96, True, G.GemvConfig(bn=32, bk=64, splits=8)),
    (None, 64, 160, False, None),  # n = 32 * 5
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[1]}x{c[2]}{'t' if c[3] else ''}-{i}" for i, c in enumerate(CASES)])
def test_kernel_matches_float64(case, dtype):
    layers, kd, n, transposed, cfg = case
    rng = np.random.default_rng(kd * n)
    shape = (n, kd) if transposed else (kd, n)
    w = jnp.asarray(rng.standard_normal(((layers,) if layers else ()) + shape), dtype)
    x = jnp.asarray(rng.standard_normal(kd), dtype)
    layer = None if layers is None else layers - 1  # the last matrix: the layer offset must be applied
    got = G.gemv(x, w, layer, transposed=transposed, cfg=cfg, interpret=True)
    assert got.dtype == jnp.float32 and got.shape == (n,)
    # inputs are exact in float64; the kernel accumulates in float32
    assert rel_err(got, ref_product(x, w, layer, transposed)) < 1e-6
    if layers:  # and another layer gives another answer
        assert rel_err(G.gemv(x, w, 0, transposed=transposed, cfg=cfg, interpret=True),
                       ref_product(x, w, 0, transposed)) < 1e-6


def test_default_configs_tile_llama_shapes():
    for kd, n in [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096), (4096, 32000), (5120, 15360),
                  (13824, 5120), (576, 960), (1536, 576), (576, 3072)]:
        c = G.default_config(kd, n)
        assert c is not None and n % c.bn == 0 and kd % (c.splits * c.bk) == 0, (kd, n, c)
    c = G.default_config(576, 49152, transposed=True)  # SmolLM2's tied LM head
    assert c is not None and 49152 % c.bn == 0 and 576 % (c.splits * c.bk) == 0
    assert not G.supported(4096, 32001)  # odd vocabulary: XLA's fusion instead


def test_errors_name_the_problem():
    x = jnp.ones((64,), jnp.float32)
    with pytest.raises(ValueError, match="needs a layer index"):
        G.gemv(x, jnp.ones((2, 64, 64)), interpret=True)
    with pytest.raises(ValueError, match="unstacked"):
        G.gemv(x, jnp.ones((64, 64)), 0, interpret=True)
    with pytest.raises(ValueError, match=r"needs \(32,\)"):
        G.gemv(x, jnp.ones((32, 64)), interpret=True)
    with pytest.raises(ValueError, match="does not tile"):
        G.gemv(x, jnp.ones((64, 64)), cfg=G.GemvConfig(bn=64, bk=64, splits=2), interpret=True)


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_decode_with_kernels_equals_hf(variant):
    """Prefill through XLA, then token-by-token decode through the kernels: logits equal HF's full forward."""
    m = make_hf_model(variant)
    m.config._attn_implementation = "eager"
    cfg = LlamaConfig.from_hf(m.config.to_dict(), dtype="float32")
    p = hf_params(m, cfg)
    ids = [int(t) for t in np.random.RandomState(1).randint(3, cfg.vocab_size, size=12)]
    with torch.no_grad():
        ref = m(torch.tensor([ids])).logits[0].numpy()
    step = jax.jit(lambda p, c, t, pos: model.forward(cfg, p, c, t, pos, gemv="interpret", attn="interpret"))
    _, cache = model.forward(cfg, p, kv_cache.zeros(cfg, 16), jnp.asarray(ids[:8], jnp.int32),
                             jnp.arange(8, dtype=jnp.int32))
    for t in range(8, 12):
        lg, cache = step(p, cache, jnp.asarray(ids[t:t + 1], jnp.int32), jnp.asarray([t], jnp.int32))
        assert rel_err(lg[0], ref[t]) < 1e-4, t
    # the kernels were in the step (not a silent fallback to XLA's einsum)
    jaxpr = str(jax.make_jaxpr(lambda p, c: model.forward(cfg, p, c, jnp.asarray([1], jnp.int32),
                                                          jnp.asarray([3], jnp.int32), gemv="interpret",
                                                          attn="interpret"))(p, cache))
    assert jaxpr.count("pallas_call") == 5 * cfg.n_layers + 1


def test_runtime_with_kernels_greedy_equals_hf(tmp_path):
    m = make_hf_model("tied", seed=5)
    cfg = LlamaConfig.from_hf(m.config.to_dict(), dtype="float32")
    eng = Engine(cfg, hf_params(m, cfg), max_seq_len=40, cache_dir=tmp_path, prefill_buckets=(16, 40),
                 compile_sampling=False, gemv="interpret", decode_attention="interpret")
    try:
        assert eng.runtime.gemv == "interpret" and eng.stats()["gemv"] == "interpret"
        assert eng.stats()["decode_attention"] == "interpret"
        for n in (3, 17):
            ids = [int(t) for t in np.random.RandomState(n).randint(3, cfg.vocab_size, size=n)]
            ref = m.generate(torch.tensor([ids]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                             pad_token_id=0, eos_token_id=None)[0, n:].tolist()
            assert generate(eng, ids, max_new_tokens=6, ignore_eos=True).token_ids == ref
    finally:
        eng.close()


def test_resolve_gemv(monkeypatch):
    cpu = jax.devices("cpu")[:1]
    monkeypatch.delenv("HYBRID_JAX_GEMV", raising=False)
    assert resolve_gemv("auto", cpu, None) is None  # XLA off the GPU
    assert resolve_gemv("xla", cpu, None) is None
    assert resolve_gemv("interpret", cpu, None) == "interpret"
    monkeypatch.setenv("HYBRID_JAX_GEMV", "pallas")
    assert resolve_gemv("auto", cpu, None) == "pallas"
    monkeypatch.setenv("HYBRID_JAX_GEMV", "xla")
    assert resolve_gemv("auto", cpu, None) is None
    monkeypatch.setenv("HYBRID_JAX_GEMV", "fast")
    with pytest.raises(ValueError, match="HYBRID_JAX_GEMV"):
        resolve_gemv("auto", cpu, None)
    with pytest.raises(ValueError, match="gemv must be"):
        resolve_gemv("cuda", cpu, None)
    mesh = jax.sharding.Mesh(np.array(jax.devices("cpu")[:2]), ("tp",))
    with pytest.raises(ValueError, match="tensor_parallel"):
        resolve_gemv("pallas", cpu, mesh)
    monkeypatch.setenv("HYBRID_JAX_GEMV", "pallas")
    assert resolve_gemv("auto", cpu, mesh) is None  # a mesh keeps XLA's fusions


def test_resolve_attention(monkeypatch):
    monkeypatch.delenv("HYBRID_JAX_DECODE_ATTN", raising=False)
    assert resolve_attention("auto", "pallas", None) is None  # opt-in (slower at long contexts)
    assert resolve_attention("auto", None, None) is None
    assert resolve_attention("pallas", None, None) == "pallas"
    monkeypatch.setenv("HYBRID_JAX_DECODE_ATTN", "pallas")
    assert resolve_attention("auto", "pallas", None) == "pallas"  # where the matrix-vector kernels run
    assert resolve_attention("auto", None, None) is None
    assert resolve_attention("xla", "pallas", None) is None
    assert resolve_attention("interpret", None, None) == "interpret"
    monkeypatch.setenv("HYBRID_JAX_DECODE_ATTN", "xla")
    assert resolve_attention("auto", "pallas", None) is None
    monkeypatch.setenv("HYBRID_JAX_DECODE_ATTN", "flash")
    with pytest.raises(ValueError, match="HYBRID_JAX_DECODE_ATTN"):
        resolve_attention("auto", "pallas", None)
    with pytest.raises(ValueError, match="decode_attention must be"):
        resolve_attention("cudnn", None, None)
    mesh = jax.sharding.Mesh(np.array(jax.devices("cpu")[:2]), ("tp",))
    with pytest.raises(ValueError, match="tensor_parallel"):
        resolve_attention("pallas", None, mesh)


# ---- decode attention kernel ---------------------------------------------------------------------------

from hybrid_jax import decode_attention as A  # noqa: E402


@pytest.mark.parametrize("blocks", [None, 1, 2, 4])  # rows per program, in row blocks (None: the default)
@pytest.mark.parametrize("K,G,S,n", [(2, 1, 64, 1), (2, 2, 64, 17), (1, 3, 48, 48), (4, 1, 80, 33), (2, 4, 32, 31),
                                     (1, 1, 96, 65)])
def test_attention_kernel_equals_model_attention(K, G, S, n, blocks):
    """One token at position n-1 attending rows 0..n-1 of layer 1 of a stacked cache; rows past n hold
    garbage, which must not leak in."""
    rng = np.random.default_rng(K * 100 + G * 10 + n)
    Dh, L = 16, 3
    cfg = LlamaConfig(vocab_size=32, dim=K * G * Dh, n_layers=L, n_heads=K * G, n_kv_heads=K, ffn_dim=32)
    kc = jnp.asarray(rng.standard_normal((L, S, K, Dh)), jnp.float32)
    vc = jnp.asarray(rng.standard_normal((L, S, K, Dh)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((K, G, Dh)), jnp.float32)
    rows = None if blocks is None else blocks * A.block_rows(S)
    got = A.attend(q, kc, vc, 1, jnp.asarray([n], jnp.int32), rows_per_program=rows, interpret=True)
    ref = model.attention(cfg, q[None], kc[1], vc[1], jnp.asarray([n - 1], jnp.int32))[0]
    assert got.shape == (K, G, Dh)
    assert rel_err(got, ref) < 1e-5
    ref_trunc = model.attention(cfg, q[None], kc[1, :n], vc[1, :n], jnp.asarray([n - 1], jnp.int32))[0]
    assert rel_err(got, ref_trunc) < 1e-5


def test_attention_kernel_errors():
    assert A.supported(1040, 128) and A.block_rows(1040) == 16 and A.block_rows(1024) == 64
    assert A.partition_rows(1040, 32, 16) == 144  # 7B: 32 kv heads x 8 partitions
    assert A.partition_rows(1040, 3, 16) == 16  # SmolLM2: 3 kv heads x 65 partitions
    assert not A.supported(1041, 128) and not A.supported(1024, 96)
    with pytest.raises(ValueError, match="does not match"):
        A.attend(jnp.ones((2, 1, 16)), jnp.ones((1, 32, 4, 16)), jnp.ones((1, 32, 4, 16)), 0, jnp.asarray([1]))
    with pytest.raises(ValueError, match="multiple of the row block"):
        A.attend(jnp.ones((2, 1, 16)), jnp.ones((1, 64, 2, 16)), jnp.ones((1, 64, 2, 16)), 0, jnp.asarray([1]),
                 rows_per_program=24, interpret=True)
    with pytest.raises(ValueError, match="no kernel"):
        A.attend(jnp.ones((2, 1, 16)), jnp.ones((1, 33, 2, 16)), jnp.ones((1, 33, 2, 16)), 0, jnp.asarray([1]),
                 interpret=True)
