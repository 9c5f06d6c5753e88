"""MemoryFormer: transformers whose fully-connected layers are hash-table lookups (Ding et al., NeurIPS 2024)."""

# Import order matters: layers.hashing must be loaded before kernels, which layers.memory_layer uses.
from memoryformer.layers import MemoryBlock, MemoryLayer, RMSNorm, hash_chunks  # isort: skip
from memoryformer.kernels import memory_lookup

__all__ = ["MemoryBlock", "MemoryLayer", "RMSNorm", "hash_chunks", "memory_lookup"]
__version__ = "0.1.0"
