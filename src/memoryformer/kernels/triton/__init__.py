"""The lookup as Triton kernels for CUDA GPUs (spec §1), with the contract of ``memory_lookup_reference``.

Issue 16's layout (kernels in :mod:`memoryformer.kernels.triton.kernels`):

- Forward: ``hash_kernel`` hashes each (token, chunk) once into chunk-major int32 rows and weights [K, N] (saved
  for backward: 8 bytes per token and chunk); ``gather_kernel`` sums w·T[r] + bias over feature blocks in fp32
  (fp64 for fp64 input) whatever the tables' dtype. At small N (decode) the token block shrinks to N and the
  chunks are split across programs, the partial sums added in a fixed order afterwards.
- Backward: ``chunk_grad_kernel`` gives each (chunk, feature block) to one program that walks the tokens in
  order, a token at a time, each thread owning fixed features of the chunk's ∂L/∂tables slice (no barrier); where
  its blocks are ≥ 256 wide and divide h it also gathers T[r] and writes ∂L/∂w's per-block partial sums on the way
  (one pass over grad_y and the tables), elsewhere ``grad_weights_kernel`` computes them in token tiles.
  ``grad_x_kernel`` sums them and applies ∂w/∂z. No atomics, no sort, no host sync (CUDA-graph friendly): the
  same bits on every run. ∂L/∂bias = Σ_n g_n (torch).
- Gathers in bf16/fp16: tables stored in half precision are gathered as stored; fp32 tables are gathered from a
  half copy when ``gather_dtype`` asks, which by default it does under CUDA autocast (the trainer's mixed
  precision), the way autocast runs ``nn.Linear`` on a half copy of fp32 master weights. The copy is cached per
  table version, so decode does not re-cast; ∂L/∂tables is always returned in the tables' own dtype. bf16 values
  are widened to fp32 by a shift or mask of their bits (exact: bf16 is the top half of an fp32).

Verified without a GPU: the numerics, in Triton's interpreter on CPU (``TRITON_INTERPRET=1`` set before this module
is imported), and the compiled code for sm_80/sm_90 (:mod:`memoryformer.kernels.triton.compile_check` writes the
kernel report). Not verified: running compiled, speed, and the tile sizes in the ``*_config`` functions (chosen
from register counts and the roofline model, not timed; no autotuning). The first kernels stay available as the
backend ``triton_legacy`` (:mod:`memoryformer.kernels.triton.legacy`) to measure against.
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
VALUES_PER_THREAD = 4  # fp32 × 4 = one 128-bit load per thread and gathered row segment
# chunk_grad_kernel's feature block: 1 warp × 32 threads × 16 fp32 values (four 128-bit loads of g_n and of the slice
# row per token). Fused, warp instructions per 1k terms with bf16 / fp32 tables (sm_80, h = 3072): 16 values per
# thread 228 / 197; 8 values 297 / 265; 2 warps × 8 values 334 / 305 (∂w's per-token sum across warps costs 3
# barriers); 32 values 201 / 169 (182 registers, no spills) but half as many programs, and each program walks
# every token serially: the walk has too few programs already (K·h/512: 192 for mf-tiny's QKV).
TABLE_VALUES_PER_THREAD = 16
TABLE_BLOCK_H = 512
# The narrowest block that computes ∂w too: 256 features (mf-base's ML1, h = 1280) cost 297 / 265 fused vs 283 / 337
# with grad_weights_kernel.
FUSED_BLOCK_H = 256


def triton_available() -> bool:
    """True when Triton imports and its kernels can run: on a CUDA device, or in the interpreter on CPU."""
    return kernels is not None and (kernels.INTERPRETED or torch.cuda.is_available())


class ForwardConfig(NamedTuple):
    block_n: int  # tokens per program
    block_h: int  # output features per program (contiguous in a table row: coalesced loads)
    splits: int  # programs sharing one (token block, feature block), each summing a range of chunks
    chunks_per_split: int
    num_warps: int


class BackwardConfig(NamedTuple):
    table_block_h: int  # features per chunk_grad program (it owns a 2^τ × table_block_h fp32 slice of ∂L/∂tables)
    table_num_warps: int  # every thread owns table_block_h / (32 · warps) features
    fused: bool  # chunk_grad also computes ∂L/∂w; else grad_weights does, in tiles of:
    block_n: int  # tokens per grad_weights program
    block_h: int  # features per grad_weights program
    num_warps: int  # grad_weights


def _feature_block(out_features: int, widest: int) -> int:
    """The widest power-of-two feature block ≤ ``widest`` that divides h (unmasked loads), if one ≥ 64 does."""
    block = min(widest, max(16, triton.next_power_of_2(out_features)))
    dividing = block
    while out_features % dividing and dividing > 64:
        dividing //= 2
    return dividing if out_features % dividing == 0 else block


def _warps(block_elements: int) -> int:
    """Warps that give each thread VALUES_PER_THREAD values of a tile: 1 for a decode tile, 4 at most."""
    return max(1, min(4, block_elements // (32 * VALUES_PER_THREAD)))


def forward_config(num_tokens: int, out_features: int, num_chunks: int) -> ForwardConfig:
    """Tiles of up to 32 tokens × 128 features, 4 warps (sm_80, ptxas: 64 registers with bf16 tables, 96 with fp32,
    no spills; 256 features cost 128/168 registers for 6% fewer instructions per term); fewer tokens at small N,
    and chunks split across programs until the grid fills the GPU."""
    block_n = min(32, triton.next_power_of_2(max(num_tokens, 1)))
    block_h = _feature_block(out_features, 128)
    tiles = triton.cdiv(max(num_tokens, 1), block_n) * triton.cdiv(out_features, block_h)
    splits = max(1, min(num_chunks, FILL_PROGRAMS // tiles))
    chunks_per_split = triton.cdiv(num_chunks, splits)
    splits = triton.cdiv(num_chunks, chunks_per_split)  # no empty split
    return ForwardConfig(block_n, block_h, splits, chunks_per_split, _warps(block_n * block_h))


def backward_config(num_tokens: int, out_features: int) -> BackwardConfig:
    """chunk_grad programs of up to TABLE_BLOCK_H features, TABLE_VALUES_PER_THREAD per thread (each owns a
    2^τ × 512 fp32 slice: 512 KB at τ=8, 2 MB at τ=10), computing ∂L/∂w on the way when the block divides h and is
    at least FUSED_BLOCK_H wide. Narrower or masked blocks spend more per term on the per-token ∂w sum than a
    separate pass does (h = 640, sm_80, bf16 tables: 420 with 128 features, 400 with 256 masked, vs 143 + 178
    instructions per 1k terms), so there ``grad_weights_kernel`` computes ∂w in tiles like the forward's (32 × 128
    is within 5% of 64 × 64, 64 × 128 and 16 × 256 per term)."""
    table_block_h = _feature_block(out_features, TABLE_BLOCK_H)
    table_num_warps = max(1, table_block_h // (32 * TABLE_VALUES_PER_THREAD))
    fused = table_block_h >= FUSED_BLOCK_H and out_features % table_block_h == 0
    block_n = min(32, triton.next_power_of_2(max(num_tokens, 1)))
    block_h = _feature_block(out_features, 128)
    return BackwardConfig(table_block_h, table_num_warps, fused, block_n, block_h, _warps(block_n * block_h))


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
    config = forward_config(num_tokens, out_features, num_chunks)
    # Several splits write partial sums, added below in split order: deterministic, no atomics, no host sync.
    out = weights.new_empty(config.splits, num_tokens, out_features)
    fused_bias = bias if config.splits == 1 else None
    grid = (triton.cdiv(num_tokens, config.block_n), triton.cdiv(out_features, config.block_h), config.splits)
    kernels.gather_kernel[grid](
        rows, weights, tables, fused_bias, out,
        num_tokens, out_features, num_chunks, config.chunks_per_split,
        tables.stride(0), out.stride(1), out.stride(0),
        BLOCK_N=config.block_n, BLOCK_H=config.block_h, EVEN_H=out_features % config.block_h == 0,
        HAS_BIAS=fused_bias is not None, ACC=kernels.ACCUMULATOR_TYPES[weights.dtype],
        INDEX=_index_type(rows, tables, out), num_warps=config.num_warps,
    )  # fmt: skip
    if config.splits == 1:
        return out[0]
    y = out.sum(0)
    return y + bias.to(y.dtype) if bias is not None else y


def walk_by_row(rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """chunk_grad_kernel's walk [K, N, 4] int32: each chunk's tokens in (row, token) order, the "reverse indices"
    of FAIR's memory layers, as (token, row, weight) steps, the weight's bits in the last fields (fp32: one, fp64:
    two). A stable sort per chunk (on CUDA cub's segmented radix sort: no host sync), 16 bytes per token and chunk."""
    sorted_rows, order = torch.sort(rows, dim=1, stable=True)
    weight_bits = weights.gather(1, order).view(torch.int32).view(*rows.shape, -1)  # [K, N, 1 or 2]
    walk = torch.zeros(*rows.shape, kernels.WALK_FIELDS.value, dtype=torch.int32, device=rows.device)
    walk[..., 0], walk[..., 1] = order, sorted_rows
    walk[..., 2 : 2 + weight_bits.shape[-1]] = weight_bits
    return walk


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
    config = backward_config(num_tokens, out_features)
    empty = rows.numel() * out_features == 0

    grad_x = torch.zeros_like(x) if needs_grad_x else None
    needs_grad_tables = grad_tables_dtype is not None
    grad_tables = torch.zeros(tables.shape, dtype=weights.dtype, device=x.device) if needs_grad_tables else None
    fused = needs_grad_x and config.fused  # ∂L/∂w partial sums from the table-gradient walk
    if not empty and (needs_grad_tables or fused):
        num_h_blocks = triton.cdiv(out_features, config.table_block_h)
        partial = weights.new_empty(num_h_blocks, num_chunks, num_tokens) if fused else None
        kernels.chunk_grad_kernel[(num_chunks, num_h_blocks)](
            walk_by_row(rows, weights), tables, grad_y, grad_tables, partial, num_tokens, out_features,
            tables.stride(0), grad_y.stride(0), out_features,  # grad_tables: new, contiguous
            BLOCK_H=config.table_block_h, EVEN_H=out_features % config.table_block_h == 0,
            GRAD_TABLES=needs_grad_tables, GRAD_WEIGHTS=fused, ACC=accumulator,
            INDEX=_index_type(rows, tables, grad_y, *(t for t in (grad_tables, partial) if t is not None)),
            # One stage: the kernel prefetches the next token itself (Triton's pipeliner would add copies).
            num_warps=config.table_num_warps, num_stages=1,
        )  # fmt: skip
    if needs_grad_x and not empty:
        if not fused:
            num_h_blocks = triton.cdiv(out_features, config.block_h)
            partial = weights.new_empty(num_h_blocks, num_chunks, num_tokens)
            kernels.grad_weights_kernel[(triton.cdiv(num_tokens, config.block_n), num_h_blocks)](
                rows, tables, grad_y, partial, num_tokens, out_features, num_chunks,
                tables.stride(0), grad_y.stride(0),
                BLOCK_N=config.block_n, BLOCK_H=config.block_h, EVEN_H=out_features % config.block_h == 0,
                ACC=accumulator, INDEX=_index_type(rows, tables, grad_y, partial), num_warps=config.num_warps,
            )  # fmt: skip
        block_n = min(64, triton.next_power_of_2(num_tokens))
        kernels.grad_x_kernel[(triton.cdiv(num_tokens, block_n), num_chunks)](
            x, temperature, partial, grad_x, num_tokens, num_chunks, num_h_blocks, x.stride(0), grad_x.stride(0),
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
