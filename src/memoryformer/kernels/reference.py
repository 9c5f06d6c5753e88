"""The lookup in plain PyTorch: obviously correct, float64-capable, the oracle for every other backend."""

from __future__ import annotations

import torch

from memoryformer.layers.hashing import Score, hash_chunks


def memory_lookup_reference(
    x: torch.Tensor,
    tables: torch.Tensor,
    bias: torch.Tensor | None,
    tau: int,
    score: Score = "l1",
    temperature: float = 1.0,
) -> torch.Tensor:
    """y = Σ_k w_k · tables[r_k] + bias for x [N, K·τ] (spec §1 step 6), accumulated in fp32 or wider."""
    rows, weights = hash_chunks(x, tau, score, temperature)
    acc_dtype = torch.promote_types(weights.dtype, torch.float32)
    gathered = tables[rows].to(acc_dtype)  # [N, K, h]
    y = torch.einsum("nk,nkh->nh", weights.to(acc_dtype), gathered)
    if bias is not None:
        y = y + bias.to(acc_dtype)
    return y
