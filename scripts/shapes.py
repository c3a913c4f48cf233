"""The model shapes the GPU scripts take (`--shape`): a preset of hybrid_jax.config, smollm2-135m (or smollm2, as
the suite names it), or "tiny", a small model that dry-runs a script's loop on the CPU."""
from __future__ import annotations

from bench.worker import SMOLLM2_135M  # SmolLM2-135M-Instruct's shape, as the suite's `--shape smollm2` has it
from hybrid_jax.config import PRESETS, LlamaConfig

TINY = LlamaConfig(vocab_size=512, dim=256, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=512, dtype="bfloat16")


def shape_config(name: str) -> LlamaConfig:
    """PRESETS[name], SMOLLM2_135M for "smollm2-135m" or "smollm2", TINY for "tiny". Any other name is an error
    (run 75 timed the tiny shape for a `--shape smollm2` that this function did not know then)."""
    cfg = PRESETS.get(name) or {"smollm2-135m": SMOLLM2_135M, "smollm2": SMOLLM2_135M, "tiny": TINY}.get(name)
    if cfg is None:
        known = sorted(PRESETS) + ["smollm2-135m", "smollm2", "tiny"]
        raise SystemExit(f"unknown --shape {name!r}; known: {', '.join(known)}")
    return cfg


def layer_matrices(cfg: LlamaConfig) -> list[tuple[str, int, int]]:
    """(name, Kd, N) of each layer matrix as the one-token step multiplies by it: N output rows of Kd inputs
    (weights.shapes stores them output-major, [L, (out dims), (in dims)])."""
    K, Gq, Dh = cfg.n_kv_heads, cfg.q_per_kv, cfg.hd
    return [("wqkv", cfg.dim, K * (Gq + 2) * Dh), ("wo", cfg.n_heads * Dh, cfg.dim),
            ("w13", cfg.dim, 2 * cfg.ffn_dim), ("w2", cfg.ffn_dim, cfg.dim)]
