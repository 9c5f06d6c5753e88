"""The first Triton kernels of the lookup (kept to compare against, issue 16): the backend ``triton_legacy``.

- ``memory_lookup_forward_kernel``: grid (N/BLOCK_N, H/BLOCK_H); every program hashes all K chunks of its tokens
  again (once per output block) and gathers.
- ``memory_lookup_backward_kernel``: grid (N/BLOCK_N, K); grad_y is read once per chunk and the table gradient is
  scattered with global fp32 atomics, or, deterministic, sorted by row and summed by ``segment_scatter_kernel``.

The kernels in :mod:`memoryformer.kernels.triton.kernels` replace them; the kernel report and ``make bench-gpu``
measure both.
"""

from __future__ import annotations

import triton
import triton.language as tl

from memoryformer.kernels.triton.kernels import _grad_chunk, _hash_chunk


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
        grad_z = _grad_chunk(z, s, grad_w, temperature_ptr, PAPER, ACC)
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
