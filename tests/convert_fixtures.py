"""Converter test material: tiny checkpoints written in the HF, Meta and GGUF layouts, and the converted SmolLM2.

Fixtures: `spm_dir` (a tiny sentencepiece tokenizer.model, 160 pieces), `tiny_tokenizer_dir` (the same
tokenizer saved by transformers), `smollm2_dir` (the SmolLM2 GGUF converted to float32, session-wide).
Writers: `save_hf`, `write_meta`, `write_gguf` (each writes a tiny HF model's weights in one source format).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from convert.rope_permute import hf_to_meta_qk

VOCAB = 160  # = TINY_BASE's vocab_size
SPM_TEXT = "\n".join(
    f"the quick brown fox {i} jumps over the lazy dog while singing about rivers, mountains and {w}."
    for i, w in enumerate(["cats", "dogs", "birds", "fish", "trees", "stars", "boats", "roads"] * 25))


@pytest.fixture(scope="session")
def spm_dir(tmp_path_factory) -> Path:
    """A folder holding tokenizer.model: a BPE sentencepiece model of VOCAB pieces (unk 0, bos 1, eos 2)."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    (d / "corpus.txt").write_text(SPM_TEXT)
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=VOCAB,
                                   model_type="bpe", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2)
    (d / "corpus.txt").unlink()
    (d / "tokenizer.vocab").unlink()
    return d


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(spm_dir, tmp_path_factory) -> Path:
    """The spm tokenizer as transformers saves it (tokenizer.json, tokenizer_config.json)."""
    from transformers import LlamaTokenizerFast

    d = tmp_path_factory.mktemp("hf_tok")
    LlamaTokenizerFast.from_pretrained(str(spm_dir), add_bos_token=True).save_pretrained(str(d))
    return d


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf, tmp_path_factory) -> Path:
    """The SmolLM2-135M-Instruct GGUF converted (float32) into a hybrid_jax checkpoint folder."""
    from convert.api import convert

    return convert(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "model", dtype="float32", progress=False,
                   quantize=None)


def save_hf(model, folder: Path, tokenizer_dir: Path | None = None, shard: bool = False) -> Path:
    """save_pretrained (sharded into many small safetensors files when `shard`), plus the tokenizer files."""
    import shutil

    model.save_pretrained(str(folder), max_shard_size="20KB" if shard else "10GB")
    for f in (tokenizer_dir.iterdir() if tokenizer_dir else []):
        shutil.copy2(f, folder / f.name)
    return folder


def _rope_theta(c) -> float:
    return float((getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", 10000.0)))


def _meta_tensors(model) -> dict[str, np.ndarray]:
    c = model.config
    H, K, D = c.num_attention_heads, c.num_key_value_heads, c.hidden_size
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    names = {"attention.wv.weight": "self_attn.v_proj", "attention.wo.weight": "self_attn.o_proj",
             "feed_forward.w1.weight": "mlp.gate_proj", "feed_forward.w3.weight": "mlp.up_proj",
             "feed_forward.w2.weight": "mlp.down_proj", "attention_norm.weight": "input_layernorm",
             "ffn_norm.weight": "post_attention_layernorm"}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        out[f"layers.{i}.attention.wq.weight"] = hf_to_meta_qk(sd[p + "self_attn.q_proj.weight"], H, D // H)
        out[f"layers.{i}.attention.wk.weight"] = hf_to_meta_qk(sd[p + "self_attn.k_proj.weight"], K, D // H)
        out.update({f"layers.{i}.{m}": sd[p + h + ".weight"] for m, h in names.items()})
    return out


def meta_params(model) -> dict:
    """params.json for a tiny model: ffn 96 = 32 * ceil(int(0.5 * int(2 * 4 * 64 / 3)) / 32)."""
    c = model.config
    p = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
         "multiple_of": 32, "ffn_dim_multiplier": 0.5, "norm_eps": c.rms_norm_eps, "rope_theta": _rope_theta(c),
         "vocab_size": -1}
    if c.num_key_value_heads != c.num_attention_heads:
        p["n_kv_heads"] = c.num_key_value_heads
    return p


def _meta_axis(name: str, embed_axis: int) -> int | None:
    """How Meta's model-parallel ranks split each tensor (None: replicated)."""
    if name == "tok_embeddings.weight":
        return embed_axis
    if name.endswith(("wo.weight", "w2.weight")):
        return 1
    if name.endswith("norm.weight"):
        return None
    return 0


def write_meta(model, folder: Path, spm_dir: Path, n_shards: int = 1, embed_axis: int = 1) -> Path:
    """params.json + consolidated.NN.pth (split the Meta way over `n_shards`) + tokenizer.model."""
    import shutil

    import torch

    folder.mkdir(parents=True, exist_ok=True)
    tensors = _meta_tensors(model)
    for s in range(n_shards):
        shard = {}
        for name, a in tensors.items():
            axis = _meta_axis(name, embed_axis)
            part = a if axis is None else np.split(a, n_shards, axis=axis)[s]
            shard[name] = torch.from_numpy(np.ascontiguousarray(part))
        torch.save(shard, folder / f"consolidated.{s:02d}.pth")
    (folder / "params.json").write_text(json.dumps(meta_params(model)))
    shutil.copy2(spm_dir / "tokenizer.model", folder / "tokenizer.model")
    return folder


def llama_cpp_rope_freqs(head_dim: int, theta: float, rs: dict) -> np.ndarray:
    """llama.cpp's `rope_freqs.weight` for LLaMA 3 scaling (its convert_hf_to_gguf.py, written out again)."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low_wl = rs["original_max_position_embeddings"] / rs["low_freq_factor"]
    high_wl = rs["original_max_position_embeddings"] / rs["high_freq_factor"]
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(rs["factor"])
        else:
            smooth = (rs["original_max_position_embeddings"] / wl - rs["low_freq_factor"]) / (
                rs["high_freq_factor"] - rs["low_freq_factor"])
            out.append(1 / ((1 - smooth) / rs["factor"] + smooth))
    return np.asarray(out, np.float32)


def write_gguf(model, path: Path, arch: str = "llama") -> Path:
    """A float32 GGUF of a tiny HF model, as llama.cpp writes one (q/k rows in Meta order; no tokenizer)."""
    import gguf

    c = model.config
    H, K, D = c.num_attention_heads, c.num_key_value_heads, c.hidden_size
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(D)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(H)
    w.add_head_count_kv(K)
    w.add_rope_freq_base(_rope_theta(c))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(D // H)
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = {"self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", hf_to_meta_qk(sd[p + "self_attn.q_proj.weight"], H, D // H))
        w.add_tensor(f"blk.{i}.attn_k.weight", hf_to_meta_qk(sd[p + "self_attn.k_proj.weight"], K, D // H))
        for h, g in names.items():
            w.add_tensor(f"blk.{i}.{g}.weight", sd[p + h + ".weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    rs = (getattr(c, "rope_parameters", None) or {})
    if rs.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama_cpp_rope_freqs(D // H, _rope_theta(c), rs))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
