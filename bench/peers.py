"""Peers: HF transformers `LlamaForCausalLM.generate`, eager (dynamic cache) and with a static cache,
for which transformers compiles the forward itself (torch.compile, CUDA graphs).

Weights: random of the same shape (`--shape`), or our converted checkpoint mapped back to the HF layout
(`to_hf_layers`, the inverse of `hybrid_jax.weights.from_hf_layers`), so both run the same model.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from hybrid_jax.config import LlamaConfig


def hf_config(cfg: LlamaConfig):
    """A transformers LlamaConfig of the same model (the inverse of `LlamaConfig.from_hf`)."""
    from transformers import LlamaConfig as HFConfig

    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
              num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
              head_dim=cfg.hd, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
              max_position_embeddings=cfg.max_position_embeddings, bos_token_id=cfg.bos_token_id,
              eos_token_id=list(cfg.eos_token_ids) or None, pad_token_id=0)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": rs.factor,
                "low_freq_factor": rs.low_freq_factor, "high_freq_factor": rs.high_freq_factor,
                "original_max_position_embeddings": rs.original_max_position_embeddings}
    c = HFConfig(**kw, rope_parameters=rope)
    c.rope_theta = cfg.rope_theta  # older transformers read this attribute
    if cfg.rope_scaling is not None:
        c.rope_scaling = rope
    return c


def to_hf_layers(cfg: LlamaConfig, d: dict) -> dict[str, np.ndarray]:
    """HF-layout state dict from our stacked dict (`weights.to_dict`, numpy arrays)."""
    L, D, H, K, G, Dh = cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.q_per_kv, cfg.hd
    lay = d["layers"]
    out = {"model.embed_tokens.weight": np.asarray(d["embed"]), "model.norm.weight": np.asarray(d["final_norm"])}
    for i in range(L):
        p = f"model.layers.{i}."
        qkv = np.asarray(lay["wqkv"][i])  # [K, G+2, Dh, D]
        out[p + "self_attn.q_proj.weight"] = qkv[:, :G].reshape(H * Dh, D)
        out[p + "self_attn.k_proj.weight"] = qkv[:, G].reshape(K * Dh, D)
        out[p + "self_attn.v_proj.weight"] = qkv[:, G + 1].reshape(K * Dh, D)
        out[p + "self_attn.o_proj.weight"] = np.asarray(lay["wo"][i]).reshape(D, H * Dh)
        w13 = np.asarray(lay["w13"][i])  # [2, F, D]
        out[p + "mlp.gate_proj.weight"] = w13[0]
        out[p + "mlp.up_proj.weight"] = w13[1]
        out[p + "mlp.down_proj.weight"] = np.asarray(lay["w2"][i])
        out[p + "input_layernorm.weight"] = np.asarray(lay["attn_norm"][i])
        out[p + "post_attention_layernorm.weight"] = np.asarray(lay["mlp_norm"][i])
    if d.get("lm_head") is not None:
        out["lm_head.weight"] = np.asarray(d["lm_head"]).T
    return out


def build_model(cfg: LlamaConfig, device: str, dtype: str, weights: dict | None = None, seed: int = 0):
    """A LlamaForCausalLM on `device`: random weights made there, or `weights` (our stacked numpy dict)."""
    import torch
    from transformers import LlamaForCausalLM

    tdt = getattr(torch, dtype)
    torch.manual_seed(seed)
    with torch.device(device):
        m = LlamaForCausalLM._from_config(hf_config(cfg), dtype=tdt)
    if weights is not None:
        sd = {k: torch.from_numpy(np.array(v, np.float32)).to(tdt) for k, v in to_hf_layers(cfg, weights).items()}
        missing, unexpected = m.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise ValueError(f"HF state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        if cfg.tie_embeddings:
            m.tie_weights()
    return m.eval()


class TimingStreamer:
    """A transformers streamer that timestamps every generated token as the host receives it."""

    def __init__(self):
        self.times: list[float] = []
        self.tokens: list[int] = []
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:  # generate() first pushes the prompt
            self._prompt_seen = True
            return
        self.tokens.extend(int(t) for t in value.reshape(-1).tolist())  # the host reads the token
        self.times.append(time.perf_counter())

    def end(self):
        pass


def _streamer_base():
    from transformers.generation.streamers import BaseStreamer

    return type("TimingStreamerHF", (TimingStreamer, BaseStreamer), {})


class HFPeer:
    """`generate` of an HF model, greedy, EOS ignored (min_new_tokens = max_new_tokens) unless `eos` ids are
    given; with `lookup` > 0 transformers' own prompt lookup (prompt_lookup_num_tokens)."""

    def __init__(self, model, device: str, static_cache: bool, max_seq_len: int, lookup: int = 0, eos=None):
        import torch

        self.torch, self.model, self.device = torch, model, device
        self.lookup, self.eos = lookup, (list(eos) if eos else None)
        self._streamer_cls = _streamer_base()
        if static_cache:
            gc = model.generation_config
            gc.cache_implementation = "static"
            gc.max_cache_len = int(max_seq_len)  # transformers >= 5.2x: one cache for every prompt length
            model._previous_max_cache_length = int(max_seq_len)  # earlier versions size the cache from this

    def sync(self):
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def generate(self, ids: Sequence[int], max_new_tokens: int) -> tuple[float, list[float], list[int]]:
        torch = self.torch
        st = self._streamer_cls()
        self.sync()
        t0 = time.perf_counter()
        x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        kw = {"prompt_lookup_num_tokens": self.lookup} if self.lookup else {}
        if self.eos:
            kw["eos_token_id"] = self.eos
        else:
            kw["min_new_tokens"] = max_new_tokens
        with torch.inference_mode():
            self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                do_sample=False, streamer=st, pad_token_id=0, **kw)
        if not st.times:
            raise RuntimeError("generate() streamed no tokens")
        ts = [t0] + st.times
        return ts[1] - t0, list(np.diff(ts[1:])), st.tokens

    def peak_memory(self) -> int | None:
        if self.device.startswith("cuda"):
            return int(self.torch.cuda.max_memory_allocated())
        return None


def torchao_config(scheme: str, device: str):
    """torchao's weight-only config matching our scheme `scheme` (hybrid_jax.quant's names): int8 with one scale
    a row (Int8WeightOnlyConfig, per row), int4 with a scale and an offset per group (Int4WeightOnlyConfig:
    tinygemm's kernel, gpt-fast's, in PyTorch itself; CUDA only). Other schemes have no torchao match: Skip."""
    from hybrid_jax import quant

    from .worker import Skip

    s = quant.parse(scheme)
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
    except ImportError as e:
        raise Skip(f"torchao is not installed ({e}): pip install torchao") from None
    if s.bits == 8 and s.group is None:
        return Int8WeightOnlyConfig()
    if s.bits == 4 and s.asym:
        if not device.startswith("cuda"):
            raise Skip("torchao's int4 weight-only kernel (tinygemm) runs on CUDA only")
        return Int4WeightOnlyConfig(group_size=s.group, int4_packing_format="tile_packed_to_4d")
    raise Skip(f"torchao has no weight-only config matching {s.name} (it has int8 per row and int4 with offsets "
               f"per group: int8, int4-gN-asym)")


def quantize_torchao(model, config) -> None:
    """Quantize, in place, the linear layers of the model's decoder layers (as `convert --quantize` does the four
    layer matrices): the embeddings and the output head stay 16-bit."""
    from torchao.quantization import quantize_

    quantize_(model.model.layers, config)


def hf_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_weights_numpy(model_dir: str) -> tuple[LlamaConfig, dict]:
    """Our checkpoint's config and stacked weights as float32 numpy, restored on the host CPU."""
    from hybrid_jax import checkpoint
    from hybrid_jax import weights as W

    cfg, params = checkpoint.restore(model_dir)
    return cfg, _to_numpy(W.to_dict(params))


def _to_numpy(d):
    if isinstance(d, dict):
        return {k: _to_numpy(v) for k, v in d.items()}
    return np.asarray(d, np.float32)

