"""Parity of the Flax/JAX LLaMA with HF transformers' LlamaForCausalLM (float32, CPU), per component and
end to end, on tiny random configs: MHA, GQA, tied embeddings, two rope_theta values, llama3 rope scaling."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import TINY_VARIANTS, hf_params, make_hf_model, rel_err
from hybrid_jax import kv_cache, model
from hybrid_jax.config import LlamaConfig
from hybrid_jax.options import KernelOptions

TOL = 1e-4  # float32 end to end: relative error (norm of difference over norm of reference)
T = 24


def setup(variant):
    m = make_hf_model(variant)
    m.config._attn_implementation = "eager"
    cfg = LlamaConfig.from_hf(m.config.to_dict(), dtype="float32")
    return m, cfg, hf_params(m, cfg)


def causal_mask(t):
    return torch.triu(torch.full((t, t), float("-inf")), 1)[None, None]


@pytest.fixture(params=list(TINY_VARIANTS))
def variant(request):
    return request.param


def test_config_from_hf(variant):
    m, cfg, _ = setup(variant)
    hc = m.config
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.vocab_size) == (
        hc.hidden_size, hc.num_hidden_layers, hc.num_attention_heads, hc.num_key_value_heads,
        hc.intermediate_size, hc.vocab_size)
    assert cfg.tie_embeddings == bool(hc.tie_word_embeddings)
    assert (cfg.rope_scaling is not None) == (variant == "llama3")


def test_rms_norm(variant):
    m, cfg, p = setup(variant)
    x = torch.randn(T, cfg.dim)
    ref = m.model.layers[0].input_layernorm(x).detach().numpy()
    got = model.rms_norm(jnp.asarray(x.numpy()), p.layers.attn_norm[0], cfg.norm_eps)
    assert rel_err(got, ref) < 1e-6  # float32 elementwise


def test_rotary(variant):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    m, cfg, _ = setup(variant)
    pos = torch.arange(100, 100 + T)[None]
    x = torch.randn(1, cfg.n_heads, T, cfg.hd)
    cos, sin = m.model.rotary_emb(x, pos)
    ref, _ = apply_rotary_pos_emb(x, x, cos, sin)
    c, s = model.rope_cos_sin(cfg, jnp.asarray(pos[0].numpy()))
    got = model.apply_rope(jnp.asarray(x[0].permute(1, 0, 2).numpy()), c, s)  # [T, H, Dh]
    assert rel_err(np.asarray(got).transpose(1, 0, 2), ref[0].numpy()) < 1e-5  # float32 trig at positions ~100


def test_attention_block(variant):
    m, cfg, p = setup(variant)
    x = torch.randn(1, T, cfg.dim)
    pos = torch.arange(T)[None]
    layer = m.model.layers[1]
    pe = m.model.rotary_emb(x, pos)
    ref = layer.self_attn(layer.input_layernorm(x), position_embeddings=pe, attention_mask=causal_mask(T))[0]
    got, _ = model.attention_block(cfg, p, kv_cache.zeros(cfg, 32), 1, jnp.asarray(x[0].numpy()),
                                   jnp.arange(T, dtype=jnp.int32), *model.rope_cos_sin(cfg, jnp.arange(T)), None)
    assert rel_err(got, ref[0].detach().numpy()) < TOL


def test_mlp_block(variant):
    m, cfg, p = setup(variant)
    x = torch.randn(T, cfg.dim)
    layer = m.model.layers[0]
    ref = layer.mlp(layer.post_attention_layernorm(x)).detach().numpy()
    got = model.mlp_block(cfg, p, 0, jnp.asarray(x.numpy()))
    assert rel_err(got, ref) < TOL


def test_decoder_block(variant):
    m, cfg, p = setup(variant)
    x = torch.randn(1, T, cfg.dim)
    pos = torch.arange(T)[None]
    layer = m.model.layers[0]
    out = layer(x, attention_mask=causal_mask(T), position_ids=pos, position_embeddings=m.model.rotary_emb(x, pos))
    ref = (out[0] if isinstance(out, tuple) else out)[0].detach().numpy()
    xj = jnp.asarray(x[0].numpy())
    a, _ = model.attention_block(cfg, p, kv_cache.zeros(cfg, 32), 0, xj, jnp.arange(T, dtype=jnp.int32),
                                 *model.rope_cos_sin(cfg, jnp.arange(T)), None)
    h = xj + a
    got = h + model.mlp_block(cfg, p, 0, h)
    assert rel_err(got, ref) < TOL


def test_end_to_end_logits(variant):
    m, cfg, p = setup(variant)
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, size=T)
    ref = m(torch.tensor(ids)[None]).logits[0].detach().numpy()
    got, _ = model.forward(cfg, p, kv_cache.zeros(cfg, 64), jnp.asarray(ids, jnp.int32), jnp.arange(T, dtype=jnp.int32))
    assert rel_err(got, ref) < TOL


@pytest.mark.parametrize("n_prefill", [1, 7, 16])
def test_prefill_then_decode_equals_full_forward(n_prefill):
    m, cfg, p = setup("gqa")
    ids = np.random.RandomState(1).randint(0, cfg.vocab_size, size=T)
    full, _ = model.forward(cfg, p, kv_cache.zeros(cfg, 40), jnp.asarray(ids, jnp.int32), jnp.arange(T, dtype=jnp.int32))
    cache = kv_cache.zeros(cfg, 40)
    lg, cache = model.forward(cfg, p, cache, jnp.asarray(ids[:n_prefill], jnp.int32), jnp.arange(n_prefill, dtype=jnp.int32))
    parts = [lg]
    for t in range(n_prefill, T):
        lg, cache = model.forward(cfg, p, cache, jnp.asarray(ids[t:t + 1], jnp.int32), jnp.asarray([t], jnp.int32))
        parts.append(lg)
    assert rel_err(np.concatenate(parts), full) < 1e-5  # same arithmetic, different grouping


def test_kv_len_window_equals_full_cache():
    _, cfg, p = setup("gqa")
    ids = jnp.asarray(np.random.RandomState(2).randint(0, cfg.vocab_size, size=T), jnp.int32)
    full, _ = model.forward(cfg, p, kv_cache.zeros(cfg, 64), ids, jnp.arange(T, dtype=jnp.int32))
    win, _ = model.forward(cfg, p, kv_cache.zeros(cfg, 64), ids, jnp.arange(T, dtype=jnp.int32), kv_len=32)
    assert rel_err(win, full) < 1e-6


@pytest.mark.parametrize("pos", [0, 1, 127, 128, 129, 200, 255, 256, 271])
def test_attend_filled_equals_attention_over_the_filled_rows(pos):
    """The CPU decode step's attention (blocks of FILLED_BLOCK rows up to the token's own, an online softmax) is
    the attention over rows 0..pos, whatever the later rows hold: 272 rows, so the last block is cut short and
    starts inside the one before it (its rows before 256 masked)."""
    _, cfg, _ = setup("gqa")
    rng = np.random.default_rng(pos)
    K, G, h, S = cfg.n_kv_heads, cfg.q_per_kv, cfg.hd, 272
    kc = jnp.asarray(rng.standard_normal((2, S, K, h)), jnp.float32)
    vc = jnp.asarray(rng.standard_normal((2, S, K, h)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((1, K, G, h)), jnp.float32)
    p = jnp.asarray(pos, jnp.int32)
    got = model.attend_filled(cfg, q, kc, vc, 1, p, S)
    ref = model.attention(cfg, q, kc[1, :pos + 1], vc[1, :pos + 1], p[None])
    assert got.shape == ref.shape == (1, K, G, h)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
    noise = kc.at[1, pos + 1:].set(1e3), vc.at[1, pos + 1:].set(1e3)  # rows past pos are never read
    np.testing.assert_allclose(np.asarray(model.attend_filled(cfg, q, *noise, 1, p, S)), np.asarray(got))


def test_fused_attention_equals_model_attention():
    """model.fused_attention (jax.nn.dot_product_attention, here through XLA; cuDNN's kernel on the GPU)
    computes what model.attention computes over a cache holding exactly the chunk's keys (GQA, causal)."""
    _, cfg, _ = setup("gqa")
    K, G, h = cfg.n_kv_heads, cfg.q_per_kv, cfg.hd
    rng = np.random.RandomState(3)
    q, k, v = (jnp.asarray(rng.randn(*s), jnp.float32) for s in ((T, K, G, h), (T, K, h), (T, K, h)))
    ref = model.attention(cfg, q, k, v, jnp.arange(T, dtype=jnp.int32))
    assert rel_err(model.fused_attention(q, k, v, "xla"), ref) < 1e-6
    assert model.fused_attention(q, k, v, "xla").shape == q.shape
    # the first query sees only the first key: its output is v[0] (per kv head)
    assert np.allclose(np.asarray(model.fused_attention(q, k, v, "xla"))[0], np.asarray(v)[0][:, None], atol=1e-6)


FUSED = KernelOptions.xla(matmul_2d=True).replace(prefill_attention="xla")  # resolved: the fused attention via XLA


def test_fused_attention_prefill_equals_hf(variant, monkeypatch):
    """A prompt in its own bucket (kv_len = T, from position 0) through the fused attention equals HF; a
    chunk after it (kv_len > T) keeps model.attention over the cache."""
    m, cfg, p = setup(variant)
    ids = np.random.RandomState(4).randint(0, cfg.vocab_size, size=T)
    ref = m(torch.tensor(ids)[None]).logits[0].detach().numpy()
    calls = []
    real = model.fused_attention
    monkeypatch.setattr(model, "fused_attention", lambda *a: calls.append(a[0].shape) or real(*a))
    got, cache = model.forward(cfg, p, kv_cache.zeros(cfg, 40), jnp.asarray(ids, jnp.int32),
                               jnp.arange(T, dtype=jnp.int32), kv_len=T, opts=FUSED)
    assert rel_err(got, ref) < TOL and len(calls) == cfg.n_layers
    calls.clear()
    ids2 = np.random.RandomState(5).randint(0, cfg.vocab_size, size=8)
    ref2 = m(torch.tensor(np.concatenate([ids, ids2]))[None]).logits[0, T:].detach().numpy()
    got2, _ = model.forward(cfg, p, cache, jnp.asarray(ids2, jnp.int32), jnp.arange(T, T + 8, dtype=jnp.int32),
                            kv_len=40, opts=FUSED)
    assert rel_err(got2, ref2) < TOL and calls == []  # attends over the cache: not the fused path
    with pytest.raises(ValueError, match="prefill_attention must be"):
        FUSED.replace(prefill_attention="flash")
    with pytest.raises(ValueError, match="resolved KernelOptions"):  # the traced functions take resolved options
        model.forward(cfg, p, cache, jnp.asarray(ids2, jnp.int32), jnp.arange(8, dtype=jnp.int32),
                      opts=KernelOptions(prefill_attention="xla"))


def test_fused_attention_falls_back_where_cudnn_refuses(caplog, monkeypatch):
    """Where cuDNN's kernel is unavailable (here: no GPU, float32) the same function runs through XLA, with a
    warning (once per reason, not per layer), instead of failing the prefill's compile."""
    monkeypatch.setattr(model, "_CUDNN_REFUSED", set())
    _, cfg, _ = setup("gqa")
    rng = np.random.RandomState(6)
    q = jnp.asarray(rng.randn(8, cfg.n_kv_heads, cfg.q_per_kv, cfg.hd), jnp.float32)
    k, v = (jnp.asarray(rng.randn(8, cfg.n_kv_heads, cfg.hd), jnp.float32) for _ in range(2))
    with caplog.at_level("WARNING", logger="hybrid_jax.model"):
        got = model.fused_attention(q, k, v, "cudnn")
        model.fused_attention(q, k, v, "cudnn")  # the next layer: no second warning
    assert "cuDNN attention unavailable" in caplog.text
    assert sum("cuDNN attention unavailable" in r.getMessage() for r in caplog.records) == 1
    assert rel_err(got, model.attention(cfg, q, k, v, jnp.arange(8, dtype=jnp.int32))) < 1e-6
