"""Model configuration: a frozen, hashable dataclass (usable as a static jit argument).

Presets for LLaMA-2 7B / 13B / 70B are module constants; `from_hf` reads a Hugging Face `config.json`
dict and `from_meta` a Meta `params.json` dict. Derived sizes are properties.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """LLaMA-3 style rope scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    dim: int  # D, hidden size
    n_layers: int  # L
    n_heads: int  # H
    n_kv_heads: int  # K
    ffn_dim: int  # F
    head_dim: int = 0  # Dh; 0 means dim // n_heads
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_position_embeddings: int = 4096
    dtype: str = "bfloat16"
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    quant: str | None = None  # the layer matrices' quantization (quant.py), None: stored in `dtype`

    def __post_init__(self):
        problems = []
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim"):
            if int(getattr(self, name)) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if not self.head_dim and self.n_heads > 0 and self.dim % self.n_heads:
            problems.append(f"dim ({self.dim}) must be a multiple of n_heads ({self.n_heads}) when head_dim is unset")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.quant is not None:
            from . import quant

            try:
                q = quant.parse(self.quant)
                if q.name != self.quant:
                    problems.append(f"quant must be written {q.name!r}, got {self.quant!r}")
            except ValueError as e:
                problems.append(str(e))
        if problems:
            raise ValueError("invalid LlamaConfig: " + "; ".join(problems))
        if self.head_dim % 2 and self.head_dim:
            raise ValueError(f"invalid LlamaConfig: head_dim must be even, got {self.head_dim}")

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def hd(self) -> int:
        """Dh, the per-head dimension."""
        return self.head_dim or self.dim // self.n_heads

    @property
    def q_per_kv(self) -> int:
        """G, query heads per kv head."""
        return self.n_heads // self.n_kv_heads

    @property
    def n_params(self) -> int:
        d, f, v, l = self.dim, self.ffn_dim, self.vocab_size, self.n_layers
        attn = d * (self.n_heads + 2 * self.n_kv_heads) * self.hd + self.n_heads * self.hd * d
        per_layer = attn + 3 * d * f + 2 * d
        return v * d * (1 if self.tie_embeddings else 2) + l * per_layer + d

    @property
    def dtype_bytes(self) -> int:
        return 4 if self.dtype == "float32" else 2

    def layer_matrices(self) -> dict[str, tuple[int, int]]:
        """The layer matrices as [N, Kd] (outputs, inputs): wqkv, wo, w13, w2."""
        d, f, hd = self.dim, self.ffn_dim, self.hd
        return {"wqkv": ((self.n_heads + 2 * self.n_kv_heads) * hd, d), "wo": (d, self.n_heads * hd),
                "w13": (2 * f, d), "w2": (d, f)}

    @property
    def weight_bytes(self) -> int:
        """Bytes of the stored weights (the quantized layer matrices as stored: values, scales, offsets)."""
        if self.quant is None:
            return self.n_params * self.dtype_bytes
        from . import quant
        import math

        q = quant.parse(self.quant)
        mats = self.layer_matrices()
        quantized = sum(math.prod(shape) * (1 if dt != "float16" else 2) for n, kd in mats.values()
                        for shape, dt in q.stored(n, kd).values())
        dense = self.n_params - self.n_layers * sum(n * kd for n, kd in mats.values())
        return dense * self.dtype_bytes + self.n_layers * quantized

    def replace(self, **kw) -> "LlamaConfig":
        return dataclasses.replace(self, **kw)

    # ---- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LlamaConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown LlamaConfig fields: {sorted(unknown)}")
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        if "eos_token_ids" in d:
            d["eos_token_ids"] = tuple(int(x) for x in d["eos_token_ids"])
        return cls(**d)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LlamaConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], dtype: str | None = None) -> "LlamaConfig":
        """From a Hugging Face LLaMA `config.json` (transformers 4 or 5 spelling)."""
        archs = hf.get("architectures") or []
        mt = hf.get("model_type")
        if mt not in (None, "llama") and not any("Llama" in a for a in archs):
            raise ValueError(f"config.json describes model_type {mt!r}, not a LLaMA model")
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if key not in hf:
                raise ValueError(f"config.json lacks {key!r}")
        rope = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type") not in (None, "default") else None)
        theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        rs = None
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "llama3":
                rs = RopeScaling(
                    factor=float(scaling["factor"]),
                    low_freq_factor=float(scaling["low_freq_factor"]),
                    high_freq_factor=float(scaling["high_freq_factor"]),
                    original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
                )
            elif kind not in (None, "default"):
                raise ValueError(f"unsupported rope scaling type {kind!r} (supported: default, llama3)")
        eos = hf.get("eos_token_id", 2)
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        torch_dtype = hf.get("dtype", hf.get("torch_dtype"))
        if dtype is None:
            dtype = torch_dtype if torch_dtype in DTYPES else "bfloat16"
        heads = int(hf["num_attention_heads"])
        head_dim = int(hf.get("head_dim") or 0)
        if head_dim == int(hf["hidden_size"]) // heads:
            head_dim = 0
        return cls(
            vocab_size=int(hf["vocab_size"]),
            dim=int(hf["hidden_size"]),
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or heads),
            ffn_dim=int(hf["intermediate_size"]),
            head_dim=head_dim,
            rope_theta=float(theta),
            rope_scaling=rs,
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            dtype=dtype,
            bos_token_id=hf.get("bos_token_id", 1),
            eos_token_ids=tuple(int(e) for e in eos),
        )

    @classmethod
    def from_meta(cls, params: Mapping[str, Any], vocab_size: int | None = None, dtype: str = "bfloat16") -> "LlamaConfig":
        """From Meta's `params.json`. LLaMA-2 files say vocab_size -1: pass it from the tokenizer or weights."""
        for key in ("dim", "n_layers", "n_heads"):
            if key not in params:
                raise ValueError(f"params.json lacks {key!r}")
        dim = int(params["dim"])
        hidden = 4 * dim
        hidden = int(2 * hidden / 3)
        if params.get("ffn_dim_multiplier") is not None:
            hidden = int(float(params["ffn_dim_multiplier"]) * hidden)
        multiple_of = int(params.get("multiple_of", 256))
        hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
        v = int(params.get("vocab_size", -1))
        if v <= 0:
            if vocab_size is None:
                raise ValueError("params.json has no vocab_size; it must come from the weights or tokenizer")
            v = vocab_size
        rs = None
        if params.get("use_scaled_rope"):
            rs = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
        return cls(
            vocab_size=v,
            dim=dim,
            n_layers=int(params["n_layers"]),
            n_heads=int(params["n_heads"]),
            n_kv_heads=int(params.get("n_kv_heads") or params["n_heads"]),
            ffn_dim=hidden,
            rope_theta=float(params.get("rope_theta", 10000.0)),
            rope_scaling=rs,
            norm_eps=float(params.get("norm_eps", 1e-5)),
            max_position_embeddings=int(params.get("max_seq_len", 4096)),
            dtype=dtype,
        )


LLAMA2_7B = LlamaConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008)
LLAMA2_13B = LlamaConfig(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824)
LLAMA2_70B = LlamaConfig(vocab_size=32000, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672)
PRESETS = {"llama2-7b": LLAMA2_7B, "llama2-13b": LLAMA2_13B, "llama2-70b": LLAMA2_70B}
