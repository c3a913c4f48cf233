"""Converter round trips: HF safetensors, Meta consolidated .pth and GGUF sources -> our checkpoint -> logits,
compared with HF transformers (float32, CPU) on the same weights."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import make_hf_model, rel_err
from convert.api import convert
from convert.rope_permute import hf_to_meta_qk, meta_to_hf_qk
from convert_fixtures import (save_hf, smollm2_dir, spm_dir, tiny_tokenizer_dir, write_gguf,  # noqa: F401
                              write_meta)

TOKENS = [1, 17, 45, 3, 99, 120, 7, 64, 150, 33, 2, 88]  # arbitrary ids < 160
LLAMA3_8K = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 8192}  # scales 2 of the 8 frequencies of a head of 16


def hf_logits(model, tokens) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


def our_logits(folder, tokens, seq_len: int = 32):
    import jax.numpy as jnp

    from hybrid_jax import checkpoint, kv_cache, model

    cfg, params = checkpoint.restore(folder)
    logits, _ = model.forward(cfg, params, kv_cache.zeros(cfg, seq_len), jnp.asarray(tokens, jnp.int32),
                              jnp.arange(len(tokens), dtype=jnp.int32))
    return cfg, np.asarray(logits)


def test_rope_permute_inverse_and_matches_transformers_gguf_loader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.random.default_rng(0).standard_normal((3 * 16, 8)).astype(np.float32)
    hf = meta_to_hf_qk(w, 3, 16)
    assert np.array_equal(hf_to_meta_qk(hf, 3, 16), w)
    assert np.array_equal(hf, LlamaTensorProcessor()._reverse_permute_weights(w, 3, 3))  # exact: a permutation
    # HF's rotate-half pairs (j, j + Dh/2) are Meta's interleaved pairs (2j, 2j + 1)
    assert np.array_equal(hf[[0, 8]], w[[0, 1]]) and np.array_equal(hf[[16 + 7, 16 + 15]], w[[16 + 14, 16 + 15]])


@pytest.mark.parametrize("variant,shard", [("gqa", False), ("gqa", True), ("tied", False), ("llama3", True)])
def test_hf_round_trip(tmp_path, tiny_tokenizer_dir, variant, shard):
    from hybrid_jax.tokenizer import Tokenizer

    m = make_hf_model(variant, seed=1)
    src = save_hf(m, tmp_path / "hf", tiny_tokenizer_dir, shard=shard)
    if shard:
        assert (src / "model.safetensors.index.json").is_file() and len(list(src.glob("*.safetensors"))) > 2
    (src / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 7]}))
    out = convert(src, tmp_path / "out", dtype="float32", progress=False)
    cfg, logits = our_logits(out, TOKENS)
    assert rel_err(logits, hf_logits(m, TOKENS)) < 1e-4  # float32 on both sides
    assert cfg.eos_token_ids == (2, 7)  # generation_config.json wins over config.json
    assert cfg.tie_embeddings == (variant == "tied") and (cfg.rope_scaling is not None) == (variant == "llama3")
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).is_file(), f
    assert Tokenizer(out).encode("the quick fox", chat=False) == Tokenizer(tiny_tokenizer_dir).encode("the quick fox", chat=False)


def test_hf_default_dtype_is_bfloat16(tmp_path, tiny_tokenizer_dir):
    m = make_hf_model("gqa", seed=2)
    out = convert(save_hf(m, tmp_path / "hf", tiny_tokenizer_dir), tmp_path / "out", progress=False)
    cfg, logits = our_logits(out, TOKENS)
    assert cfg.dtype == "bfloat16"
    assert rel_err(logits, hf_logits(m, TOKENS)) < 2e-2  # bf16 weights (8-bit mantissa) against fp32


@pytest.mark.parametrize("variant,n_shards,embed_axis", [("mha", 1, 1), ("mha", 2, 1), ("gqa", 1, 1), ("gqa", 2, 1),
                                                          ("gqa", 2, 0)])  # embed_axis 0: LLaMA 3's vocab split
def test_meta_round_trip(tmp_path, spm_dir, variant, n_shards, embed_axis):
    import sentencepiece

    from hybrid_jax.tokenizer import Tokenizer

    m = make_hf_model(variant, seed=3)
    src = write_meta(m, tmp_path / "meta", spm_dir, n_shards=n_shards, embed_axis=embed_axis)
    out = convert(src, tmp_path / "out", dtype="float32", progress=False)
    cfg, logits = our_logits(out, TOKENS)
    assert rel_err(logits, hf_logits(m, TOKENS)) < 1e-4  # float32 on both sides
    assert (cfg.vocab_size, cfg.ffn_dim, cfg.n_kv_heads) == (160, 96, m.config.num_key_value_heads)
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (1, (2,))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    assert (out / "tokenizer.model").is_file()
    assert Tokenizer(out).encode("the lazy dog", chat=False) == [1] + sp.encode("the lazy dog")


@pytest.mark.parametrize("variant", ["gqa", "tied", "llama3-8k"])
def test_gguf_round_trip_tiny(tmp_path, variant):
    if variant == "llama3-8k":
        m = make_hf_model("llama3", seed=4, rope_scaling=LLAMA3_8K)
    else:
        m = make_hf_model(variant, seed=4)
    src = write_gguf(m, tmp_path / "tiny.gguf")
    with pytest.warns(UserWarning, match="no tokenizer"):
        out = convert(src, tmp_path / "out", dtype="float32", progress=False)
    cfg, logits = our_logits(out, TOKENS)
    assert rel_err(logits, hf_logits(m, TOKENS)) < 1e-4  # float32 on both sides
    assert cfg.tie_embeddings == (variant == "tied")
    if variant == "llama3-8k":  # recovered from llama.cpp's rope_freqs.weight
        rs = cfg.rope_scaling
        assert (rs.factor, rs.low_freq_factor, rs.high_freq_factor, rs.original_max_position_embeddings) == (8, 1, 4, 8192)


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_gguf):
    """transformers' own GGUF loader (dequantises to float32 the same way): the reference. ~15 s."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                                dtype=torch.float32).eval()


def test_smollm2_gguf_matches_transformers(smollm2_dir, smollm2_hf):
    from hybrid_jax.tokenizer import Tokenizer

    tok = Tokenizer(smollm2_dir)
    assert tok.has_chat_template
    text = "The capital of France is Paris. Name three colours of the rainbow, then count from one to ten slowly."
    ids = tok.encode(text, chat=False)[:20]
    assert len(ids) == 20
    cfg, logits = our_logits(smollm2_dir, ids)
    ref = hf_logits(smollm2_hf, ids)
    assert rel_err(logits, ref) < 1e-4  # both float32 from the same dequantised weights
    assert np.array_equal(logits.argmax(-1), ref.argmax(-1))
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.dim, cfg.vocab_size) == (30, 9, 3, 576, 49152)
    assert cfg.tie_embeddings and cfg.rope_theta == 100000.0 and cfg.eos_token_ids == (2,)


def test_cli_converts_and_force_replaces(tmp_path, capsys, tiny_tokenizer_dir):
    from convert.__main__ import main

    m = make_hf_model("gqa", seed=5)
    src, out = save_hf(m, tmp_path / "hf", tiny_tokenizer_dir), tmp_path / "out"
    assert main(["--src", str(src), "--out", str(out), "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert main(["--src", str(src), "--out", str(out), "--dtype", "float16", "--force"]) == 0
    cfg, logits = our_logits(out, TOKENS)
    assert cfg.dtype == "float16"
    assert rel_err(logits, hf_logits(m, TOKENS)) < 5e-3  # float16 weights against fp32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]  # no temp folders left beside it
    umask = os.umask(0o22)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not the 0700 of the temp folder it was written in
