"""GGUF files (llama.cpp) of architecture `llama`: tensors dequantised to float32, or (`get_quantized`) layer
matrices of Q8_0 / Q4_0 / Q4_1 blocks taken over as they are (quant.from_gguf_blocks).

GGUF lists shapes fastest-axis first, so a tensor's logical [out, in] shape is its `shape` reversed; that is
the shape `gguf.quants.dequantize` returns. llama.cpp stores attn_q / attn_k rows in Meta's interleaved
rotary order, so they go through `meta_to_hf_qk`, as transformers' GGUF loader does.

GGUF carries no checksum. Damage is caught where it breaks structure: the header (magic, version, counts),
string lengths and tensor infos fail in the reader, in the layer-count, shape and data-layout checks, and
data that dequantises to NaN / Inf is refused (convert.api). A flipped byte in tensor data or in a metadata
value (a token string, a score, rope_theta, an eos id) gives other valid numbers and is not detectable here:
compare the file's sha256 with the one its publisher lists.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from hybrid_jax import quant
from hybrid_jax.config import LlamaConfig

from .gguf_rope import rope_scaling
from .rope_permute import qk_rows_to_hf
from .source import Source, check_layer_count, check_shape, hf_shapes

ARCH = "llama"
LAYER = {"self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
         "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
         "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
         "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
         "post_attention_layernorm.weight": "ffn_norm.weight"}
TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
       "lm_head.weight": "output.weight"}


def gguf_name(hf_name: str) -> str:
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    return f"blk.{m.group(1)}.{LAYER[m.group(2)]}" if m else TOP[hf_name]


def _reader(path: Path):
    import gguf

    class Reader(gguf.GGUFReader):
        """Slices a plain ndarray view of the mapping, not the np.memmap itself: the reader makes ~10 slices per
        vocabulary string, and np.memmap's per-slice bookkeeping made reading SmolLM2's header 4.6 s, not 2.2."""

        def _get(self, *args, **kw):
            if type(self.data) is np.memmap:
                self.data = self.data.view(np.ndarray)  # the view's base keeps the file mapped
            return super()._get(*args, **kw)

    try:
        return Reader(path)
    except Exception as e:
        raise ValueError(f"corrupt or truncated GGUF file {path}: {' '.join(str(e).split()) or type(e).__name__}") from None


def _check_layout(reader, name: str) -> None:
    """Tensor data lies back to back in tensor-info order, each padded to the alignment, as llama.cpp's loader
    requires: a damaged data offset would otherwise read another tensor's bytes."""
    size = 0
    for t in reader.tensors:
        offset = int(t.data_offset) - int(reader.data_offset)
        if offset != size:
            raise ValueError(f"corrupt GGUF file {name}: tensor {t.name!r} has data offset {offset}, expected {size}")
        size += -(-int(t.n_bytes) // reader.alignment) * reader.alignment


def dequantize(t) -> np.ndarray:
    from gguf.quants import dequantize as deq

    shape = tuple(int(d) for d in reversed(t.shape))
    try:
        a = deq(t.data, t.tensor_type)
    except Exception as e:
        raise ValueError(f"cannot dequantise GGUF tensor {t.name!r} of type {t.tensor_type.name}: {e}") from None
    return np.asarray(a, np.float32).reshape(shape)


def _config(meta, tensors: dict, dtype: str | None, name: str) -> LlamaConfig:
    def need(key):
        v = meta(f"{ARCH}.{key}")
        if v is None:
            raise ValueError(f"GGUF metadata of {name} lacks '{ARCH}.{key}'")
        return v

    D, H = int(need("embedding_length")), int(need("attention.head_count"))
    hd = int(meta(f"{ARCH}.attention.key_length") or D // H)
    rot = meta(f"{ARCH}.rope.dimension_count")
    if rot is not None and int(rot) != hd:
        raise ValueError(f"{name}: partial rotary embeddings (rope.dimension_count {rot}, head dim {hd}) are not supported")
    vocab = meta(f"{ARCH}.vocab_size") or meta("tokenizer.ggml.tokens", count=True)
    if not vocab and "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[-1])
    eos = [meta(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    cfg = LlamaConfig(
        vocab_size=int(vocab or 0), dim=D, n_layers=int(need("block_count")), n_heads=H,
        n_kv_heads=int(meta(f"{ARCH}.attention.head_count_kv") or H), ffn_dim=int(need("feed_forward_length")),
        head_dim=hd if hd != D // H else 0, rope_theta=float(meta(f"{ARCH}.rope.freq_base") or 10000.0),
        norm_eps=float(meta(f"{ARCH}.attention.layer_norm_rms_epsilon") or 1e-5),
        tie_embeddings="output.weight" not in tensors,
        max_position_embeddings=int(meta(f"{ARCH}.context_length") or 4096), dtype=dtype or "bfloat16",
        bos_token_id=meta("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)))
    return cfg.replace(rope_scaling=rope_scaling(meta, tensors, cfg, dequantize))


def _tokenizer(path: Path):
    import importlib.util

    try:  # transformers 5: the class AutoTokenizer picks for a llama GGUF, without AutoTokenizer's first
        # reading the whole file again for a model config (~5 s on 2 cores); the files it saves are the same
        from transformers import TokenizersBackend as Tok
    except ImportError:
        from transformers import AutoTokenizer as Tok

    if importlib.util.find_spec("torch") is None:  # transformers' GGUF reader imports torch
        raise ValueError(f"cannot build a tokenizer from {path.name}: transformers' GGUF reader needs PyTorch; "
                         "install it with `pip install 'hybrid_jax[gguf]'` (CPU torch is enough)")
    try:
        return Tok.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise ValueError(f"cannot build a tokenizer from {path.name}: {e}") from None


def open_source(path: Path, dtype: str | None) -> Source:
    reader = _reader(path)

    def meta(key, count=False):
        f = reader.fields.get(key)
        if f is None:
            return None
        return len(f.data) if count else f.contents()

    arch = meta("general.architecture")
    if arch != ARCH:
        raise ValueError(f"GGUF architecture {arch!r} of {path.name} is not supported (only {ARCH!r})")
    _check_layout(reader, path.name)
    tensors = {t.name: t for t in reader.tensors}
    cfg = _config(meta, tensors, dtype, path.name)
    check_layer_count(cfg.n_layers, tensors, r"blk\.(\d+)\.", f"the GGUF metadata of {path.name} says {ARCH}.block_count")
    expected = hf_shapes(cfg)
    for hf_name, shape in expected.items():  # every shape before any data is read or allocated
        if gguf_name(hf_name) in tensors:
            check_shape(gguf_name(hf_name), reversed(tensors[gguf_name(hf_name)].shape), shape, f" in {path.name}")
    tok = _tokenizer(path) if meta("tokenizer.ggml.model") else None
    used = {"rope_freqs.weight"}
    matrices = [gguf_name(n) for n in expected if n.endswith("proj.weight")]
    types = {tensors[n].tensor_type.name for n in matrices if n in tensors}
    native = quant.GGUF_TYPES[types.pop()][0] if len(types) == 1 and next(iter(types)) in quant.GGUF_TYPES else None

    def rows_to_hf(name, a):
        return qk_rows_to_hf(a, name.endswith("attn_q.weight"), name.endswith("attn_k.weight"), cfg.n_heads,
                             cfg.n_kv_heads, cfg.hd)

    def get_quantized(hf_name: str) -> dict:
        """A layer matrix's blocks as quant.py's stored arrays (rows in HF's order), without dequantizing."""
        name = gguf_name(hf_name)
        if name not in tensors:
            raise KeyError(hf_name)
        t = tensors[name]
        n, kd = expected[hf_name]
        check_shape(name, reversed(t.shape), (n, kd), f" in {path.name}")
        a = quant.from_gguf_blocks(t.data, t.tensor_type.name, n, kd)
        used.add(name)
        return {k: rows_to_hf(name, v) for k, v in a.items()}

    def get(hf_name: str) -> np.ndarray:
        name = gguf_name(hf_name)
        if name not in tensors:
            raise KeyError(hf_name)
        t = tensors[name]
        check_shape(name, reversed(t.shape), expected[hf_name], f" in {path.name}")
        a = dequantize(t)
        used.add(name)
        return rows_to_hf(name, a)

    return Source(cfg, get, lambda: sorted(set(tensors) - used),
                  (lambda out: tok.save_pretrained(str(out))) if tok is not None else None,
                  tokenizer_missing=None if tok is not None else f"{path.name} holds no tokenizer",
                  where=lambda hf_name: f" (GGUF {gguf_name(hf_name)!r}, dequantised) in {path.name}",
                  native_quant=native, get_quantized=get_quantized)
