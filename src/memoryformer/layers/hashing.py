"""The hash of a Memory Layer: sign codes and differentiable scores (spec §1, steps 1–5).

The hash is a step of its own so that one hash can feed several tables (Q, K and V share it, spec §3) and so
that diagnostics (bucket usage, paper Figure 4) can read the codes without a lookup.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

Score = Literal["l1", "paper"]
SCORES: tuple[str, ...] = ("l1", "paper")


class ChunkHash(NamedTuple):
    """Result of hashing [N, K·τ] inputs: global table rows and their weights, both [N, K]."""

    rows: torch.Tensor  # int64, r_k = k·2^τ + code_k
    weights: torch.Tensor  # fp32 (fp64 for fp64 input), differentiable w.r.t. the input


def check_score(score: str, temperature: float) -> None:
    """Fail early on an unknown score or a non-positive temperature."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def chunk_codes(z: torch.Tensor) -> torch.Tensor:
    """Codes of chunks z [..., K, τ]: bit 1 for z ≥ 0, most significant bit first (spec §1 steps 2–3).

    Integer arithmetic throughout: a float code is exact only up to 2^11 in fp16.
    """
    tau = z.shape[-1]
    place_values = torch.pow(2, torch.arange(tau - 1, -1, -1, device=z.device))  # MSB first
    return ((z >= 0).to(torch.int64) * place_values).sum(-1)


def chunk_weights(z: torch.Tensor, score: Score = "l1", temperature: float = 1.0) -> torch.Tensor:
    """Weights of chunks z [..., K, τ] (spec §1 step 5), in fp32 or wider.

    - ``l1`` (the authors' code): w = ‖z‖₁ · Π_i σ(2|z_i|)
    - ``paper`` (Eq. 5–7): p = Π_i σ(2|z_i|/t), the softmax over all 2^τ sign patterns of ⟨z, code⟩/t
    """
    z = z if z.dtype == torch.float64 else z.float()
    magnitude = z.abs()
    if score == "l1":
        return magnitude.sum(-1) * torch.sigmoid(2 * magnitude).prod(-1)
    return torch.sigmoid(2 * magnitude / temperature).prod(-1)


def hash_chunks(x: torch.Tensor, tau: int, score: Score = "l1", temperature: float = 1.0) -> ChunkHash:
    """Hash x [..., K·τ] into K chunks of τ bits (spec §1 steps 1–5); returns rows and weights [N, K].

    Leading dimensions are flattened to N tokens.
    """
    d = x.shape[-1]
    if d % tau:
        raise ValueError(f"input width {d} is not divisible by tau={tau}; choose d = K·tau")
    chunks = x.reshape(-1, d // tau, tau)
    num_chunks = chunks.shape[1]
    offsets = torch.arange(num_chunks, device=x.device, dtype=torch.int64) << tau
    return ChunkHash(chunk_codes(chunks) + offsets, chunk_weights(chunks, score, temperature))
