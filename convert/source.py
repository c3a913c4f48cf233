"""What every format reader hands to the converter: a config, tensors by Hugging Face name, a tokenizer writer.

Readers expose their tensors under Hugging Face LLaMA names (`model.layers.{i}.self_attn.q_proj.weight`, ...)
in HF layout ([out, in], q/k rows in rotate-half order), so one function, `weights.from_hf_layers`, stacks
them all. Each reader asserts the name and shape of its own source tensors before reshaping them.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np

from hybrid_jax.config import LlamaConfig


@dataclasses.dataclass
class Source:
    cfg: LlamaConfig
    get: Callable[[str], np.ndarray]  # HF name -> float array in HF layout; KeyError when absent
    unused: Callable[[], list[str]]  # source tensors no HF name asked for (called after conversion)
    write_tokenizer: Callable[[Path], None] | None  # writes tokenizer files into a folder
    close: Callable[[], None] = lambda: None
    tokenizer_missing: str | None = None  # why there is no tokenizer, when there is none
    where: Callable[[str], str] = lambda name: ""  # HF name -> " (source name) in FILE", for error messages
    # the quantization the source's layer matrices are stored in, when they can be taken over as they are
    # (quant.py's scheme name: GGUF's Q8_0 / Q4_0 / Q4_1 blocks), and the getter of those stored arrays
    native_quant: str | None = None
    get_quantized: Callable[[str], dict] | None = None


def check_finite(name: str, a: np.ndarray, where: str = "") -> None:
    """Raise ValueError naming the tensor when it holds NaN or Inf.

    A float64 sum is finite exactly when every element is (float32 values cannot overflow it), and it needs
    no temporary array the size of the tensor.
    """
    if np.isfinite(np.add.reduce(a, axis=None, dtype=np.float64)):
        return
    bad = ~np.isfinite(np.asarray(a, np.float32))  # the error path only
    first = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), a.shape))
    raise ValueError(f"tensor {name!r}{where} holds {int(bad.sum())} NaN/Inf value(s) (first at index {first}): "
                     f"the source is corrupt; download it again")


def hf_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for every tensor `weights.from_hf_layers` reads."""
    D, H, K, Dh, F, V = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.hd, cfg.ffn_dim, cfg.vocab_size
    out = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        out.update({
            p + "self_attn.q_proj.weight": (H * Dh, D),
            p + "self_attn.k_proj.weight": (K * Dh, D),
            p + "self_attn.v_proj.weight": (K * Dh, D),
            p + "self_attn.o_proj.weight": (D, H * Dh),
            p + "mlp.gate_proj.weight": (F, D),
            p + "mlp.up_proj.weight": (F, D),
            p + "mlp.down_proj.weight": (D, F),
            p + "input_layernorm.weight": (D,),
            p + "post_attention_layernorm.weight": (D,),
        })
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (V, D)
    return out


def check_layer_count(n_layers: int, names, pattern: str, said: str) -> None:
    """The layers the tensor names hold are 0 .. n_layers-1 (checked before any per-layer table is built, so a
    corrupt count cannot exhaust memory). `pattern`'s group 1 is the layer index; `said` names the count."""
    import re

    layers = {int(m.group(1)) for n in names if (m := re.match(pattern, n))}
    if len(layers) != n_layers or (layers and (min(layers) != 0 or max(layers) != n_layers - 1)):
        raise ValueError(f"{said}={n_layers}, but the weights hold {len(layers)} layers (the file is corrupt "
                         f"or not of this model)")


def check_shape(name: str, shape, expected, where: str = "") -> None:
    """Raise ValueError naming the tensor when its shape is not the expected one."""
    if tuple(shape) != tuple(expected):
        raise ValueError(f"tensor {name!r}{where} has shape {tuple(shape)}, expected {tuple(expected)}")
