"""Shared fixtures: tiny random HF LLaMA models (the reference) and the SmolLM2 GGUF."""
from __future__ import annotations

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# 8 virtual CPU devices for the tensor-parallel tests (before jax is imported; device 0 stays the default)
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the executable cache's secret goes to a folder of this run, not the user's ~/.config; the test processes a
# test starts (which import this file again) keep the same folder, hence the same secret
if "HYBRID_JAX_TEST_CONFIG_HOME" not in os.environ:
    os.environ["HYBRID_JAX_TEST_CONFIG_HOME"] = tempfile.mkdtemp(prefix="hybrid_jax-test-config-")
os.environ["XDG_CONFIG_HOME"] = os.environ["HYBRID_JAX_TEST_CONFIG_HOME"]
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest

TINY_VARIANTS = {
    # name: kwargs for transformers.LlamaConfig on top of TINY_BASE
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "theta5e5": dict(num_key_value_heads=1, rope_theta=500000.0),
    "llama3": dict(num_key_value_heads=2, max_position_embeddings=512, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
}
TINY_BASE = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def make_hf_model(variant: str = "gqa", seed: int = 0, **overrides):
    """A tiny random `LlamaForCausalLM` (float32, eval mode) with non-trivial norm weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kw = {**TINY_BASE, **TINY_VARIANTS[variant], **overrides}
    m = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    with torch.no_grad():  # norms default to ones: perturb them so that a wrong norm weight shows
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return m


def hf_params(model, cfg):
    """Our stacked weights (jax arrays) from an HF model's state dict."""
    import jax
    import jax.numpy as jnp

    from hybrid_jax import weights

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    return weights.from_dict(jax.tree.map(jnp.asarray, weights.from_hf_layers(cfg, sd.__getitem__)))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="session")
def smollm2_gguf():
    from hybrid_jax.default_model import smollm2_gguf as find

    try:
        return find()
    except FileNotFoundError as e:
        pytest.fail(str(e))  # the test extra installs it: its absence is a broken setup, not a skip


from convert_fixtures import smollm2_dir, spm_dir, tiny_tokenizer_dir  # noqa: E402,F401  (shared fixtures)


class CompileCounter:
    """Counts XLA backend compiles through JAX's own monitoring events (not our runtime's counter)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        import jax

        self.n = 0
        jax.monitoring.register_event_duration_secs_listener(self._on)

    def _on(self, name, dur, **kw):
        if name == self.EVENT:
            self.n += 1


@pytest.fixture(scope="session")
def compile_counter():
    return CompileCounter()
