"""The lookup as Triton kernels for CUDA GPUs (spec §1), with the contract of ``memory_lookup_reference``.

Issue 16's layout (kernels in :mod:`memoryformer.kernels.triton.kernels`):

- Forward: ``hash_kernel`` hashes each (token, chunk) once into chunk-major int32 rows and weights [K, N] (saved
  for backward: 8 bytes per token and chunk); ``gather_kernel`` sums w·T[r] + bias over feature blocks in fp32
  (fp64 for fp64 input) whatever the tables' dtype. At small N (decode) the token block shrinks to N and the
  chunks are split across programs, the partial sums added in a fixed order afterwards.
- Backward: ``walk_by_row`` sorts each chunk's tokens by row (stable; the "reverse indices"), and
  ``chunk_grad_kernel`` gives each (chunk, feature block) to one program that walks them a token at a time, each
  thread owning fixed features of the chunk's ∂L/∂tables slice (no barrier): a row's gradient is summed in
  registers and written once, and T[r] is loaded once per row to write ∂L/∂w's per-block partial sums on the way
  (one pass over grad_y). ``grad_x_kernel`` sums them and applies ∂w/∂z. No atomics, no host sync (CUDA-graph
  friendly): the same bits on every run. ∂L/∂bias = Σ_n g_n (torch).
- Gathers in bf16/fp16: tables stored in half precision are gathered as stored; fp32 tables are gathered from a
  half copy when ``gather_dtype`` asks, which by default it does under CUDA autocast (the trainer's mixed
  precision), the way autocast runs ``nn.Linear`` on a half copy of fp32 master weights. The copy is cached per
  table version, so decode does not re-cast; ∂L/∂tables is always returned in the tables' own dtype. bf16 values
  are widened to fp32 by a shift or mask of their bits (exact: bf16 is the top half of an fp32).

Verified without a GPU: the numerics, in Triton's interpreter on CPU (``TRITON_INTERPRET=1`` set before this module
is imported), and the compiled code for sm_80/sm_90 (:mod:`memoryformer.kernels.triton.compile_check` writes the
kernel report). Not verified: running compiled, speed, and the tile sizes (``forward_config``, ``feature_ranges``:
chosen from the compiled code's instruction and register counts and the roofline model, not timed; no
autotuning). The first kernels stay available as the backend ``triton_legacy``
(:mod:`memoryformer.kernels.triton.legacy`) to measure against.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from memoryformer.layers.hashing import Score, check_score

try:
    import triton

    from memoryformer.kernels.triton import kernels
except ImportError:  # the package works without Triton; the backend then reports itself unavailable
    triton = None
    kernels = None

MAX_TAU = 16  # τ is a compile-time constant and codes are int32; 2^16 rows per table is past any configuration
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)
# Programs a forward launch should have to fill a GPU (132 SMs on an H100 × a few resident programs each); below
# this, chunks are split across programs. A constant, not a device query, so a launch is the same on any GPU.
FILL_PROGRAMS = 512
# A split sums at least this many chunks: its loop then pays for the program's set-up and the partial-sum write
# (sm_80, mf-tiny's QKV at N = 1 with bf16 tables: 336 instructions per 1k terms with one chunk per program).
MIN_CHUNKS_PER_SPLIT = 4
VALUES_PER_THREAD = 4  # fp32 × 4 = one 128-bit load per thread and gathered row segment
# gather_kernel's tiles: one warp, 64 accumulators per thread, up to 512 features wide, so each thread gathers 16
# values of every token's row and pays the token's row and weight loads and its address once per 16 values.
# Warp instructions per 1k terms (sm_80, h = 1536, fp32 / bf16 tables): 4 × 512 67 / 97; 2 × 512 75 / 104;
# 2 × 1024 79 / 88; 32 × 128 over 4 warps (8 tokens × 4 values per thread) 138 / 122. bf16 widening costs an
# integer op per value, as much as its FMA. At h = 640 (128-wide blocks) 16 × 128 gives 82 / 114 (8 × 128: 107 /
# 116), at h = 1280 8 × 256 gives 83 / 105.
FORWARD_VALUES_PER_THREAD = 64
FORWARD_BLOCK_H = 512
# chunk_grad_kernel's feature block: 1 warp × 32 threads × 16 fp32 values (four 128-bit loads of g_n per token).
# Warp instructions per 1k terms with fp32 / bf16 tables (sm_80, h = 1536, the walk by row, one segment): 512
# features 118 / 119; 256: 167 / 168; 128: 253 / 254 (a token's loads and addresses and ∂w's sum across the warp,
# 5 shuffles and adds, are paid once per block, so wider blocks cost less per term).
TABLE_BLOCK_H = 512
# The walk's programs: (chunk, feature block, segment of rows). One program per (chunk, feature block) is 192 for
# mf-tiny's QKV, a warp or two per SM walking 16k tokens each, bound by memory latency; segments of rows make it
# WALK_PROGRAMS (~32 one-warp programs resident on each of an H100's 132 SMs), each still walking at least
# MIN_SEGMENT_TOKENS tokens on average to pay for its set-up. Rows, not token ranges, so that no two programs write
# one row: the result is the same bits whatever the split.
WALK_PROGRAMS = 4096
MIN_SEGMENT_TOKENS = 64


def triton_available() -> bool:
    """True when Triton imports and its kernels can run: on a CUDA device, or in the interpreter on CPU."""
    return kernels is not None and (kernels.INTERPRETED or torch.cuda.is_available())


class ForwardConfig(NamedTuple):
    block_n: int  # tokens per program
    block_h: int  # output features per program (contiguous in a table row: coalesced loads)
    splits: int  # programs sharing one (token block, feature block), each summing a range of chunks
    chunks_per_split: int
    num_warps: int


class FeatureRange(NamedTuple):
    """Features [start, start + width) of h, computed by one launch in blocks of block_h (the last masked when
    block_h does not divide width)."""

    start: int
    width: int
    block_h: int


def _warps(block_elements: int) -> int:
    """Warps that give each thread VALUES_PER_THREAD values of a tile: 1 for a decode tile, 4 at most."""
    return max(1, min(4, block_elements // (32 * VALUES_PER_THREAD)))


def forward_config(
    num_tokens: int, features: FeatureRange, num_chunks: int, accumulator: torch.dtype = torch.float32
) -> ForwardConfig:
    """One-warp tiles of FORWARD_VALUES_PER_THREAD // (block_h / 32) tokens (fewer at small N; half as many with
    fp64 accumulators, two registers each) over a feature range, and chunks split across programs until the grid
    fills the GPU."""
    values = FORWARD_VALUES_PER_THREAD * 4 // accumulator.itemsize
    block_n = min(32 * values // features.block_h, triton.next_power_of_2(max(num_tokens, 1)))
    tiles = triton.cdiv(max(num_tokens, 1), block_n) * triton.cdiv(features.width, features.block_h)
    splits = max(1, min(num_chunks, FILL_PROGRAMS // tiles))
    chunks_per_split = max(MIN_CHUNKS_PER_SPLIT, triton.cdiv(num_chunks, splits))
    splits = triton.cdiv(num_chunks, chunks_per_split)  # no empty split
    return ForwardConfig(block_n, features.block_h, splits, chunks_per_split, 1)


def feature_ranges(out_features: int, widest: int) -> list[FeatureRange]:
    """Blocks ``widest`` features wide over as much of h as they divide, then one launch for the rest in a single
    block as wide as the next power of two (h = 640: 512 + 128; 1280: 2 × 512 + 256), so a wide layer pays neither
    for masked features nor for narrow blocks on all of h."""
    wide = out_features // widest * widest
    rest = out_features - wide
    ranges = [FeatureRange(0, wide, widest)] if wide else []
    if rest:
        ranges.append(FeatureRange(wide, rest, triton.next_power_of_2(rest)))
    return ranges


def check_lookup_inputs(x: torch.Tensor, tables: torch.Tensor, bias: torch.Tensor | None, tau: int) -> None:
    """Fail early, naming the fix, on inputs the kernels cannot take."""
    if not isinstance(tau, int) or not 1 <= tau <= MAX_TAU:
        raise ValueError(f"the triton backend supports integer tau in 1..{MAX_TAU}, got {tau!r}")
    if x.dim() != 2:
        raise ValueError(f"x must be [N, K·tau] (flatten leading dimensions first), got shape {tuple(x.shape)}")
    if x.shape[1] % tau:
        raise ValueError(f"input width {x.shape[1]} is not divisible by tau={tau}; choose d = K·tau")
    num_chunks = x.shape[1] // tau
    if tables.dim() != 2 or tables.shape[0] != num_chunks << tau:
        raise ValueError(
            f"tables must be [K·2^tau, h] = [{num_chunks}·2^{tau} = {num_chunks << tau}, h] for an input of width "
            f"{x.shape[1]} (K={num_chunks} chunks of tau={tau} bits), got shape {tuple(tables.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (tables.shape[1],):
        raise ValueError(f"bias must be [h] = [{tables.shape[1]}] like a table row, got shape {tuple(bias.shape)}")
    named = {"x": x, "tables": tables} | ({} if bias is None else {"bias": bias})
    for name, tensor in named.items():
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be one of {SUPPORTED_DTYPES}, got {tensor.dtype}")
    devices = {tensor.device for tensor in named.values()}
    if len(devices) > 1:
        raise ValueError(f"x, tables and bias must be on one device, got {sorted(map(str, devices))}")
    if x.device.type != "cuda" and not kernels.INTERPRETED:
        raise ValueError(
            f"the triton backend runs on CUDA tensors, got {x.device} tensors: move them to a GPU, use "
            f"backend='cpu' or 'embedding_bag', or set TRITON_INTERPRET=1 before importing "
            f"memoryformer.kernels.triton to run the kernels in Triton's (slow) CPU interpreter"
        )


def _index_type(*tensors: torch.Tensor):
    """tl.int32 offsets when every tensor a kernel indexes has fewer than 2^31 elements, else tl.int64."""
    return kernels.tl.int64 if max(t.numel() for t in tensors) >= 2**31 else kernels.tl.int32


def _hash(x: torch.Tensor, tau: int, score: Score, temperature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk-major rows [K, N] (int32, k·2^τ + code) and weights [K, N] (fp32, fp64 for fp64 x) of every token."""
    num_tokens, num_chunks = x.shape[0], x.shape[1] // tau
    rows = torch.empty(num_chunks, num_tokens, dtype=torch.int32, device=x.device)
    weights = torch.empty(num_chunks, num_tokens, dtype=temperature.dtype, device=x.device)
    if rows.numel():
        block_n = min(64, triton.next_power_of_2(num_tokens))
        kernels.hash_kernel[(triton.cdiv(num_tokens, block_n), num_chunks)](
            x, temperature, rows, weights, num_tokens, x.stride(0),
            TAU=tau, TAU_BLOCK=triton.next_power_of_2(tau), BLOCK_N=block_n, PAPER=score == "paper",
            ACC=kernels.ACCUMULATOR_TYPES[temperature.dtype], num_warps=_warps(block_n * tau),
        )  # fmt: skip
    return rows, weights


def _gather(rows: torch.Tensor, weights: torch.Tensor, tables: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y [N, h] = Σ_k weights[k, n] · tables[rows[k, n]] + bias, accumulated in the weights' dtype."""
    (num_chunks, num_tokens), out_features = rows.shape, tables.shape[1]
    if num_tokens * out_features == 0 or num_chunks == 0:
        y = torch.zeros(num_tokens, out_features, dtype=weights.dtype, device=rows.device)
        return y + bias.to(y.dtype) if bias is not None else y
    y = weights.new_empty(num_tokens, out_features)
    for features in feature_ranges(out_features, FORWARD_BLOCK_H):
        config = forward_config(num_tokens, features, num_chunks, weights.dtype)
        columns = slice(features.start, features.start + features.width)
        # Several splits write partial sums, added below in split order: deterministic, no atomics, no host sync.
        if config.splits == 1:
            out = y[None, :, columns]
        else:
            out = weights.new_empty(config.splits, num_tokens, features.width)
        range_bias = None if bias is None else bias[columns]
        fused_bias = range_bias if config.splits == 1 else None
        grid = (triton.cdiv(num_tokens, config.block_n), triton.cdiv(features.width, config.block_h), config.splits)
        kernels.gather_kernel[grid](
            rows, weights, tables[:, columns], fused_bias, out,
            num_tokens, features.width, num_chunks, config.chunks_per_split,
            tables.stride(0), out.stride(1), out.stride(0),
            BLOCK_N=config.block_n, BLOCK_H=config.block_h, EVEN_H=features.width % config.block_h == 0,
            HAS_BIAS=fused_bias is not None, ACC=kernels.ACCUMULATOR_TYPES[weights.dtype],
            INDEX=_index_type(rows, tables, y, out), num_warps=config.num_warps,
        )  # fmt: skip
        if config.splits > 1:
            y[:, columns] = out.sum(0) if range_bias is None else out.sum(0) + range_bias.to(y.dtype)
    return y


class WalkRange(NamedTuple):
    """Features [start, start + width) of h walked by one chunk_grad_kernel launch in blocks of block_h; with
    rest_h, one program walks block_h features and the rest_h (masked to width) after them."""

    start: int
    width: int
    block_h: int
    rest_h: int

    @property
    def blocks(self) -> int:
        return 1 if self.rest_h else triton.cdiv(self.width, self.block_h)


def walk_ranges(out_features: int) -> list[WalkRange]:
    """The walk's launches: TABLE_BLOCK_H-feature blocks, the last of them taking the rest of h too when
    TABLE_BLOCK_H does not divide it (h = 640: one program of 512 + 128; 1280: 512, then 512 + 256), so the rest
    shares that block's per-token loads and branch; h < TABLE_BLOCK_H in one block of the next power of two."""
    if out_features <= TABLE_BLOCK_H:
        return [WalkRange(0, out_features, triton.next_power_of_2(out_features), 0)]
    full, rest = divmod(out_features, TABLE_BLOCK_H)
    if not rest:
        return [WalkRange(0, out_features, TABLE_BLOCK_H, 0)]
    last = (full - 1) * TABLE_BLOCK_H
    ranges = [WalkRange(0, last, TABLE_BLOCK_H, 0)] if last else []
    return [*ranges, WalkRange(last, out_features - last, TABLE_BLOCK_H, triton.next_power_of_2(rest))]


def walk_segments(num_tokens: int, num_chunks: int, num_blocks: int, tau: int) -> int:
    """Segments of rows per chunk for the walk: enough programs to fill a GPU (WALK_PROGRAMS with the chunks and
    feature blocks), each walking about MIN_SEGMENT_TOKENS tokens or more; a power of two ≤ 2^τ."""
    wanted = triton.next_power_of_2(triton.cdiv(WALK_PROGRAMS, num_chunks * num_blocks))
    most = min(1 << tau, 1 << max(0, (num_tokens // MIN_SEGMENT_TOKENS).bit_length() - 1))
    return min(wanted, most)


def walk_by_row(
    rows: torch.Tensor, weights: torch.Tensor, tau: int, num_segments: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """chunk_grad_kernel's walk [K, N, 4] int32 — each chunk's tokens in (row, token) order, the "reverse indices" of
    FAIR's memory layers, as (token, row, weight) steps, the weight's bits in the last fields (fp32: one, fp64: two)
    — and where each of ``num_segments`` equal ranges of a chunk's rows starts in it [K, num_segments + 1] int32. A
    stable sort per chunk and a binary search (on CUDA cub's segmented radix sort: no host sync), 16 bytes per token
    and chunk."""
    sorted_rows, order = torch.sort(rows, dim=1, stable=True)
    weight_bits = weights.gather(1, order).view(torch.int32).view(*rows.shape, -1)  # [K, N, 1 or 2]
    walk = torch.zeros(*rows.shape, kernels.WALK_FIELDS.value, dtype=torch.int32, device=rows.device)
    walk[..., 0], walk[..., 1] = order, sorted_rows
    walk[..., 2 : 2 + weight_bits.shape[-1]] = weight_bits
    chunk_start = torch.arange(rows.shape[0], dtype=torch.int32, device=rows.device)[:, None] << tau
    step = torch.arange(num_segments + 1, dtype=torch.int32, device=rows.device) * ((1 << tau) // num_segments)
    segments = torch.searchsorted(sorted_rows, chunk_start + step, out_int32=True)
    return walk, segments


def _backward(
    x: torch.Tensor,
    tables: torch.Tensor,
    rows: torch.Tensor,
    weights: torch.Tensor,
    grad_y: torch.Tensor,
    tau: int,
    score: Score,
    temperature: torch.Tensor,
    needs_grad_x: bool,
    grad_tables_dtype: torch.dtype | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """∂L/∂x (when needed) and ∂L/∂tables in ``grad_tables_dtype`` (None: not needed); see the module docstring."""
    (num_chunks, num_tokens), out_features = rows.shape, tables.shape[1]
    accumulator = kernels.ACCUMULATOR_TYPES[weights.dtype]
    grad_x = torch.zeros_like(x) if needs_grad_x else None
    needs_grad_tables = grad_tables_dtype is not None
    grad_tables = torch.zeros(tables.shape, dtype=weights.dtype, device=x.device) if needs_grad_tables else None
    if rows.numel() * out_features == 0 or not (needs_grad_x or needs_grad_tables):
        return grad_x, None if grad_tables is None else grad_tables.to(grad_tables_dtype)
    ranges = walk_ranges(out_features)
    blocks = [walk.blocks for walk in ranges]
    # ∂L/∂w's partial sums, one per feature block, in feature order
    partial = weights.new_empty(sum(blocks), num_chunks, num_tokens) if needs_grad_x else None
    num_segments = walk_segments(num_tokens, num_chunks, sum(blocks), tau)
    steps, segments = walk_by_row(rows, weights, tau, num_segments)
    first_block = 0
    for features, num_blocks in zip(ranges, blocks, strict=True):
        columns = slice(features.start, features.start + features.width)
        kernels.chunk_grad_kernel[(num_chunks, num_blocks, num_segments)](
            steps, segments, tables[:, columns], grad_y[:, columns],
            None if grad_tables is None else grad_tables[:, columns],
            None if partial is None else partial[first_block : first_block + num_blocks],
            num_tokens, features.width, tables.stride(0), grad_y.stride(0), out_features,  # grad_tables: contiguous
            BLOCK_H=features.block_h, REST_H=features.rest_h,
            EVEN_H=features.width % features.block_h == 0 or features.rest_h > 0,
            GRAD_TABLES=needs_grad_tables, GRAD_WEIGHTS=needs_grad_x, ACC=accumulator,
            INDEX=_index_type(steps, tables, grad_y, *(t for t in (grad_tables, partial) if t is not None)),
            # One warp: ∂w's sum across the block is shuffles, no barrier. One stage: the kernel prefetches the
            # next token itself (Triton's pipeliner would add copies).
            num_warps=1, num_stages=1,
        )  # fmt: skip
        first_block += num_blocks
    if needs_grad_x:
        block_n = min(64, triton.next_power_of_2(num_tokens))
        kernels.grad_x_kernel[(triton.cdiv(num_tokens, block_n), num_chunks)](
            x, temperature, partial, grad_x, num_tokens, num_chunks, sum(blocks), x.stride(0), grad_x.stride(0),
            TAU=tau, TAU_BLOCK=triton.next_power_of_2(tau), BLOCK_N=block_n, PAPER=score == "paper",
            ACC=accumulator, num_warps=_warps(block_n * tau),
        )  # fmt: skip
    return grad_x, None if grad_tables is None else grad_tables.to(grad_tables_dtype)


class MemoryLookupFunction(torch.autograd.Function):
    """Autograd wiring: hash once in forward, save x, the gathered tables and the hash (8 bytes per token·chunk)."""

    @staticmethod
    def forward(ctx, x, tables, bias, tau, score, temperature, gather_tables):
        rows, weights = _hash(x, tau, score, temperature)
        ctx.save_for_backward(x, gather_tables, rows, weights, temperature)
        ctx.tau, ctx.score = tau, score
        ctx.tables_dtype = tables.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _gather(rows, weights, gather_tables, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, gather_tables, rows, weights, temperature = ctx.saved_tensors
        needs_grad_x, needs_grad_tables, needs_grad_bias = ctx.needs_input_grad[:3]
        grad_y = grad_y.contiguous()  # e.g. y.sum() hands back an expanded, stride-0 gradient
        grad_x, grad_tables = _backward(
            x, gather_tables, rows, weights, grad_y, ctx.tau, ctx.score, temperature,
            needs_grad_x, ctx.tables_dtype if needs_grad_tables else None,
        )  # fmt: skip
        grad_bias = grad_y.sum(0).to(ctx.bias_dtype) if needs_grad_bias else None
        return grad_x, grad_tables, grad_bias, None, None, None, None


# id(fp32 table) → (weak reference to it, its version counter when copied, the half copy). Keyed by id because
# tensors compare elementwise; a finalizer drops the entry with the table.
_HALF_COPIES: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}


def autocast_gather_dtype(tables: torch.Tensor) -> torch.dtype | None:
    """The half dtype CUDA autocast would run fp32 ``tables`` in, or None (autocast off, or tables not fp32)."""
    device_type = tables.device.type
    if device_type != "cuda" or tables.dtype != torch.float32 or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def gather_copy(tables: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``tables`` as gathered: itself, or a ``dtype`` copy cached until the tables change (an optimizer step)."""
    if dtype is None or dtype == tables.dtype:
        return tables
    if dtype not in HALF_DTYPES:
        raise ValueError(f"gather_dtype must be one of {HALF_DTYPES} or None, got {dtype}")
    cached = _HALF_COPIES.get(id(tables))
    if cached is not None and cached[0]() is tables and cached[1] == tables._version and cached[2].dtype == dtype:
        return cached[2]
    copy = tables.detach().to(dtype)
    if cached is None or cached[0]() is not tables:
        weakref.finalize(tables, _HALF_COPIES.pop, id(tables), None)
    _HALF_COPIES[id(tables)] = (weakref.ref(tables), tables._version, copy)
    return copy


def memory_lookup_triton(
    x: torch.Tensor,
    tables: torch.Tensor,
    bias: torch.Tensor | None,
    tau: int,
    score: Score = "l1",
    temperature: float = 1.0,
    gather_dtype: torch.dtype | str | None = "autocast",
) -> torch.Tensor:
    """y [N, h] = Σ_k w_k · tables[r_k] + bias for x [N, K·τ], tables [K·2^τ, h] (spec §1), in Triton.

    Same contract as :func:`memory_lookup_reference`: returns fp32 (fp64 for fp64 x) whatever the tables' dtype,
    with gradients for x, tables and bias; every gradient is the same bits on every run. ``gather_dtype``: gather
    fp32 tables from a bf16/fp16 copy (fp32 accumulation and fp32 ∂L/∂tables all the same); the default
    ``"autocast"`` does so in CUDA autocast's dtype when autocast is on, ``None`` never does.
    """
    if kernels is None:
        raise RuntimeError("the triton backend needs the `triton` package; install it or use backend='cpu'")
    check_score(score, temperature)
    check_lookup_inputs(x, tables, bias, tau)
    if gather_dtype == "autocast":
        gather_dtype = autocast_gather_dtype(tables)
    accumulator = torch.float64 if x.dtype == torch.float64 else torch.float32
    # A tensor, not a Python float: Triton passes floats as fp32, which would round t in the fp64 path.
    temperature_tensor = torch.full((), temperature, dtype=accumulator, device=x.device)
    bias = None if bias is None else bias.contiguous()
    tables = tables.contiguous()
    return MemoryLookupFunction.apply(
        x.contiguous(), tables, bias, tau, score, temperature_tensor, gather_copy(tables, gather_dtype)
    )


__all__ = ["memory_lookup_triton", "triton_available"]
