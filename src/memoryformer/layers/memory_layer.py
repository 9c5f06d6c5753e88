"""Memory Layer and Memory Block: the replacements of `nn.Linear` and of the FFN (spec §1–2)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from memoryformer.kernels import check_backend, memory_lookup
from memoryformer.layers.hashing import Score, check_score

# A single layer's tables beyond this many bytes (fp32) is refused unless the caller raises the limit:
# τ grows memory as 2^τ, and a typo (τ=28) should fail at construction, not deep in an allocator.
DEFAULT_MAX_TABLE_BYTES = 16 * 2**30


def table_bytes(in_features: int, out_features: int, tau: int, bytes_per_value: int = 2) -> int:
    """Bytes of one Memory Layer's tables: K·2^τ rows of out_features values (biases excluded)."""
    return (in_features // tau) * (2**tau) * out_features * bytes_per_value


def block_table_bytes(d: int, tau: int, expand_bits: int = 2, bytes_per_value: int = 2) -> int:
    """Bytes of one Memory Block's tables (ML1 + ML2), the paper's Table 5 (fp16 by default)."""
    num_chunks = d // tau
    hidden = num_chunks * (tau + expand_bits)
    return table_bytes(d, hidden, tau, bytes_per_value) + table_bytes(hidden, d, tau + expand_bits, bytes_per_value)


def check_memory_layer_shape(in_features: int, out_features: int, tau: int, max_table_bytes: int) -> None:
    """Fail early, naming the fix, on shapes a Memory Layer cannot have."""
    if not isinstance(tau, int) or tau < 1:
        raise ValueError(f"tau must be a positive integer number of bits per chunk, got {tau!r}")
    if in_features < 1 or out_features < 1:
        raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
    if in_features % tau:
        raise ValueError(
            f"in_features={in_features} is not divisible by tau={tau}: the input is cut into K chunks of "
            f"tau bits, so in_features must equal K·tau (e.g. {in_features - in_features % tau} or "
            f"{in_features - in_features % tau + tau})"
        )
    nbytes = table_bytes(in_features, out_features, tau, bytes_per_value=4)
    if nbytes > max_table_bytes:
        raise ValueError(
            f"tau={tau} makes this Memory Layer's tables {in_features // tau}×2^{tau}×{out_features} fp32 = "
            f"{nbytes / 1e9:.1f} GB, above the limit of {max_table_bytes / 1e9:.1f} GB; use a smaller tau "
            f"(memory grows as 2^tau) or raise max_table_bytes"
        )


class MemoryLayer(nn.Module):
    """A drop-in for ``nn.Linear(in_features, out_features)`` that looks rows up instead of multiplying.

    y = Σ_k w_k · tables[k·2^τ + code_k] + bias over the K = in_features/τ chunks of the input (spec §1).
    ``score="l1"`` is the authors' weight, ``score="paper"`` the paper's Eq. 5–7 with ``temperature``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        tau: int,
        score: Score = "l1",
        temperature: float = 1.0,
        backend: str = "auto",
        table_std: float = 0.02,
        bias_std: float = 0.001,
        max_table_bytes: int = DEFAULT_MAX_TABLE_BYTES,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_memory_layer_shape(in_features, out_features, tau, max_table_bytes)
        check_score(score, temperature)
        check_backend(backend)
        self.in_features, self.out_features, self.tau = in_features, out_features, tau
        self.num_chunks = in_features // tau
        self.score, self.temperature, self.backend = score, temperature, backend
        self.table_std, self.bias_std = table_std, bias_std
        factory = {"device": device, "dtype": dtype}
        self.tables = nn.Parameter(torch.empty(self.num_chunks * 2**tau, out_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.tables, std=self.table_std)
        nn.init.normal_(self.bias, std=self.bias_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            raise TypeError(f"MemoryLayer expects a floating-point input, got {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"MemoryLayer expects inputs of width in_features={self.in_features}, got shape {tuple(x.shape)}"
            )
        y = memory_lookup(
            x.reshape(-1, self.in_features),
            self.tables,
            self.bias,
            self.tau,
            self.score,
            self.temperature,
            self.backend,
        )
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, tau={self.tau}, "
            f"num_chunks={self.num_chunks}, score={self.score!r}, backend={self.backend!r}"
        )


class MemoryBlock(nn.Module):
    """The FFN replacement ML1 → LayerNorm → ML2 with ``expand_bits`` extra bits per chunk (spec §2).

    ML1 maps d → K·(τ+e); ML2 hashes that as the same K chunks, now of τ+e bits, back to d. No activation
    unless ``activation="gelu"`` (the paper's Table 6 ablation), applied to ML1's output before the norm.
    """

    def __init__(
        self,
        d: int,
        tau: int,
        expand_bits: int = 2,
        activation: Literal["gelu"] | None = None,
        score: Score = "l1",
        temperature: float = 1.0,
        backend: str = "auto",
        table_std: float = 0.02,
        max_table_bytes: int = DEFAULT_MAX_TABLE_BYTES,
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if expand_bits < 0:
            raise ValueError(f"expand_bits must be >= 0, got {expand_bits}")
        if activation not in (None, "gelu"):
            raise ValueError(f"activation must be None or 'gelu', got {activation!r}")
        check_memory_layer_shape(d, d, tau, max_table_bytes)  # reports d % tau before any derived shape
        hidden = (d // tau) * (tau + expand_bits)
        common = {
            "score": score,
            "temperature": temperature,
            "backend": backend,
            "table_std": table_std,
            "max_table_bytes": max_table_bytes,
        }
        self.ml1 = MemoryLayer(d, hidden, tau, **common)
        self.act = nn.GELU() if activation == "gelu" else nn.Identity()
        self.norm = nn.LayerNorm(hidden, eps=layer_norm_eps)
        self.ml2 = MemoryLayer(hidden, d, tau + expand_bits, **common)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ml2(self.norm(self.act(self.ml1(x))))


__all__ = ["MemoryBlock", "MemoryLayer", "block_table_bytes", "table_bytes"]
