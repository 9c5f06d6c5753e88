"""RMSNorm as the authors' GPT-NeoX fork has it (spec §3)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """y = scale ⊙ x / (rms(x) + eps), eps *outside* the square root (unlike most RMSNorms), no bias."""

    def __init__(self, dim: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 statistics for 16-bit inputs
        rms = wide.pow(2).mean(-1, keepdim=True).sqrt()
        return (self.scale * (wide / (rms + self.eps))).to(x.dtype)
