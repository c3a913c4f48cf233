"""hybrid_jax: low-latency batch-1 LLaMA inference on JAX/XLA."""
from .config import LLAMA2_7B, LLAMA2_13B, LLAMA2_70B, LlamaConfig

__version__ = "0.1.0"
__all__ = ["LlamaConfig", "LLAMA2_7B", "LLAMA2_13B", "LLAMA2_70B", "KernelOptions", "load", "generate"]


def __getattr__(name):  # lazy: keep `import hybrid_jax` light
    if name in ("load", "generate", "Engine", "GenerationResult"):
        # (the submodule is `engine`: a submodule named `generate` would shadow the function once imported)
        from . import engine as _engine
        return getattr(_engine, name)
    if name == "KernelOptions":
        from .options import KernelOptions
        return KernelOptions
    raise AttributeError(name)
