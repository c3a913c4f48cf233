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
from hybrid_jax import kv_cache, model, weights
from hybrid_jax.config import LlamaConfig
from hybrid_jax.engine import Engine, generate
from hybrid_jax.options import ROW_REDUCE_AUTO, KernelOptions

XLA = KernelOptions.xla(matmul_2d=True)  # resolved options: XLA's path, as on the CPU


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
    (2, 512, 384, True, None),  # the layers' layout: whole rows per program (the default tiling: no split)
    (3, 1376, 192, True, G.GemvConfig(bn=4, bk=32, splits=1)),  # 43 chunks a row
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


@pytest.mark.parametrize("case", [(3, 256, 384, False), (None, 128, 512, True), (2, 576, 192, False)])
def test_kernel_norm_and_partials(case):
    """`norm=` applies RMSNorm inside the kernel as model.rms_norm does (stacked or single weight);
    `reduce=False` returns partial sums that add up to the product."""
    layers, kd, n, transposed = case
    rng = np.random.default_rng(kd + n)
    shape = (n, kd) if transposed else (kd, n)
    w = jnp.asarray(rng.standard_normal(((layers,) if layers else ()) + shape) / np.sqrt(kd), jnp.float32)
    x = jnp.asarray(rng.standard_normal(kd) * 3, jnp.float32)
    nw = jnp.asarray(rng.standard_normal(((layers,) if layers else ()) + (kd,)), jnp.float32)
    layer = 1 if layers else None
    got = G.gemv(x, w, layer, transposed=transposed, norm=nw, eps=1e-5, interpret=True)
    h = model.rms_norm(x, nw[layer] if layers else nw, 1e-5)
    assert rel_err(got, ref_product(h, w, layer, transposed)) < 1e-5
    parts = G.gemv(x, w, layer, transposed=transposed, norm=nw, eps=1e-5, reduce=False, interpret=True)
    assert parts.shape == (G.default_config(kd, n, transposed).splits, n)
    assert rel_err(jnp.sum(parts, axis=0), got) < 1e-6
    # bf16 (XLA may keep the normalised x in float32 rather than round it: xla_allow_excess_precision)
    xb, nb, wb = x.astype(jnp.bfloat16), nw.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    got = G.gemv(xb, wb, layer, transposed=transposed, norm=nb, eps=1e-5, interpret=True)
    hb = model.rms_norm(xb, nb[layer] if layers else nb, 1e-5)
    assert rel_err(got, ref_product(np.asarray(hb, np.float32), np.asarray(wb, np.float32), layer, transposed)) < 1e-2
    with pytest.raises(ValueError, match="norm weight"):
        G.gemv(x, w, layer, transposed=transposed, norm=jnp.ones((kd + 1,)), interpret=True)


def test_default_configs_tile_llama_shapes():
    for kd, n in [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096), (4096, 32000), (5120, 15360),
                  (13824, 5120), (576, 960), (1536, 576), (576, 3072)]:
        c = G.default_config(kd, n)
        assert c is not None and n % c.bn == 0 and kd % (c.splits * c.bk) == 0, (kd, n, c)
    # the layer matrices (output-major) of the 7B (tuned), 13B, 70B and SmolLM2: whole rows, no split, so
    # the consumer runs in the kernel; gate/up's halves are whole row blocks (the gated epilogue)
    for kd, n in [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096), (5120, 15360), (5120, 5120),
                  (5120, 27648), (13824, 5120), (8192, 10240), (8192, 8192), (8192, 57344), (28672, 8192),
                  (576, 960), (576, 576), (576, 3072), (1536, 576)]:
        c = G.default_config(kd, n, transposed=True)
        assert c.splits == 1 and n % c.bn == 0 and kd % c.bk == 0 and (n // 2) % c.bn == 0, (kd, n, c)
        assert n // c.bn >= 128, (kd, n, c)  # programs enough to fill the GPU
    c = G.default_config(576, 49152, transposed=True)  # SmolLM2's tied LM head
    assert c is not None and 49152 % c.bn == 0 and 576 % (c.splits * c.bk) == 0
    assert not G.supported(4096, 32001)  # odd vocabulary: XLA's fusion instead


EPILOGUE_CASES = [  # (layers or None, kd, n, config or None): transposed W, or input-major with a split
    (2, 256, 384, True, None),  # in the kernel's epilogue
    (None, 512, 192, True, G.GemvConfig(bn=8, bk=64, splits=1)),
    (2, 256, 384, True, G.GemvConfig(bn=32, bk=64, splits=2)),  # split: XLA adds the partials, then finishes
    (2, 256, 384, False, None),
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", EPILOGUE_CASES, ids=[f"{c[1]}x{c[2]}{'t' if c[3] else ''}-{i}"
                                                      for i, c in enumerate(EPILOGUE_CASES)])
def test_epilogues_compute_the_consumer(case, dtype):
    """`residual=` returns residual + the product, `gated=True` silu(gate) * up over W's [gate; up] rows, each
    rounded as model.py's XLA ops round them (the residual add and mlp_block's silu x up), with a norm or
    without, whether in the kernel's epilogue or after XLA adds split partial sums."""
    layers, kd, n, transposed, cfg = case
    rng = np.random.default_rng(kd + 7 * n)
    shape = (n, kd) if transposed else (kd, n)
    w = jnp.asarray(rng.standard_normal(((layers,) if layers else ()) + shape) / np.sqrt(kd), dtype)
    x = jnp.asarray(rng.standard_normal(kd), dtype)
    res = jnp.asarray(rng.standard_normal(n), dtype)
    nw = jnp.asarray(1 + 0.1 * rng.standard_normal(kd), dtype)
    layer = None if layers is None else layers - 1
    for norm in (None, nw):
        h = x if norm is None else model.rms_norm(x, norm, 1e-5)
        y = jnp.asarray(ref_product(np.asarray(h, np.float32), np.asarray(w, np.float32), layer, transposed),
                        jnp.float32).astype(dtype)  # the product in the model's dtype, as XLA's einsum gives it
        kw = dict(transposed=transposed, cfg=cfg, norm=norm, eps=1e-5, interpret=True)
        got = G.gemv(x, w, layer, residual=res, **kw)
        assert got.dtype == x.dtype and got.shape == (n,)
        tol = 1e-6 if dtype == "float32" else 1e-2  # bf16: a sum's rounding may differ by one unit
        assert rel_err(got, res + y) < tol
        got = G.gemv(x, w, layer, gated=True, **kw)
        want = jax.nn.silu(y[: n // 2].astype(jnp.float32)).astype(dtype) * y[n // 2:]
        assert got.dtype == x.dtype and got.shape == (n // 2,)
        assert rel_err(got, want) < tol
    with pytest.raises(ValueError, match="residual has shape"):
        G.gemv(x, w, layer, transposed=transposed, residual=res[:-1], interpret=True)
    with pytest.raises(ValueError, match="not both"):
        G.gemv(x, w, layer, transposed=transposed, residual=res, gated=True, interpret=True)
    with pytest.raises(ValueError, match="reduce=True"):
        G.gemv(x, w, layer, transposed=transposed, gated=True, reduce=False, interpret=True)


def test_epilogue_runs_in_the_kernel():
    """An unsplit tiling of a transposed W computes the consumer in the kernel: one pallas_call, whose output
    is the consumer's (in x's dtype), and nothing after it."""
    w = jnp.ones((2, 256, 128), jnp.bfloat16)
    x = jnp.ones((128,), jnp.bfloat16)
    assert G.default_config(128, 256, transposed=True).splits == 1
    for kw in (dict(residual=jnp.ones((256,), jnp.bfloat16)), dict(gated=True)):
        jaxpr = jax.make_jaxpr(lambda x, w: G.gemv(x, w, 1, transposed=True, interpret=True, **kw))(x, w)
        assert len(jaxpr.eqns) == 1 and jaxpr.eqns[0].primitive.name == "pallas_call", jaxpr
        assert jaxpr.out_avals[0].dtype == jnp.bfloat16


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
    with pytest.raises(ValueError, match="does not tile"):  # the unsplit kernel with an epilogue checks it too
        G.gemv(x, jnp.ones((96, 64)), transposed=True, cfg=G.GemvConfig(bn=64, bk=64, splits=1),
               residual=jnp.ones((96,)), interpret=True)


ROW_CASES = [  # (layers or None, kd, n, rows, transposed, config or None for the default)
    (3, 256, 384, 16, False, None),
    (3, 256, 384, 5, False, G.GemvConfig(bn=32, bk=64, splits=2)),  # padded to 16 rows, split reduction
    (2, 1376, 256, 23, False, G.GemvConfig(bn=16, bk=32, splits=43)),  # padded to 32, odd chunk counts
    (None, 64, 160, 2, False, None),
    (None, 512, 96, 64, False, G.GemvConfig(bn=32, bk=128, splits=4)),
    (3, 256, 384, 11, True, None),  # the layers' layout (output-major)
    (2, 1376, 256, 23, True, G.GemvConfig(bn=16, bk=32, splits=43)),
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", ROW_CASES, ids=[f"{c[1]}x{c[2]}x{c[3]}{'t' if c[4] else ''}-{i}"
                                                 for i, c in enumerate(ROW_CASES)])
def test_gemm_matches_float64(case, dtype):
    """A few rows at once (prefill): every row equals its own product, padded rows are dropped."""
    layers, kd, n, t, transposed, cfg = case
    rng = np.random.default_rng(kd * n + t)
    shape = (n, kd) if transposed else (kd, n)
    w = jnp.asarray(rng.standard_normal(((layers,) if layers else ()) + shape), dtype)
    x = jnp.asarray(rng.standard_normal((t, kd)), dtype)
    layer = None if layers is None else layers - 1
    got = G.gemm(x, w, layer, transposed=transposed, cfg=cfg, interpret=True)
    assert got.dtype == jnp.float32 and got.shape == (t, n)
    ref = ref_product(x, w, layer, transposed)
    # bf16 products on the tensor cores are exact in float32; float32 inputs too in the interpreter
    assert rel_err(got, ref) < 1e-6
    assert rel_err(got[t - 1], ref[t - 1]) < 1e-6  # the last row (next to the padding) as well
    if layers:
        got0 = G.gemm(x, w, 0, transposed=transposed, cfg=cfg, interpret=True)
        assert rel_err(got0, ref_product(x, w, 0, transposed)) < 1e-6


@pytest.mark.parametrize("stacked", [True, False])
def test_gemm_norm_inside(stacked):
    """`norm=` normalises each row as model.rms_norm does, before the product."""
    kd, n, t = 256, 128, 7
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.standard_normal(((2,) if stacked else ()) + (kd, n)) / 16, jnp.float32)
    x = jnp.asarray(rng.standard_normal((t, kd)) * np.arange(1, t + 1)[:, None], jnp.float32)  # rows' scales differ
    nw = jnp.asarray(rng.standard_normal(((2,) if stacked else ()) + (kd,)), jnp.float32)
    layer = 1 if stacked else None
    got = G.gemm(x, w, layer, norm=nw, eps=1e-5, interpret=True)
    h = model.rms_norm(x, nw[1] if stacked else nw, 1e-5)
    assert rel_err(got, np.asarray(h, np.float64) @ np.asarray(w[1] if stacked else w, np.float64)) < 1e-5
    xb, nb, wb = x.astype(jnp.bfloat16), nw.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    got = G.gemm(xb, wb, layer, norm=nb, eps=1e-5, interpret=True)
    hb = np.asarray(model.rms_norm(xb, nb[1] if stacked else nb, 1e-5), np.float64)
    assert rel_err(got, hb @ np.asarray(wb[1] if stacked else wb, np.float64)) < 1e-5  # rounds as the model
    with pytest.raises(ValueError, match="norm weight"):
        G.gemm(x, w, layer, norm=jnp.ones((kd + 1,)), interpret=True)


def test_gemm_configs_and_errors():
    for kd, n in [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096), (5120, 15360), (13824, 5120),
                  (576, 960), (1536, 576), (576, 3072)]:
        for t in (2, 16, 33, 128):
            for transposed in (False, True):
                c = G.rows_config(kd, n, t, transposed=transposed)
                assert c is not None and n % c.bn == 0 and kd % (c.splits * c.bk) == 0, (kd, n, t, c)
                assert G.gemm_supported(kd, n, t, transposed=transposed)
        assert not G.gemm_supported(kd, n, G.ROWS_MAX + 1)  # longer chunks: XLA's matmuls
    assert G.rows_padded(1) == 16 and G.rows_padded(17) == 32 and G.rows_padded(128) == 128
    x = jnp.ones((4, 64), jnp.float32)
    with pytest.raises(ValueError, match="needs a layer index"):
        G.gemm(x, jnp.ones((2, 64, 64)), interpret=True)
    with pytest.raises(ValueError, match=r"needs \(T, 32\)"):
        G.gemm(x, jnp.ones((32, 64)), interpret=True)
    with pytest.raises(ValueError, match="does not tile"):
        G.gemm(x, jnp.ones((64, 64)), cfg=G.GemvConfig(bn=64, bk=64, splits=2), interpret=True)


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_prefill_wo_kernel_equals_hf(variant):
    """forward(opts with prefill_wo): the output projection alone through `gemm` (the prefill's default on one GPU), the other
    projections XLA's: every row's logits equal HF's, and the kernel runs once per layer and only there."""
    m = make_hf_model(variant)
    m.config._attn_implementation = "eager"
    cfg = LlamaConfig.from_hf(m.config.to_dict(), dtype="float32")
    p = hf_params(m, cfg)
    ids = [int(t) for t in np.random.RandomState(4).randint(3, cfg.vocab_size, size=11)]
    with torch.no_grad():
        ref = m(torch.tensor([ids])).logits[0].numpy()

    def f(p, c, ids, wo="interpret"):
        return model.forward(cfg, p, c, ids, jnp.arange(ids.shape[0], dtype=jnp.int32), opts=XLA.replace(prefill_wo=wo))
    tok = jnp.asarray(ids, jnp.int32)
    lg, cache = jax.jit(f)(p, kv_cache.zeros(cfg, 16), tok)
    assert rel_err(lg, ref) < 1e-4
    _, cache_x = f(p, kv_cache.zeros(cfg, 16), tok, wo="xla")
    assert rel_err(cache.k, cache_x.k) < 1e-6 and rel_err(cache.v, cache_x.v) < 1e-6
    assert str(jax.make_jaxpr(f)(p, kv_cache.zeros(cfg, 16), tok)).count("pallas_call") == cfg.n_layers
    long = jnp.zeros((G.ROWS_MAX + 1,), jnp.int32)  # longer chunks keep XLA's matmul
    assert "pallas_call" not in str(jax.make_jaxpr(f)(p, kv_cache.zeros(cfg, G.ROWS_MAX + 1), long))
    with pytest.raises(ValueError, match="prefill_wo must be"):
        f(p, kv_cache.zeros(cfg, 16), tok, wo="cublas")


def test_tuned_rows_tilings():
    """Every tuned tiling tiles its own shape, is what rows_config returns for it, and computes the product
    (checked on a smaller matrix with the same tiling: the interpreter runs every program)."""
    assert G.TUNED_ROWS, "the 7B's output projection is tuned (run 37)"
    rng = np.random.default_rng(5)
    for (kd, n, t, tr), c in G.TUNED_ROWS.items():
        assert G.rows_padded(t) == t and n % c.bn == 0 and kd % (c.bk * c.splits) == 0, (kd, n, t, c)
        assert G.rows_config(kd, n, t, transposed=tr) == c and G.rows_config(kd, n, t, itemsize=4, transposed=tr) != c
        small_kd, small_n = 2 * c.bk * c.splits, 2 * c.bn
        w = jnp.asarray(rng.standard_normal((2,) + ((small_n, small_kd) if tr else (small_kd, small_n))) / 16,
                        jnp.bfloat16)
        x = jnp.asarray(rng.standard_normal((t - 3, small_kd)), jnp.bfloat16)
        got = G.gemm(x, w, 1, transposed=tr, cfg=c, interpret=True)
        assert rel_err(got, ref_product(x, w, 1, tr)) < 1e-6, c


def test_runtime_prefill_wo_greedy_equals_hf(tmp_path, monkeypatch):
    """The runtime with only the prefill's output projection through the kernel (the decode steps XLA's):
    greedy tokens equal HF's, for a prompt in its own bucket and one served in chunks; the choice is in the
    prefill executables' key and not in the decode steps'."""
    m = make_hf_model("gqa", seed=7)
    cfg = LlamaConfig.from_hf(m.config.to_dict(), dtype="float32")
    eng = Engine(cfg, hf_params(m, cfg), max_seq_len=40, cache_dir=tmp_path, prefill_buckets=(16, 40),
                 compile_sampling=False, options=KernelOptions(gemv="xla", decode_attention="xla", prefill_wo="interpret"))
    try:
        st = eng.stats()
        assert st["prefill_wo"] == "interpret" and st["gemv"] is None
        for n in (5, 21):  # 21: chunks through the universal 16-row bucket while 40 compiles, then its own
            ids = [int(t) for t in np.random.RandomState(n).randint(3, cfg.vocab_size, size=n)]
            ref = m.generate(torch.tensor([ids]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                             pad_token_id=0, eos_token_id=None)[0, n:].tolist()
            assert generate(eng, ids, max_new_tokens=6, ignore_eos=True).token_ids == ref, n
        pre, dec = ("prefill", 16, 16), eng.runtime.decode_spec(1, False)
        pkey, dkey = eng.runtime.cache_key(pre), eng.runtime.cache_key(dec)
        eng.runtime.options = eng.runtime.options.replace(prefill_wo="xla")
        assert eng.runtime.cache_key(pre) != pkey and eng.runtime.cache_key(dec) == dkey
    finally:
        eng.close()


WIDE_HEADS = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1)  # Dh = 64, G = 2


def decode_step_against_hf(m, seed: int, row_reduce=frozenset()) -> tuple[LlamaConfig, jax.core.ClosedJaxpr]:
    """Prefill 8 tokens through XLA, then decode 4 token by token through the kernels (interpret mode, the
    projections named in `row_reduce` as XLA row reductions): each step's logits equal HF's full forward. The
    config and the jaxpr of one step."""
    m.config._attn_implementation = "eager"
    cfg = LlamaConfig.from_hf(m.config.to_dict(), dtype="float32")
    p = hf_params(m, cfg)
    ids = [int(t) for t in np.random.RandomState(seed).randint(3, cfg.vocab_size, size=12)]
    with torch.no_grad():
        ref = m(torch.tensor([ids])).logits[0].numpy()
    opts = XLA.replace(gemv="interpret", decode_attention="interpret", row_reduce=row_reduce)
    fwd = lambda p, c, t, pos: model.forward(cfg, p, c, t, pos, opts=opts)
    step = jax.jit(fwd)
    _, cache = model.forward(cfg, p, kv_cache.zeros(cfg, 16), jnp.asarray(ids[:8], jnp.int32),
                             jnp.arange(8, dtype=jnp.int32))
    for t in range(8, 12):
        lg, cache = step(p, cache, jnp.asarray(ids[t:t + 1], jnp.int32), jnp.asarray([t], jnp.int32))
        assert rel_err(lg[0], ref[t]) < 1e-4, t
    return cfg, jax.make_jaxpr(fwd)(p, cache, jnp.asarray([1], jnp.int32), jnp.asarray([3], jnp.int32))


def top_level_ops(jaxpr: jax.core.ClosedJaxpr) -> list[tuple[str, str]]:
    """The step's own operations (not those inside the kernels or nested jits): (primitive, the kernel's or
    the nested jit's name, else "")."""
    return [(e.primitive.name, str(e.params.get("name_and_src_info", e.params.get("name", ""))))
            for e in jaxpr.jaxpr.eqns]


@pytest.mark.parametrize("variant", list(TINY_VARIANTS) + ["wide_heads"])
def test_decode_with_kernels_equals_hf(variant):
    """Prefill through XLA, then token-by-token decode through the kernels: logits equal HF's full forward."""
    m = make_hf_model("gqa", **WIDE_HEADS) if variant == "wide_heads" else make_hf_model(variant)
    cfg, jaxpr = decode_step_against_hf(m, seed=1)
    # the kernels were in the step (not a silent fallback to XLA's einsum)
    assert [p for p, _ in top_level_ops(jaxpr)].count("pallas_call") == 5 * cfg.n_layers + 1


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_decode_with_row_reductions_equals_hf(variant):
    """The GPU's decode step: wqkv, wo and w13 of the one token as XLA row reductions (options.ROW_REDUCE_AUTO,
    norms and consumers as XLA fusions), w2, the attention and the LM head through the kernels: logits equal
    HF's full forward, token by token."""
    assert ROW_REDUCE_AUTO == {"wqkv", "wo", "w13"}  # as "pallas" mode resolves it (tests/test_options.py)
    cfg, jaxpr = decode_step_against_hf(make_hf_model(variant), seed=3, row_reduce=ROW_REDUCE_AUTO)
    ops = top_level_ops(jaxpr)
    # per layer the attention kernel and w2's GEMV only, and the LM head's
    assert [p for p, _ in ops].count("pallas_call") == 2 * cfg.n_layers + 1
    assert [n for _, n in ops].count("silu") == cfg.n_layers  # silu(gate) * up in XLA, between w13 and w2


def test_runtime_with_kernels_greedy_equals_hf(tmp_path, monkeypatch):
    m = make_hf_model("tied", seed=5)
    cfg = LlamaConfig.from_hf(m.config.to_dict(), dtype="float32")
    eng = Engine(cfg, hf_params(m, cfg), max_seq_len=40, cache_dir=tmp_path, prefill_buckets=(16, 40),
                 compile_sampling=False, options=KernelOptions(gemv="interpret", decode_attention="interpret"))
    try:
        assert eng.runtime.options.gemv == "interpret" and eng.stats()["gemv"] == "interpret"
        assert eng.stats()["decode_attention"] == "interpret"
        assert eng.stats()["prefill_wo"] == "interpret"  # the prompts' output projection through gemm too
        for n in (3, 17):
            ids = [int(t) for t in np.random.RandomState(n).randint(3, cfg.vocab_size, size=n)]
            ref = m.generate(torch.tensor([ids]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                             pad_token_id=0, eos_token_id=None)[0, n:].tolist()
            assert generate(eng, ids, max_new_tokens=6, ignore_eos=True).token_ids == ref
        # the row reductions' choice changes the traced step: its executables must not be shared on disk
        rt = eng.runtime
        spec = rt.decode_spec(1, False)
        key = rt.cache_key(spec)
        opts = rt.options
        rt.options = opts.replace(row_reduce=frozenset({"w13"}))
        assert rt.cache_key(spec) != key
        rt.options = opts
        assert rt.cache_key(spec) == key
        monkeypatch.setenv("HYBRID_JAX_ROW_REDUCE", "w13")  # the ablations' variable: not read by the library
        assert rt.cache_key(spec) == key
        monkeypatch.delenv("HYBRID_JAX_ROW_REDUCE")
        # the prefill's kernel choice is in the prefill's key only (decode steps are shared)
        pre = ("prefill", 16, 16)
        pkey = rt.cache_key(pre)
        rt.options = opts.replace(prefill_wo="xla")
        assert rt.cache_key(pre) != pkey and rt.cache_key(spec) == key
        rt.options = opts
    finally:
        eng.close()


# ---- decode attention kernel ---------------------------------------------------------------------------

from hybrid_jax import decode_attention as A  # noqa: E402


@pytest.mark.parametrize("blocks", [None, 1, 2, 4])  # rows per program, in row blocks (None: the default)
@pytest.mark.parametrize("K,G,S,n,splits", [(2, 1, 64, 1, 1), (2, 2, 64, 17, 3), (1, 3, 48, 48, 2),
                                            (4, 1, 80, 33, 4), (2, 4, 32, 31, 1), (1, 1, 96, 65, 5)])
def test_attention_kernel_equals_model(K, G, S, n, splits, blocks):
    """One token at position n-1 of layer 1 of a stacked cache, from the QKV projection's partial sums:
    the kernel's output and cache equal the model's (sum, rope, cache update, attention over rows 0..n-1);
    rows past n-1 hold garbage, which must not leak in, and no other row or layer changes."""
    rng = np.random.default_rng(K * 100 + G * 10 + n)
    Dh, L = 32, 3
    cfg = LlamaConfig(vocab_size=32, dim=K * G * Dh, n_layers=L, n_heads=K * G, n_kv_heads=K, ffn_dim=32)
    kc = jnp.asarray(rng.standard_normal((L, S, K, Dh)), jnp.float32)
    vc = jnp.asarray(rng.standard_normal((L, S, K, Dh)), jnp.float32)
    parts = jnp.asarray(rng.standard_normal((splits, K, G + 2, Dh)), jnp.float32)
    pos = jnp.asarray([n - 1], jnp.int32)
    cos, sin = model.rope_cos_sin(cfg, pos)
    rows = None if blocks is None else blocks * A.block_rows(S)
    got, kc2, vc2 = A.attend(parts, cos[0], sin[0], kc, vc, 1, pos, rows_per_program=rows, interpret=True)
    qkv = jnp.sum(parts, axis=0)[None]  # [1, K, G+2, Dh]
    q = model.apply_rope(qkv[:, :, :G], cos, sin)
    k = model.apply_rope(qkv[:, :, G], cos, sin)
    ref_cache = kv_cache.update(kv_cache.KVCache(kc, vc), 1, pos[0], k, qkv[:, :, G + 1])
    ref = model.attention(cfg, q, ref_cache.k[1], ref_cache.v[1], pos)[0]
    assert got.shape == (K, G, Dh)
    assert rel_err(got, ref) < 1e-5
    assert rel_err(kc2, ref_cache.k) < 1e-6 and rel_err(vc2, ref_cache.v) < 1e-6
    changed = np.asarray(kc2 != kc).any(axis=(2, 3))  # [L, S]: only row n-1 of layer 1
    assert changed[1, n - 1] and changed.sum() == 1
    assert np.asarray(vc2 != vc).any(axis=(2, 3)).sum() == 1


# a small GQA model in float32 for the chunk kernel inside the engine
CHUNK_CFG = LlamaConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, dtype="float32")


@pytest.mark.parametrize("K,G,S,T,pos,rows", [(2, 1, 64, 5, 10, None), (1, 3, 48, 7, 41, None),
                                              (2, 2, 128, 64, 30, 64), (3, 3, 96, 16, 0, 32), (1, 1, 64, 1, 63, None),
                                              (2, 4, 256, 40, 200, 64), (1, 2, 1040, 9, 1000, None)])
def test_chunk_attention_kernel_equals_model(K, G, S, T, pos, rows):
    """T tokens at positions pos..pos+T-1 over layer 1 of a stacked cache whose rows past pos+T-1 hold garbage:
    the kernel's output equals the model's attention over the whole cache (causal by position), with the row
    partitions (rows) and query blocks (T x G over 64 rows) split several ways."""
    rng = np.random.default_rng(S + T + pos)
    Dh, L = 32, 2
    cfg = LlamaConfig(vocab_size=32, dim=K * G * Dh, n_layers=L, n_heads=K * G, n_kv_heads=K, ffn_dim=32)
    kc = jnp.asarray(rng.standard_normal((L, S, K, Dh)), jnp.float32)
    vc = jnp.asarray(rng.standard_normal((L, S, K, Dh)), jnp.float32) * 3
    q = jnp.asarray(rng.standard_normal((T, K, G, Dh)), jnp.float32)
    got = A.attend_chunk(q, kc, vc, 1, jnp.asarray([pos], jnp.int32), rows_per_program=rows, interpret=True)
    ref = model.attention(cfg, q, kc[1], vc[1], pos + jnp.arange(T, dtype=jnp.int32))
    assert got.shape == q.shape and rel_err(got, ref) < 1e-5
    # rows past the last token change nothing, whatever they hold
    bad = kc.at[1, pos + T:].set(jnp.nan), vc.at[1, pos + T:].set(jnp.nan)
    again = A.attend_chunk(q, *bad, 1, jnp.asarray([pos], jnp.int32), rows_per_program=rows, interpret=True)
    assert np.array_equal(np.asarray(again), np.asarray(got))


def test_chunk_attention_in_the_prefill_equals_xla():
    """The forward pass of a chunk after 37 cached rows (as KV reuse and verify steps run it) gives the same logits
    and cache with the kernel (interpreted) as with XLA's attention; and through the engine, a prompt then a second
    one that reuses its rows gives the same greedy tokens both ways."""
    cfg = CHUNK_CFG
    params = weights.init_random(cfg, jax.random.PRNGKey(3), scale=0.3)
    cache = kv_cache.zeros(cfg, 128)
    toks = jnp.asarray(np.random.default_rng(0).integers(1, 64, 48), jnp.int32)
    xla = KernelOptions.xla(matmul_2d=True)
    _, cache = model.forward(cfg, params, cache, toks[:37], jnp.arange(37, dtype=jnp.int32), None, xla)
    pos = jnp.arange(37, 48, dtype=jnp.int32)
    ref, ref_cache = model.forward(cfg, params, cache, toks[37:], pos, None, xla)
    got, got_cache = model.forward(cfg, params, cache, toks[37:], pos, None, xla.replace(chunk_attention="interpret"))
    assert rel_err(got, ref) < 1e-5 and rel_err(got_cache.k, ref_cache.k) < 1e-6
    rng = np.random.default_rng(1)
    first = [int(t) for t in rng.integers(1, 64, 37)]
    second = first + [int(t) for t in rng.integers(1, 64, 21)]
    outs = []
    for chunk in ("xla", "interpret"):
        eng = Engine(cfg, params, max_seq_len=128, prefill_buckets=(16, 32), compile_sampling=False, kv_reuse=True,
                     options=KernelOptions(gemv="xla", decode_attention="xla", chunk_attention=chunk))
        try:
            r1 = generate(eng, first, max_new_tokens=6, ignore_eos=True)
            r2 = generate(eng, second, max_new_tokens=6, ignore_eos=True)
            assert r2.timings.reused_tokens == 37
            outs.append((r1.token_ids, r2.token_ids))
        finally:
            eng.close()
    assert outs[0] == outs[1]


def test_verify_steps_through_the_chunk_kernel_equal_plain_decode():
    """Prompt lookup's verify steps (K + 1 rows over the cache) with the chunk kernel (interpreted): the greedy
    tokens of plain decode, with proposals accepted."""
    cfg = CHUNK_CFG
    params = weights.init_random(cfg, jax.random.PRNGKey(1), scale=0.5)
    prompt = [int(t) for t in np.random.default_rng(0).integers(1, 64, 12)] * 4
    outs = []
    for kw in ({}, dict(speculative="ngram", num_speculative_tokens=4,
                        options=KernelOptions(chunk_attention="interpret"))):
        eng = Engine(cfg, params, max_seq_len=128, prefill_buckets=(16, 32), compile_sampling=False, **kw)
        eng.spec_break_even = 0  # speculate throughout: the interpreted kernel is slow, which the back-off would see
        try:
            r = generate(eng, prompt, max_new_tokens=40, ignore_eos=True)
            outs.append((r.token_ids, r.timings.verify_steps, r.timings.accepted))
        finally:
            eng.close()
    assert outs[1][0] == outs[0][0] and outs[1][1] > 0 and outs[1][2] > 0


def test_attention_kernel_bf16_rounds_like_the_model():
    """In bf16 the summed projection is rounded to bf16 before rope, and rope's result again, as the
    model's bf16 tensors are: the written cache row equals the model's bit for bit."""
    rng = np.random.default_rng(7)
    K, G, Dh, S, L, n = 2, 2, 32, 32, 2, 9
    cfg = LlamaConfig(vocab_size=32, dim=K * G * Dh, n_layers=L, n_heads=K * G, n_kv_heads=K, ffn_dim=32,
                      dtype="bfloat16")
    kc = jnp.asarray(rng.standard_normal((L, S, K, Dh)), jnp.bfloat16)
    vc = jnp.asarray(rng.standard_normal((L, S, K, Dh)), jnp.bfloat16)
    parts = jnp.asarray(rng.standard_normal((3, K, G + 2, Dh)), jnp.float32)
    pos = jnp.asarray([n - 1], jnp.int32)
    cos, sin = model.rope_cos_sin(cfg, pos)
    got, kc2, vc2 = A.attend(parts, cos[0], sin[0], kc, vc, 0, pos, interpret=True)
    qkv = jnp.sum(parts, axis=0).astype(jnp.bfloat16)[None]
    k = model.apply_rope(qkv[:, :, G], cos, sin)
    ref_cache = kv_cache.update(kv_cache.KVCache(kc, vc), 0, pos[0], k, qkv[:, :, G + 1])
    assert np.array_equal(np.asarray(kc2, np.float32), np.asarray(ref_cache.k, np.float32))
    assert np.array_equal(np.asarray(vc2, np.float32), np.asarray(ref_cache.v, np.float32))
    q = model.apply_rope(qkv[:, :, :G], cos, sin)
    ref = model.attention(cfg, q, ref_cache.k[0], ref_cache.v[0], pos)[0]
    assert got.dtype == jnp.bfloat16 and rel_err(got.astype(jnp.float32), ref.astype(jnp.float32)) < 1e-2


def test_attention_kernel_errors():
    assert A.supported(1040, 128) and A.block_rows(1040) == 16 and A.block_rows(1024) == 64
    assert A.partition_rows(1040, 32, 16) == 32  # 7B: 32 kv heads x 33 partitions
    assert A.partition_rows(1040, 3, 16) == 16  # SmolLM2: 3 kv heads x 65 partitions
    assert not A.supported(1041, 128) and not A.supported(1024, 96) and not A.supported(1024, 8)
    cs = jnp.ones((32,))
    one = jnp.asarray([1])
    with pytest.raises(ValueError, match="does not match"):
        A.attend(jnp.ones((1, 2, 3, 32)), cs, cs, jnp.ones((1, 32, 4, 32)), jnp.ones((1, 32, 4, 32)), 0, one)
    with pytest.raises(ValueError, match="cos/sin"):
        A.attend(jnp.ones((1, 2, 3, 32)), jnp.ones((16,)), cs, jnp.ones((1, 64, 2, 32)), jnp.ones((1, 64, 2, 32)), 0,
                 one)
    with pytest.raises(ValueError, match="multiple of the row block"):
        A.attend(jnp.ones((1, 2, 3, 32)), cs, cs, jnp.ones((1, 64, 2, 32)), jnp.ones((1, 64, 2, 32)), 0, one,
                 rows_per_program=24, interpret=True)
    with pytest.raises(ValueError, match="no kernel"):
        A.attend(jnp.ones((1, 2, 3, 32)), cs, cs, jnp.ones((1, 33, 2, 32)), jnp.ones((1, 33, 2, 32)), 0, one,
                 interpret=True)
