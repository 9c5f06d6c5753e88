"""The Triton kernels of the Memory Layer lookup (spec §1), laid out for GPU bandwidth (issue 16).

The hash of each (token, chunk) is computed once, by :func:`hash_kernel`, into chunk-major ``rows`` (int32 global
table rows k·2^τ + code) and ``weights`` [K, N]; every other kernel streams those instead of re-hashing x:

- forward :func:`gather_kernel`: a program owns BLOCK_N tokens × BLOCK_H features and a range of chunks (all of
  them, or a split for small N, summed afterwards in a fixed order), and gathers table rows along h (coalesced,
  128-bit loads) into an fp32 (fp64) accumulator.
- backward :func:`grad_weights_kernel`: ∂L/∂w_{n,k} = ⟨g_n, T[r_{n,k}]⟩ with each grad_y tile read once for all
  K chunks, as per-feature-block partial sums; :func:`grad_x_kernel` sums them in a fixed order and applies
  ∂w/∂z (re-hashing one chunk of x); :func:`table_grad_kernel`: one program per (chunk, feature block) owns that
  chunk's 2^τ × BLOCK_H slice of ∂L/∂tables and walks the tokens in order, so no other program writes it: no
  atomics, no sort, no host sync, the same bits every run.

Offsets are int32 (``INDEX``) unless a tensor has 2^31 elements or more: 64-bit address arithmetic per gathered
row made the gather loop 163 SASS instructions instead of 126 (sm_80, 32 × 128 tile).

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
def _grad_chunk(z, s, grad_w, temperature_ptr, PAPER: tl.constexpr, ACC: tl.constexpr):
    """∂L/∂z [BLOCK_N, TAU_BLOCK] of one chunk from ∂L/∂w [BLOCK_N] and :func:`_hash_chunk`'s z and s.

    ∂w/∂z_i = sign(z_i)·p·(1 + 2‖z‖₁·σ(−2|z_i|)) for l1, sign(z_i)·p·(2/t)·σ(−2|z_i|/t) for paper; σ(−u) is taken
    as 1 − σ(u) like autograd's sigmoid backward, and sign(0) = 0 as for |z| (spec §1, Gradients).
    """
    p = tl.reduce(s, 1, _multiply)
    magnitude = tl.abs(z)
    if PAPER:
        temperature = tl.load(temperature_ptr).to(ACC)
        dw_dmagnitude = p[:, None] * (2 / temperature) * (1 - s)
    else:
        dw_dmagnitude = p[:, None] * (1 + 2 * tl.sum(magnitude, axis=1)[:, None] * (1 - s))
    sign = tl.where(z > 0, 1.0, tl.where(z < 0, -1.0, 0.0)).to(ACC)
    return grad_w[:, None] * sign * dw_dmagnitude


@triton.jit
def hash_kernel(
    x_ptr,
    temperature_ptr,
    rows_ptr,
    weights_ptr,
    N,
    stride_xn,
    TAU: tl.constexpr,
    TAU_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAPER: tl.constexpr,
    ACC: tl.constexpr,
):
    """rows[k, n] = k·2^τ + code_{n,k} (int32) and weights[k, n] = w_{n,k}. Grid: (cdiv(N, BLOCK_N), K)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1)
    mask_n = offs_n < N
    _, _, rows, w = _hash_chunk(x_ptr, temperature_ptr, offs_n.to(tl.int64), mask_n, k, stride_xn, TAU, TAU_BLOCK,
                                PAPER, ACC)  # fmt: skip
    chunk_offset = k.to(tl.int64) * N + offs_n  # chunk-major: every later kernel reads a chunk's tokens contiguously
    tl.store(rows_ptr + chunk_offset, rows.to(tl.int32), mask=mask_n)
    tl.store(weights_ptr + chunk_offset, w, mask=mask_n)


@triton.jit
def gather_kernel(
    rows_ptr,
    weights_ptr,
    tables_ptr,
    bias_ptr,
    out_ptr,
    N,
    H,
    K,
    chunks_per_split,
    stride_tr,
    stride_on,
    stride_os,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    EVEN_H: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    INDEX: tl.constexpr,
):
    """out[split, n, h-block] = Σ_k w_{n,k} · tables[r_{n,k}, h-block] (+ bias) over the split's chunks.

    Grid: (cdiv(N, BLOCK_N), cdiv(H, BLOCK_H), splits). With one split ``out`` is y; with several it is an
    [splits, N, H] buffer summed afterwards (the small-N path: more programs than token blocks × feature blocks).
    Token lanes past N read row 0 with weight 0, so the gather needs no token mask, and none at all when BLOCK_H
    divides H (EVEN_H): the loads stay 128-bit vectors.
    """
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    mask_n = offs_n < N
    mask_h = offs_h < H
    k_start = split * chunks_per_split
    k_end = tl.minimum(k_start + chunks_per_split, K)

    acc = tl.zeros((BLOCK_N, BLOCK_H), dtype=ACC)
    chunk_offset = k_start.to(INDEX) * N + offs_n  # advanced by N per chunk: no multiply in the loop
    rows = tl.load(rows_ptr + chunk_offset, mask=mask_n, other=0)
    w = tl.load(weights_ptr + chunk_offset, mask=mask_n, other=0.0)
    for k in range(k_start, k_end):
        # Prefetch the next chunk's rows and weights: its gather addresses are ready when this one's data lands.
        chunk_offset += N
        has_next = mask_n & (k + 1 < k_end)
        next_rows = tl.load(rows_ptr + chunk_offset, mask=has_next, other=0)
        next_w = tl.load(weights_ptr + chunk_offset, mask=has_next, other=0.0)
        row_ptrs = tables_ptr + rows.to(INDEX)[:, None] * stride_tr + offs_h[None, :]
        gathered = tl.load(row_ptrs) if EVEN_H else tl.load(row_ptrs, mask=mask_h[None, :], other=0.0)
        acc += w[:, None] * gathered.to(ACC)
        rows, w = next_rows, next_w
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_h, mask=mask_h, other=0.0).to(ACC)[None, :]
    out_ptrs = out_ptr + split.to(tl.int64) * stride_os + offs_n.to(tl.int64)[:, None] * stride_on + offs_h[None, :]
    tl.store(out_ptrs, acc, mask=mask_n[:, None] & mask_h[None, :])


@triton.jit
def grad_weights_kernel(
    rows_ptr,
    tables_ptr,
    grad_y_ptr,
    partial_ptr,
    N,
    H,
    K,
    stride_tr,
    stride_gn,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    EVEN_H: tl.constexpr,
    ACC: tl.constexpr,
    INDEX: tl.constexpr,
):
    """partial[h-block, k, n] = ⟨g_n, tables[r_{n,k}]⟩ over one feature block: ∂L/∂w_{n,k} before summing blocks.

    Grid: (cdiv(N, BLOCK_N), cdiv(H, BLOCK_H)). The grad_y tile is loaded once and used for every chunk.
    """
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    h_block = tl.program_id(1)
    offs_h = h_block * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_n = offs_n < N
    mask_h = offs_h < H
    g_ptrs = grad_y_ptr + offs_n.to(INDEX)[:, None] * stride_gn + offs_h[None, :]
    g = tl.load(g_ptrs, mask=mask_n[:, None] & mask_h[None, :], other=0.0).to(ACC)

    chunk_offset = offs_n.to(INDEX)  # advanced by N per chunk
    partial_ptr += h_block.to(INDEX) * K * N
    for _ in range(K):
        rows = tl.load(rows_ptr + chunk_offset, mask=mask_n, other=0)
        row_ptrs = tables_ptr + rows.to(INDEX)[:, None] * stride_tr + offs_h[None, :]
        gathered = tl.load(row_ptrs) if EVEN_H else tl.load(row_ptrs, mask=mask_h[None, :], other=0.0)
        partial = tl.sum(g * gathered.to(ACC), axis=1)
        tl.store(partial_ptr + chunk_offset, partial, mask=mask_n)
        chunk_offset += N


@triton.jit
def grad_x_kernel(
    x_ptr,
    temperature_ptr,
    partial_ptr,
    grad_x_ptr,
    N,
    K,
    num_h_blocks,
    stride_xn,
    stride_gxn,
    TAU: tl.constexpr,
    TAU_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAPER: tl.constexpr,
    ACC: tl.constexpr,
):
    """grad_x[n, chunk k] = ∂L/∂w_{n,k} · ∂w/∂z, summing :func:`grad_weights_kernel`'s blocks in order.

    Grid: (cdiv(N, BLOCK_N), K).
    """
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1)
    mask_n = offs_n < N
    offs_n = offs_n.to(tl.int64)
    z, s, _, _ = _hash_chunk(x_ptr, temperature_ptr, offs_n, mask_n, k, stride_xn, TAU, TAU_BLOCK, PAPER, ACC)
    grad_w = tl.zeros((BLOCK_N,), dtype=ACC)
    partial_offset = k.to(tl.int64) * N + offs_n
    for _ in range(num_h_blocks):  # in block order: the same sum every run
        grad_w += tl.load(partial_ptr + partial_offset, mask=mask_n, other=0.0)
        partial_offset += K.to(tl.int64) * N
    grad_z = _grad_chunk(z, s, grad_w, temperature_ptr, PAPER, ACC)
    offs_i = tl.arange(0, TAU_BLOCK)
    mask = mask_n[:, None] & (offs_i < TAU)[None, :]
    grad_x_ptrs = grad_x_ptr + offs_n[:, None] * stride_gxn + k * TAU + offs_i[None, :]
    tl.store(grad_x_ptrs, grad_z.to(grad_x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_same_rows(same_row, values, ACC: tl.constexpr, BF16_DOT: tl.constexpr):
    """same_row [T, T] (0/1) @ values [T, BLOCK_H]: each token's sum over the tile's tokens sharing its row.

    fp32 on tensor cores without losing bits: values = hi + mid + lo exactly, each part a bf16 (8 significant bits
    each, 24 in all), and a 0/1 matrix times a bf16 is exact, so three bf16 products accumulated in fp32 give the
    fp32 sums (to the accumulator's rounding), not the 8-bit TF32 or bf16 ones. fp64 uses FMA (exact IEEE).
    BF16_DOT=False multiplies the same parts as fp32 operands (identical exact products): Triton's interpreter
    gets bf16 operands of tl.dot wrong, and this keeps the split itself under test there.
    """
    if ACC == tl.float32:  # noqa: SIM300 (ACC is the constexpr argument, tl.float32 the constant)
        ones = tl.where(same_row, 1.0, 0.0).to(tl.bfloat16)  # not bool.to(bf16): the interpreter makes that 0
        hi = values.to(tl.bfloat16)
        rest = values - hi.to(tl.float32)
        mid = rest.to(tl.bfloat16)
        lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
        if not BF16_DOT:
            ones, hi, mid, lo = ones.to(tl.float32), hi.to(tl.float32), mid.to(tl.float32), lo.to(tl.float32)
        summed = tl.dot(ones, hi, out_dtype=tl.float32)
        summed = tl.dot(ones, mid, summed, out_dtype=tl.float32)
        return tl.dot(ones, lo, summed, out_dtype=tl.float32)
    else:
        return tl.dot(same_row.to(ACC), values, input_precision="ieee", out_dtype=ACC)


@triton.jit
def table_grad_kernel(
    rows_ptr,
    weights_ptr,
    grad_y_ptr,
    grad_tables_ptr,
    N,
    H,
    stride_gn,
    stride_gtr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    ACC: tl.constexpr,
    INDEX: tl.constexpr,
    BF16_DOT: tl.constexpr,
):
    """∂L/∂tables[r, h-block] = Σ_n w_{n,k}·g_n over the tokens whose chunk k hashed to r, for one (k, h-block).

    Grid: (K, cdiv(H, BLOCK_H)), chunks fastest so the K programs of one feature block stream the same grad_y
    columns through L2 together. The program is the only writer of rows k·2^τ … k·2^τ+2^τ−1 × its h-block of the
    zero-initialised ACC buffer ``grad_tables`` (2^τ × BLOCK_H × 4 bytes, read and written through L1/L2: on chip as
    far as the caches keep it, which only a GPU run can tell), and walks the tokens BLOCK_T at a time, in order.
    Within a tile, tokens sharing a row (hot rows) are first summed by a [BLOCK_T, BLOCK_T] same-row matrix product
    (:func:`_sum_same_rows`, on tensor cores; skipped when no row repeats in the tile), so only the row's first
    token of the tile reads, adds and writes it: the stores of one tile never collide, and a barrier orders them
    before the next tile's reads. Every sum has a fixed order: the result is the same bits on every run, with no
    atomics, sort or host sync.
    """
    k = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    lanes = tl.arange(0, BLOCK_T)
    for start in range(0, N, BLOCK_T):
        offs_t = start + lanes
        mask_t = offs_t < N
        chunk_offset = k.to(INDEX) * N + offs_t
        rows = tl.load(rows_ptr + chunk_offset, mask=mask_t, other=0)
        w = tl.load(weights_ptr + chunk_offset, mask=mask_t, other=0.0)
        g_ptrs = grad_y_ptr + offs_t.to(INDEX)[:, None] * stride_gn + offs_h[None, :]
        g = tl.load(g_ptrs, mask=mask_t[:, None] & mask_h[None, :], other=0.0).to(ACC)
        rows = tl.where(mask_t, rows, -1 - lanes)  # lanes past N share no row, with anyone
        values = w[:, None] * g
        same_row = rows[:, None] == rows[None, :]
        first_lane = tl.min(tl.where(same_row, lanes[None, :], BLOCK_T), axis=1)
        leads = first_lane == lanes
        if tl.sum((~leads).to(tl.int32), axis=0) == 0:  # no row twice in the tile (the common case): no sums
            summed = values
        else:
            summed = _sum_same_rows(same_row, values, ACC, BF16_DOT)
        leads = leads & mask_t
        slice_ptrs = grad_tables_ptr + rows.to(INDEX)[:, None] * stride_gtr + offs_h[None, :]
        mask = leads[:, None] & mask_h[None, :]
        tl.store(slice_ptrs, tl.load(slice_ptrs, mask=mask, other=0.0) + summed, mask=mask)
        tl.debug_barrier()  # this tile's row writes land before the next tile's reads, which other threads may do
