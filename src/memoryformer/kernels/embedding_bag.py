"""The lookup as torch ops: the hash, then one `F.embedding_bag` gather-and-sum.

Portable to any device and the fallback when the fused CPU operator cannot be compiled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memoryformer.layers.hashing import Score, hash_chunks


def memory_lookup_embedding_bag(
    x: torch.Tensor,
    tables: torch.Tensor,
    bias: torch.Tensor | None,
    tau: int,
    score: Score = "l1",
    temperature: float = 1.0,
) -> torch.Tensor:
    """Same contract as :func:`memory_lookup_reference`; returns fp32 (fp64 for fp64 input)."""
    rows, weights = hash_chunks(x, tau, score, temperature)
    acc_dtype = weights.dtype
    # embedding_bag needs one dtype for tables and weights; upcast low-precision tables so sums stay in fp32.
    y = F.embedding_bag(rows, tables.to(acc_dtype), per_sample_weights=weights, mode="sum")
    if bias is not None:
        y = y + bias.to(acc_dtype)
    return y
