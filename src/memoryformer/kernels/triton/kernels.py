"""The Triton kernels of the Memory Layer lookup (spec §1), laid out for GPU bandwidth (issue 16).

The hash of each (token, chunk) is computed once, by :func:`hash_kernel`, into chunk-major ``rows`` (int32 global
table rows k·2^τ + code) and ``weights`` [K, N]; every other kernel streams those instead of re-hashing x:

- forward :func:`gather_kernel`: a program owns BLOCK_N tokens × BLOCK_H features and a range of chunks (all of
  them, or a split for small N, summed afterwards in a fixed order), and gathers table rows along h (coalesced,
  128-bit loads) into an fp32 (fp64) accumulator.
- backward :func:`chunk_grad_kernel`: one program per (chunk, feature block) owns that chunk's 2^τ × BLOCK_H slice
  of ∂L/∂tables and walks the chunk's tokens grouped by row (a stable sort of the rows, made by the launcher), each
  thread owning fixed features of the slice: a row's gradient sums in registers and is written once, so no other
  program or thread writes what it reads: no atomics, no barrier, no host sync, the same bits every run. On the
  way it writes ∂L/∂w_{n,k} = ⟨g_n, T[r_{n,k}]⟩ over its block as a partial sum, loading T[r] once per row.
  :func:`grad_x_kernel` sums the partials in a fixed order and applies ∂w/∂z (re-hashing one chunk of x).

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
def _widen(values, ACC: tl.constexpr):
    """Table values in ACC. bf16 is the top half of an fp32, so its widening is a shift or mask of the bits (one
    integer op per value, where ptxas's generic conversion spends two on every odd value of a packed pair)."""
    if values.dtype == tl.bfloat16:
        bits = values.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        return bits.to(tl.float32, bitcast=True).to(ACC)
    else:
        return values.to(ACC)


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
        acc += w[:, None] * _widen(gathered, ACC)
        rows, w = next_rows, next_w
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_h, mask=mask_h, other=0.0).to(ACC)[None, :]
    out_ptrs = out_ptr + split.to(tl.int64) * stride_os + offs_n.to(tl.int64)[:, None] * stride_on + offs_h[None, :]
    tl.store(out_ptrs, acc, mask=mask_n[:, None] & mask_h[None, :])


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
    """grad_x[n, chunk k] = ∂L/∂w_{n,k} · ∂w/∂z, summing the feature blocks' partials (from
    :func:`chunk_grad_kernel`) in block order.

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
def _load_features(ptrs, mask_h, EVEN_H: tl.constexpr):
    """A feature block; unmasked when BLOCK_H divides H (a masked load zero-fills its registers first)."""
    if EVEN_H:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=mask_h, other=0.0)


WALK_FIELDS = tl.constexpr(4)  # int32 fields per step of chunk_grad_kernel's walk: token, row, weight (fp64: 2)


@triton.jit
def _walk_step(step_ptr, ACC: tl.constexpr):
    """Token n, row r and weight w of one step of the walk: three loads from one address (16-byte steps)."""
    n = tl.load(step_ptr)
    row = tl.load(step_ptr + 1)
    w = tl.load((step_ptr + 2).to(tl.pointer_type(ACC)))  # fp32 in field 2, fp64 in fields 2–3 (8-byte aligned)
    return n, row, w


@triton.jit
def _weight_gradient(g, gathered, g_rest, gathered_rest, REST_H: tl.constexpr):
    """⟨g_n, T[r]⟩ over a walk block and its rest: ∂L/∂w_{n,k} before the blocks are summed."""
    product = tl.sum(g * gathered)
    if REST_H:
        product += tl.sum(g_rest * gathered_rest)
    return product


@triton.jit
def chunk_grad_kernel(
    walk_ptr,
    segments_ptr,
    tables_ptr,
    grad_y_ptr,
    grad_tables_ptr,
    partial_ptr,
    N,
    H,
    stride_tr,
    stride_gn,
    stride_gtr,
    BLOCK_H: tl.constexpr,
    REST_H: tl.constexpr,
    EVEN_H: tl.constexpr,
    GRAD_TABLES: tl.constexpr,
    GRAD_WEIGHTS: tl.constexpr,
    ACC: tl.constexpr,
    INDEX: tl.constexpr,
):
    """One (chunk k, feature block, segment of rows) of the backward, walking those rows' tokens: with
    GRAD_TABLES, ∂L/∂tables[r, h-block] = Σ_n w_{n,k}·g_n over the tokens whose chunk k hashed to r; with
    GRAD_WEIGHTS, partial[h-block, k, n] = ⟨g_n, tables[r_{n,k}, h-block]⟩ (∂L/∂w_{n,k} before
    :func:`grad_x_kernel` sums blocks).

    Grid: (K, feature blocks, segments), chunks fastest so the programs of one feature block stream the same grad_y
    columns through L2 together. A feature block is BLOCK_H features and, with REST_H, the REST_H after them (a
    launch of one block whose program also takes the features of h that BLOCK_H does not divide: h = 640 is walked
    as 512 + 128 features by one program, so the rest shares the block's per-token loads and branch). ``walk``
    [K, N] lists each chunk's tokens by (row, token) — a stable sort of the rows, the "reverse indices" of FAIR's
    memory layers — as (token, row, weight) steps, and ``segments`` [K, segments + 1] where each segment's rows
    start in it (segments split a chunk's 2^τ rows evenly). So a row's tokens come one after another: its sum
    Σ w·g builds up in registers and is written once, when the row changes (no read-modify-write per token, no
    repeated-row hazard), and T[r] is loaded once per row for ∂w (a token only loads g_n). The program is the only
    writer of its rows × its features of the zero-initialised ``grad_tables`` and of its tokens' partials; each
    row's sum runs in token order: no atomics, no barrier, no host sync, the same bits on every run (and as
    summing the tokens in order). Every feature stays in one thread for the whole walk (one layout: no shared
    memory in the loop). ∂w needs a sum across the block's threads per token: launched with one warp it is 5
    shuffles and no barrier (and 5 more for the rest).

    The next token's index, row, weight and g_n are loaded before this token's work (their latency overlaps it);
    the row change is a branch on a scalar, uniform across the warp.
    """
    k = tl.program_id(0)
    h_block = tl.program_id(1)
    segment_ptr = segments_ptr + k * (tl.num_programs(2) + 1) + tl.program_id(2)
    start = tl.load(segment_ptr)
    steps = tl.load(segment_ptr + 1) - start
    if steps > 0:
        offs_h = h_block * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        g_ptrs = grad_y_ptr + offs_h
        table_ptrs = tables_ptr + tl.max_contiguous(offs_h, 4)  # 4 per load: the layout of the fp32 vectors
        g_rest, gathered_rest = None, None  # without a rest: never assigned, and unused
        if REST_H:  # the features after the block, in the one program of this launch
            offs_rest = BLOCK_H + tl.arange(0, REST_H)
            mask_rest = offs_rest < H
            g_rest_ptrs = grad_y_ptr + offs_rest
            table_rest_ptrs = tables_ptr + tl.max_contiguous(offs_rest, 4)
        walk_ptr += (k.to(INDEX) * N + start) * WALK_FIELDS  # the segment's steps, contiguous

        n, row, w = _walk_step(walk_ptr, ACC)
        g = _load_features(g_ptrs + n.to(INDEX) * stride_gn, mask_h, EVEN_H).to(ACC)
        if REST_H:
            g_rest = tl.load(g_rest_ptrs + n.to(INDEX) * stride_gn, mask=mask_rest, other=0.0).to(ACC)
        if GRAD_WEIGHTS:
            partial_ptr += (h_block.to(INDEX) * tl.num_programs(0) + k) * N
            gathered = _widen(_load_features(table_ptrs + row.to(INDEX) * stride_tr, mask_h, EVEN_H), ACC)
            if REST_H:
                rows_rest = table_rest_ptrs + row.to(INDEX) * stride_tr
                gathered_rest = _widen(tl.load(rows_rest, mask=mask_rest, other=0.0), ACC)
        if GRAD_TABLES:
            slice_ptrs = grad_tables_ptr + offs_h
            total = tl.zeros((BLOCK_H,), dtype=ACC)
            if REST_H:
                slice_rest_ptrs = grad_tables_ptr + offs_rest
                total_rest = tl.zeros((REST_H,), dtype=ACC)
        for p in tl.range(1, steps, loop_unroll_factor=4):  # loads step p, finishes step p − 1
            next_n, next_row, next_w = _walk_step(walk_ptr + p * WALK_FIELDS, ACC)
            next_g = _load_features(g_ptrs + next_n.to(INDEX) * stride_gn, mask_h, EVEN_H).to(ACC)
            if REST_H:
                next_g_rest = tl.load(g_rest_ptrs + next_n.to(INDEX) * stride_gn, mask=mask_rest, other=0.0)
            if GRAD_WEIGHTS:
                tl.store(partial_ptr + n, _weight_gradient(g, gathered, g_rest, gathered_rest, REST_H))
            if GRAD_TABLES:
                total += w * g
                if REST_H:
                    total_rest += w * g_rest
            if next_row != row:  # once per distinct row
                if GRAD_TABLES:
                    tl.store(slice_ptrs + row.to(INDEX) * stride_gtr, total, mask=mask_h)
                    total = tl.zeros((BLOCK_H,), dtype=ACC)
                    if REST_H:
                        tl.store(slice_rest_ptrs + row.to(INDEX) * stride_gtr, total_rest, mask=mask_rest)
                        total_rest = tl.zeros((REST_H,), dtype=ACC)
                if GRAD_WEIGHTS:
                    next_rows = table_ptrs + next_row.to(INDEX) * stride_tr
                    gathered = _widen(_load_features(next_rows, mask_h, EVEN_H), ACC)
                    if REST_H:
                        next_rows = table_rest_ptrs + next_row.to(INDEX) * stride_tr
                        gathered_rest = _widen(tl.load(next_rows, mask=mask_rest, other=0.0), ACC)
            n, row, w, g = next_n, next_row, next_w, next_g
            if REST_H:
                g_rest = next_g_rest.to(ACC)
        if GRAD_WEIGHTS:
            tl.store(partial_ptr + n, _weight_gradient(g, gathered, g_rest, gathered_rest, REST_H))
        if GRAD_TABLES:
            tl.store(slice_ptrs + row.to(INDEX) * stride_gtr, total + w * g, mask=mask_h)
            if REST_H:
                tl.store(slice_rest_ptrs + row.to(INDEX) * stride_gtr, total_rest + w * g_rest, mask=mask_rest)
