"""The Triton kernels of the Memory Layer lookup (spec §1): fused forward, fused backward, deterministic scatter.

Every kernel recomputes the hash of a chunk from x (:func:`_hash_chunk`): backward keeps no codes or weights.
Importing this module requires Triton; :mod:`memoryformer.kernels.triton` imports it only when Triton is present.
Whether the kernels run compiled (CUDA) or in Triton's interpreter (CPU) is fixed when this module is imported,
by ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

INTERPRETED: bool = triton.knobs.runtime.interpret  # read by @triton.jit below, so it says how the kernels run

ACCUMULATOR_TYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _multiply(a, b):
    return a * b


@triton.jit
def _hash_chunk(
    x_ptr,
    temperature_ptr,
    offs_n,
    mask_n,
    k,
    stride_xn,
    TAU: tl.constexpr,
    TAU_BLOCK: tl.constexpr,
    PAPER: tl.constexpr,
    ACC: tl.constexpr,
):
    """Hash chunk k of a block of tokens (spec §1 steps 1–5).

    Returns z [BLOCK_N, TAU_BLOCK] in ACC (0 past τ), the sigmoids s = σ(2|z|) or σ(2|z|/t) (1 past τ, the
    identity of the product), the global rows r = k·2^τ + code (int64) and the weights w, both [BLOCK_N].
    """
    offs_i = tl.arange(0, TAU_BLOCK)
    in_chunk = offs_i < TAU  # TAU_BLOCK is τ rounded up to a power of two, as tl.arange needs
    mask = mask_n[:, None] & in_chunk[None, :]
    z = tl.load(x_ptr + offs_n[:, None] * stride_xn + k * TAU + offs_i[None, :], mask=mask, other=0.0).to(ACC)

    # Code with integer ops, most significant bit first; the shift is clamped because a negative shift is UB.
    bits = ((z >= 0) & in_chunk[None, :]).to(tl.int32)
    shift = tl.where(in_chunk, TAU - 1 - offs_i, 0)
    code = tl.sum(bits << shift[None, :], axis=1)
    rows = (k * (1 << TAU) + code).to(tl.int64)  # fits int32: tables have fewer than 2^31 rows

    magnitude = tl.abs(z)
    if PAPER:
        temperature = tl.load(temperature_ptr).to(ACC)
        s = tl.sigmoid(2 * magnitude / temperature)
    else:
        s = tl.sigmoid(2 * magnitude)
    s = tl.where(in_chunk[None, :], s, 1.0)
    p = tl.reduce(s, 1, _multiply)
    w = p if PAPER else tl.sum(magnitude, axis=1) * p
    return z, s, rows, w


@triton.jit
def memory_lookup_forward_kernel(
    x_ptr,
    tables_ptr,
    bias_ptr,
    temperature_ptr,
    y_ptr,
    N,
    H,
    K,
    stride_xn,
    stride_tr,
    stride_yn,
    TAU: tl.constexpr,
    TAU_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PAPER: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
):
    """y[n, h-block] = Σ_k w_{n,k} · tables[r_{n,k}, h-block] + bias, for a BLOCK_N × BLOCK_H tile (spec §1 step 6).

    Grid: (cdiv(N, BLOCK_N), cdiv(H, BLOCK_H)). Table rows are read along h, so the gathers are coalesced.
    """
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_n = offs_n < N
    mask_h = offs_h < H
    mask = mask_n[:, None] & mask_h[None, :]
    offs_n = offs_n.to(tl.int64)  # N·width can pass 2^31

    acc = tl.zeros((BLOCK_N, BLOCK_H), dtype=ACC)
    for k in range(K):
        _, _, rows, w = _hash_chunk(x_ptr, temperature_ptr, offs_n, mask_n, k, stride_xn, TAU, TAU_BLOCK, PAPER, ACC)
        gathered = tl.load(tables_ptr + rows[:, None] * stride_tr + offs_h[None, :], mask=mask, other=0.0)
        acc += w[:, None] * gathered.to(ACC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_h, mask=mask_h, other=0.0).to(ACC)[None, :]
    tl.store(y_ptr + offs_n[:, None] * stride_yn + offs_h[None, :], acc, mask=mask)


@triton.jit
def memory_lookup_backward_kernel(
    x_ptr,
    tables_ptr,
    grad_y_ptr,
    temperature_ptr,
    grad_x_ptr,
    grad_tables_ptr,
    rows_ptr,
    weights_ptr,
    N,
    H,
    K,
    stride_xn,
    stride_tr,
    stride_gn,
    stride_gxn,
    stride_gtr,
    TAU: tl.constexpr,
    TAU_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PAPER: tl.constexpr,
    GRAD_X: tl.constexpr,
    SCATTER_TABLES: tl.constexpr,
    SAVE_HASH: tl.constexpr,
    ACC: tl.constexpr,
):
    """Gradients of chunk k for a block of tokens (spec §1, Gradients). Grid: (cdiv(N, BLOCK_N), K).

    - GRAD_X: ∂L/∂w_{n,k} = ⟨g_n, tables[r_{n,k}]⟩ accumulated over h-blocks, times ∂w/∂z, into grad_x.
    - SCATTER_TABLES: atomic scatter-add of w_{n,k}·g_n into the ACC-typed buffer grad_tables (order varies).
    - SAVE_HASH: store r_{n,k} and w_{n,k} for the deterministic segment reduction instead.
    """
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1)
    mask_n = offs_n < N
    offs_n = offs_n.to(tl.int64)
    z, s, rows, w = _hash_chunk(x_ptr, temperature_ptr, offs_n, mask_n, k, stride_xn, TAU, TAU_BLOCK, PAPER, ACC)

    grad_w = tl.zeros((BLOCK_N,), dtype=ACC)
    if GRAD_X or SCATTER_TABLES:
        for h_start in range(0, H, BLOCK_H):
            offs_h = h_start + tl.arange(0, BLOCK_H)
            mask = mask_n[:, None] & (offs_h < H)[None, :]
            g = tl.load(grad_y_ptr + offs_n[:, None] * stride_gn + offs_h[None, :], mask=mask, other=0.0).to(ACC)
            if GRAD_X:
                gathered = tl.load(tables_ptr + rows[:, None] * stride_tr + offs_h[None, :], mask=mask, other=0.0)
                grad_w += tl.sum(g * gathered.to(ACC), axis=1)
            if SCATTER_TABLES:
                tl.atomic_add(
                    grad_tables_ptr + rows[:, None] * stride_gtr + offs_h[None, :],
                    w[:, None] * g,
                    mask=mask,
                    sem="relaxed",
                )

    if GRAD_X:
        # ∂w/∂z_i = sign(z_i)·p·(1 + 2‖z‖₁·σ(−2|z_i|)) for l1, sign(z_i)·p·(2/t)·σ(−2|z_i|/t) for paper;
        # σ(−u) is taken as 1 − σ(u) like autograd's sigmoid backward, and sign(0) = 0 as for |z|.
        p = tl.reduce(s, 1, _multiply)
        magnitude = tl.abs(z)
        if PAPER:
            temperature = tl.load(temperature_ptr).to(ACC)
            dw_dmagnitude = p[:, None] * (2 / temperature) * (1 - s)
        else:
            dw_dmagnitude = p[:, None] * (1 + 2 * tl.sum(magnitude, axis=1)[:, None] * (1 - s))
        sign = tl.where(z > 0, 1.0, tl.where(z < 0, -1.0, 0.0)).to(ACC)
        grad_z = grad_w[:, None] * sign * dw_dmagnitude
        offs_i = tl.arange(0, TAU_BLOCK)
        mask = mask_n[:, None] & (offs_i < TAU)[None, :]
        grad_x_ptrs = grad_x_ptr + offs_n[:, None] * stride_gxn + k * TAU + offs_i[None, :]
        tl.store(grad_x_ptrs, grad_z.to(grad_x_ptr.dtype.element_ty), mask=mask)

    if SAVE_HASH:
        tl.store(rows_ptr + offs_n * K + k, rows, mask=mask_n)
        tl.store(weights_ptr + offs_n * K + k, w, mask=mask_n)


@triton.jit
def segment_scatter_kernel(
    grad_y_ptr,
    sorted_tokens_ptr,
    sorted_weights_ptr,
    segment_starts_ptr,
    segment_rows_ptr,
    grad_tables_ptr,
    H,
    stride_gn,
    stride_gtr,
    BLOCK_H: tl.constexpr,
    ACC: tl.constexpr,
):
    """∂L/∂tables[r, h-block] = Σ w·g_n over the (n, k) hashed to row r, summed in sorted order: deterministic.

    One program owns one table row (a segment of the (n, k) pairs sorted by row) and one h-block, so no two
    programs write the same element and the sum order is fixed. Grid: (number of distinct rows, cdiv(H, BLOCK_H)).
    """
    segment = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    start = tl.load(segment_starts_ptr + segment)
    end = tl.load(segment_starts_ptr + segment + 1)
    row = tl.load(segment_rows_ptr + segment)

    acc = tl.zeros((BLOCK_H,), dtype=ACC)
    for j in range(start, end):
        token = tl.load(sorted_tokens_ptr + j)
        w = tl.load(sorted_weights_ptr + j).to(ACC)
        acc += w * tl.load(grad_y_ptr + token * stride_gn + offs_h, mask=mask_h, other=0.0).to(ACC)
    tl.store(grad_tables_ptr + row * stride_gtr + offs_h, acc.to(grad_tables_ptr.dtype.element_ty), mask=mask_h)
