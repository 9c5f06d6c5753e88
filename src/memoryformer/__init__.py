"""MemoryFormer: transformers whose fully-connected layers are hash-table lookups (Ding et al., NeurIPS 2024)."""

from typing import Any

# Import order matters: layers.hashing must be loaded before kernels, which layers.memory_layer uses.
from memoryformer.layers import MemoryBlock, MemoryLayer, RMSNorm, hash_chunks  # isort: skip
from memoryformer.kernels import memory_lookup

__all__ = ["MemoryBlock", "MemoryLayer", "RMSNorm", "build_model", "hash_chunks", "list_models", "memory_lookup"]
__version__ = "0.1.0"

_MODEL_API = {"build_model", "list_models"}


def __getattr__(name: str) -> Any:
    # The model registry imports transformers (seconds); load it only when asked for.
    if name in _MODEL_API:
        from memoryformer import models

        return getattr(models, name)
    raise AttributeError(f"module 'memoryformer' has no attribute {name!r}")
