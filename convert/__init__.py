"""Checkpoint converters (Hugging Face safetensors, Meta consolidated .pth, GGUF) to the hybrid_jax format."""
from .api import convert

__all__ = ["convert"]
