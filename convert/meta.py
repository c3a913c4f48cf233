"""Meta's original release folders: params.json + consolidated.NN.pth (one per model-parallel rank) + tokenizer.model.

Each shard holds one rank's slice: column-parallel weights (wq, wk, wv, w1, w3, output) are split along
dim 0, row-parallel ones (wo, w2) along dim 1, norms are replicated. tok_embeddings is split along dim 1
in LLaMA 1/2 (ParallelEmbedding) and along dim 0 in LLaMA 3 (VocabParallelEmbedding): the shapes tell.
Every tensor's full shape is checked against params.json before any data is read.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np

from hybrid_jax.config import LlamaConfig

from .hf import read_json
from .rope_permute import qk_rows_to_hf
from .source import Source

# Meta name (without "layers.{i}.") -> (HF name suffix, shard axis; None = replicated)
LAYER = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
TOP = {"tok_embeddings.weight": ("model.embed_tokens.weight", "embed"), "norm.weight": ("model.norm.weight", None),
       "output.weight": ("lm_head.weight", 0)}
IGNORED = {"rope.freqs"}  # precomputed rotary frequencies in LLaMA 1/2 files


def _expected(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    D, H, K, Dh, F, V = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.hd, cfg.ffn_dim, cfg.vocab_size
    out = {"tok_embeddings.weight": (V, D), "norm.weight": (D,), "output.weight": (V, D)}
    per = {"attention.wq.weight": (H * Dh, D), "attention.wk.weight": (K * Dh, D), "attention.wv.weight": (K * Dh, D),
           "attention.wo.weight": (D, H * Dh), "feed_forward.w1.weight": (F, D), "feed_forward.w3.weight": (F, D),
           "feed_forward.w2.weight": (D, F), "attention_norm.weight": (D,), "ffn_norm.weight": (D,)}
    for i in range(cfg.n_layers):
        out.update({f"layers.{i}.{k}": v for k, v in per.items()})
    return out


def _axis(name: str, emb_axis) -> int | None:
    m = re.fullmatch(r"layers\.\d+\.(.+)", name)
    axis = LAYER[m.group(1)][1] if m else TOP[name][1]
    return emb_axis if axis == "embed" else axis


def _load_shards(folder: Path) -> tuple[list[str], list[dict]]:
    import torch

    paths = sorted(folder.glob("consolidated.*.pth"))
    names = [p.name for p in paths]
    want = [f"consolidated.{i:02d}.pth" for i in range(len(paths))]
    if names != want:
        raise ValueError(f"Meta shards in {folder} must be {want[0]} .. {want[-1]}, found {names}")
    shards = []
    for p in paths:
        try:
            shards.append(torch.load(p, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:
            raise ValueError(f"cannot read Meta shard {p} (truncated or corrupt?): {e}") from None
    for p, s in zip(names[1:], shards[1:]):
        if set(s) != set(shards[0]):
            diff = sorted(set(s) ^ set(shards[0]))[:4]
            raise ValueError(f"{p} and {names[0]} hold different tensors (e.g. {diff})")
    return names, shards


def _sentencepiece(folder: Path):
    path = folder / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer.model does not exist in {folder} (a Meta checkpoint folder needs it)")
    import sentencepiece

    try:
        return sentencepiece.SentencePieceProcessor(model_file=str(path))
    except Exception:
        raise ValueError(f"{path} is not a sentencepiece model (LLaMA 3's tiktoken tokenizer.model is not supported)") from None


def open_source(folder: Path, dtype: str | None) -> Source:
    params = read_json(folder / "params.json")
    for key in ("dim", "n_layers", "n_heads"):
        if key not in params:
            raise ValueError(f"params.json lacks {key!r}")
    sp = _sentencepiece(folder)
    files, shards = _load_shards(folder)
    n = len(shards)
    names = set(shards[0]) - IGNORED
    layers = sorted({int(m.group(1)) for k in names if (m := re.match(r"layers\.(\d+)\.", k))})
    if int(params["n_layers"]) != len(layers) or layers != list(range(len(layers))):
        raise ValueError(f"params.json says n_layers={params['n_layers']}, but the weights hold {len(layers)} layers")
    if "tok_embeddings.weight" not in names:
        raise ValueError(f"missing tensor 'tok_embeddings.weight' in {files[0]}")
    emb = tuple(shards[0]["tok_embeddings.weight"].shape)
    dim = int(params["dim"])
    emb_axis = None if n == 1 else 0 if emb[1] == dim else 1 if emb[1] * n == dim else None
    if n > 1 and emb_axis is None:
        raise ValueError(f"params.json contradicts the weights: dim={dim}, but tok_embeddings.weight shards "
                         f"have shape {emb} in {n} shards")
    vocab = emb[0] * (n if emb_axis == 0 else 1)
    if dtype is None:
        dtype = {"torch.float16": "float16", "torch.float32": "float32"}.get(str(shards[0]["tok_embeddings.weight"].dtype), "bfloat16")
    cfg = LlamaConfig.from_meta(params, vocab_size=vocab, dtype=dtype)
    cfg = cfg.replace(bos_token_id=sp.bos_id() if sp.bos_id() >= 0 else None,
                      eos_token_ids=(sp.eos_id(),) if sp.eos_id() >= 0 else ())
    if sp.get_piece_size() > cfg.vocab_size:
        raise ValueError(f"tokenizer.model has {sp.get_piece_size()} pieces, more than the weights' vocabulary ({cfg.vocab_size})")

    expected = _expected(cfg)
    what = f"params.json: dim={cfg.dim}, n_heads={cfg.n_heads}, n_kv_heads={cfg.n_kv_heads}, ffn dim {cfg.ffn_dim}"
    for name in sorted(names):
        if name not in expected:
            raise ValueError(f"unexpected tensor {name!r} in {files[0]} (not part of a LLaMA model)")
    for name, want in expected.items():
        if name not in names:
            raise ValueError(f"missing tensor {name!r} in {files[0]}")
        axis = _axis(name, emb_axis)
        shapes = [tuple(s[name].shape) for s in shards]
        if any(len(s) != len(shapes[0]) for s in shapes):
            raise ValueError(f"tensor {name!r} has shapes {shapes} across shards")
        rest = [tuple(d for j, d in enumerate(s) if j != axis) for s in shapes]
        if len(set(rest)) != 1 or (axis is None and len(set(shapes)) != 1):
            raise ValueError(f"tensor {name!r} has inconsistent shapes across shards: {shapes}")
        got = list(shapes[0])
        if axis is not None:
            got[axis] = sum(s[axis] for s in shapes)
        if tuple(got) != want:
            raise ValueError(f"params.json contradicts the weights: tensor {name!r} has shape {tuple(got)}, "
                             f"expected {want} ({what})")

    to_meta = {hf: k for k, (hf, _) in TOP.items()}
    used: set[str] = set()

    def get(hf_name: str) -> np.ndarray:
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
        if m:
            meta = next(k for k, (h, _) in LAYER.items() if h == m.group(2))
            name = f"layers.{m.group(1)}.{meta}"
        else:
            name = to_meta[hf_name]
        axis = _axis(name, emb_axis)
        parts = [s[name].float().numpy() for s in (shards if axis is not None else shards[:1])]
        a = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)
        used.add(name)
        return qk_rows_to_hf(a, name.endswith("attention.wq.weight"), name.endswith("attention.wk.weight"), cfg.n_heads, cfg.n_kv_heads, cfg.hd)

    def write_tokenizer(out: Path) -> None:
        from transformers import LlamaTokenizerFast

        shutil.copy2(folder / "tokenizer.model", out / "tokenizer.model")
        special = {k: sp.id_to_piece(i) for k, i in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
                                                     ("unk_token", sp.unk_id())) if i >= 0}
        tok = LlamaTokenizerFast.from_pretrained(str(out), add_bos_token=True, **special)
        tok.save_pretrained(str(out))

    def where(hf_name: str) -> str:
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
        if m:
            name = f"layers.{m.group(1)}." + next(k for k, (h, _) in LAYER.items() if h == m.group(2))
        else:
            name = to_meta[hf_name]
        return f" ({name!r}) in {', '.join(files)}"

    return Source(cfg, get, lambda: sorted(names - used), write_tokenizer, where=where)
