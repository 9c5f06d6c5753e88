"""The method: hashing, Memory Layer, Memory Block and the norms of a MemoryFormer block (spec §1–3)."""

from memoryformer.layers.hashing import SCORES, ChunkHash, chunk_codes, chunk_weights, hash_chunks
from memoryformer.layers.memory_layer import MemoryBlock, MemoryLayer, block_table_bytes, table_bytes
from memoryformer.layers.norms import RMSNorm

__all__ = [
    "SCORES",
    "ChunkHash",
    "MemoryBlock",
    "MemoryLayer",
    "RMSNorm",
    "block_table_bytes",
    "chunk_codes",
    "chunk_weights",
    "hash_chunks",
    "table_bytes",
]
