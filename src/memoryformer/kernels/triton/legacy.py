"""The first Triton lookup (backend ``triton_legacy``), kept to measure the new kernels against (issue 16).

- Forward: one kernel fuses hash, score, gather and bias; a program owns BLOCK_N tokens × BLOCK_H output features,
  loops over the K chunks (re-hashing them for every feature block) and accumulates in fp32 (fp64 for fp64 input).
- Backward: one kernel per (token block, chunk) recomputes the hash from x, forms ∂L/∂w = ⟨g, T[r]⟩ and ∂L/∂x
  (reading grad_y once per chunk), and scatter-adds w·g into an fp32 (fp64) buffer with global atomics. The
  deterministic mode instead sorts the (token, chunk) pairs by row (a host sync for the number of distinct rows)
  and lets one program sum each row's segment in order. ∂L/∂bias = Σ_n g_n is a torch reduction.

Deterministic mode: ``deterministic=True``, or by default when ``MEMORYFORMER_DETERMINISTIC=1`` or
``torch.are_deterministic_algorithms_enabled()``. The default backend ``triton`` is always deterministic.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
from torch.autograd.function import once_differentiable

from memoryformer.kernels.triton import check_lookup_inputs, legacy_kernels
from memoryformer.kernels.triton.kernels import ACCUMULATOR_TYPES
from memoryformer.layers.hashing import Score, check_score

DETERMINISTIC_ENV = "MEMORYFORMER_DETERMINISTIC"


def deterministic_by_default() -> bool:
    """``MEMORYFORMER_DETERMINISTIC=1`` or ``torch.use_deterministic_algorithms(True)`` asks for exact repeats."""
    value = os.environ.get(DETERMINISTIC_ENV, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{DETERMINISTIC_ENV} must be 0 or 1, got {value!r}")
    return value == "1" or torch.are_deterministic_algorithms_enabled()


class LaunchConfig(NamedTuple):
    block_n: int  # tokens per program
    block_h: int  # output features per program (contiguous in a table row: coalesced loads)
    num_warps: int


def launch_config(out_features: int, backward: bool = False) -> LaunchConfig:
    """Tiles of 8 values per thread, sized by register use on sm_80 (ptxas, no spills), not by timing.

    Forward 16 tokens × 64 features, 4 warps: 48 registers. Backward 8 × 128, 4 warps: ~96 registers (it holds
    g, the gathered rows and the scatter addresses at once; 32 × 128 spilled).
    """
    block_n, block_h = (8, 128) if backward else (16, 64)
    return LaunchConfig(block_n, min(block_h, max(16, triton.next_power_of_2(out_features))), num_warps=4)


def _constants(tau: int, score: Score, accumulator: torch.dtype, config: LaunchConfig) -> dict:
    """Compile-time arguments shared by the hash in every kernel."""
    return {
        "TAU": tau,
        "TAU_BLOCK": triton.next_power_of_2(tau),
        "BLOCK_N": config.block_n,
        "PAPER": score == "paper",
        "ACC": ACCUMULATOR_TYPES[accumulator],
    }


def _forward(
    x: torch.Tensor, tables: torch.Tensor, bias: torch.Tensor | None, tau: int, score: Score, temperature: torch.Tensor
) -> torch.Tensor:
    num_tokens, out_features = x.shape[0], tables.shape[1]
    y = torch.empty(num_tokens, out_features, dtype=temperature.dtype, device=x.device)
    if y.numel() == 0:
        return y
    config = launch_config(out_features)
    grid = (triton.cdiv(num_tokens, config.block_n), triton.cdiv(out_features, config.block_h))
    legacy_kernels.memory_lookup_forward_kernel[grid](
        x, tables, bias, temperature, y,
        num_tokens, out_features, x.shape[1] // tau,
        x.stride(0), tables.stride(0), y.stride(0),
        BLOCK_H=config.block_h, HAS_BIAS=bias is not None, num_warps=config.num_warps,
        **_constants(tau, score, temperature.dtype, config),
    )  # fmt: skip
    return y


def _backward(
    x: torch.Tensor,
    tables: torch.Tensor,
    grad_y: torch.Tensor,
    tau: int,
    score: Score,
    temperature: torch.Tensor,
    needs_grad_x: bool,
    needs_grad_tables: bool,
    deterministic: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """∂L/∂x and ∂L/∂tables (each None when not needed); see the module docstring for the two table modes."""
    (num_tokens, width), out_features = x.shape, tables.shape[1]
    num_chunks, accumulator = width // tau, temperature.dtype
    grad_x = torch.zeros_like(x) if needs_grad_x else None
    scatter = needs_grad_tables and not deterministic
    table_buffer = torch.zeros(tables.shape, dtype=accumulator, device=x.device) if scatter else None
    save_hash = needs_grad_tables and deterministic
    rows = torch.empty(num_tokens, num_chunks, dtype=torch.int64, device=x.device) if save_hash else None
    weights = torch.empty(num_tokens, num_chunks, dtype=accumulator, device=x.device) if save_hash else None

    config = launch_config(out_features, backward=True)
    if (needs_grad_x or needs_grad_tables) and num_tokens * num_chunks * out_features:
        grid = (triton.cdiv(num_tokens, config.block_n), num_chunks)
        legacy_kernels.memory_lookup_backward_kernel[grid](
            x, tables, grad_y, temperature, grad_x, table_buffer, rows, weights,
            num_tokens, out_features, num_chunks,
            x.stride(0), tables.stride(0), grad_y.stride(0), width, out_features,
            BLOCK_H=config.block_h, GRAD_X=needs_grad_x, SCATTER_TABLES=scatter, SAVE_HASH=save_hash,
            num_warps=config.num_warps, **_constants(tau, score, accumulator, config),
        )  # fmt: skip

    if not needs_grad_tables:
        return grad_x, None
    if scatter:
        return grad_x, table_buffer.to(tables.dtype)
    grad_tables = torch.zeros_like(tables)
    if rows.numel() and out_features:
        _segment_scatter(grad_y, rows, weights, grad_tables, config)
    return grad_x, grad_tables


def _segment_scatter(
    grad_y: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, grad_tables: torch.Tensor, config: LaunchConfig
) -> None:
    """Deterministic ∂L/∂tables: sort the (token, chunk) pairs by row (stable), then sum each row's run in order."""
    num_chunks = rows.shape[1]
    sorted_rows, order = torch.sort(rows.flatten(), stable=True)
    segment_rows, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    segment_starts = F.pad(counts.cumsum(0), (1, 0))
    out_features = grad_tables.shape[1]
    grid = (segment_rows.numel(), triton.cdiv(out_features, config.block_h))
    legacy_kernels.segment_scatter_kernel[grid](
        grad_y, order // num_chunks, weights.flatten()[order], segment_starts, segment_rows, grad_tables,
        out_features, grad_y.stride(0), grad_tables.stride(0),
        BLOCK_H=config.block_h, ACC=ACCUMULATOR_TYPES[weights.dtype], num_warps=config.num_warps,
    )  # fmt: skip


class LegacyMemoryLookupFunction(torch.autograd.Function):
    """Autograd wiring: save x and the tables, recompute the hash in backward (spec §1, Gradients)."""

    @staticmethod
    def forward(ctx, x, tables, bias, tau, score, temperature, deterministic):
        ctx.save_for_backward(x, tables, temperature)
        ctx.tau, ctx.score, ctx.deterministic = tau, score, deterministic
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _forward(x, tables, bias, tau, score, temperature)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, tables, temperature = ctx.saved_tensors
        needs_grad_x, needs_grad_tables, needs_grad_bias = ctx.needs_input_grad[:3]
        grad_y = grad_y.contiguous()  # e.g. y.sum() hands back an expanded, stride-0 gradient
        grad_x, grad_tables = _backward(
            x, tables, grad_y, ctx.tau, ctx.score, temperature, needs_grad_x, needs_grad_tables, ctx.deterministic
        )
        grad_bias = grad_y.sum(0).to(ctx.bias_dtype) if needs_grad_bias else None
        return grad_x, grad_tables, grad_bias, None, None, None, None


def memory_lookup_triton_legacy(
    x: torch.Tensor,
    tables: torch.Tensor,
    bias: torch.Tensor | None,
    tau: int,
    score: Score = "l1",
    temperature: float = 1.0,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """The first kernels' y [N, h] = Σ_k w_k · tables[r_k] + bias (spec §1); same contract as the others.

    Same contract as :func:`memory_lookup_reference`: returns fp32 (fp64 for fp64 x) whatever the tables' dtype,
    with gradients for x, tables and bias. ``deterministic`` (default: :func:`deterministic_by_default`) makes
    ∂L/∂tables bit-identical across runs at the cost of a sort.
    """
    check_score(score, temperature)
    check_lookup_inputs(x, tables, bias, tau)
    if deterministic is None:
        deterministic = deterministic_by_default()
    accumulator = torch.float64 if x.dtype == torch.float64 else torch.float32
    # A tensor, not a Python float: Triton passes floats as fp32, which would round t in the fp64 path.
    temperature_tensor = torch.full((), temperature, dtype=accumulator, device=x.device)
    bias = None if bias is None else bias.contiguous()
    return LegacyMemoryLookupFunction.apply(
        x.contiguous(), tables.contiguous(), bias, tau, score, temperature_tensor, deterministic
    )


__all__ = ["memory_lookup_triton_legacy"]
