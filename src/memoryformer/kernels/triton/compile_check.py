"""Compile the lookup kernels for a CUDA architecture on a machine without a GPU.

The interpreter checks what the kernels compute, not that the NVIDIA backend accepts them; this lowers each kernel
specialization the backend would see (scores, accumulator and storage dtypes, gradient modes, τ at both ends)
through TTIR → PTX → cubin with the ``ptxas`` bundled in the Triton wheel. It does not run them.

Usage (``TRITON_INTERPRET`` must be unset or 0)::

    python -m memoryformer.kernels.triton.compile_check [--arch 80]
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from memoryformer.kernels.triton import kernels, launch_config

TYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
TYPE_NAMES[torch.int64] = "i64"

f16, bf16, f32, f64, i64 = torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64


def _source(kernel, pointers: dict[str, torch.dtype | None], constexprs: dict) -> ASTSource:
    """An ASTSource with pointer args typed as given (None: an absent, constexpr-None pointer), other args i32."""
    signature, constants = {}, dict(constexprs)
    for name in kernel.arg_names:
        if name in constexprs or pointers.get(name, i64) is None:
            signature[name] = "constexpr"
            constants.setdefault(name, None)
        elif name in pointers:
            signature[name] = "*" + TYPE_NAMES[pointers[name]]
        else:
            signature[name] = "i32"
    return ASTSource(kernel, signature, constants)


def kernel_variants(out_features: int = 512) -> Iterator[tuple[str, ASTSource, int]]:
    """(name, source, num_warps) of the specializations worth compiling, tiled as :func:`launch_config` tiles
    ``out_features``: each kernel in fp32 and fp64, both scores, each gradient mode, τ at both ends.
    """
    forward_tile, backward_tile = launch_config(out_features), launch_config(out_features, backward=True)

    def hash_constants(tau: int, paper: bool, acc: torch.dtype) -> dict:
        acc_type = {f32: tl.float32, f64: tl.float64}[acc]
        return {"TAU": tau, "TAU_BLOCK": triton.next_power_of_2(tau), "PAPER": paper, "ACC": acc_type}

    forward = kernels.memory_lookup_forward_kernel
    for name, x, table, bias, acc, tau, paper in [
        ("forward fp32 x, bf16 tables, l1, τ=8", f32, bf16, bf16, f32, 8, False),
        ("forward fp64, no bias, paper, τ=10", f64, f64, None, f64, 10, True),
        ("forward fp16, l1, τ=16", f16, f16, f16, f32, 16, False),
    ]:
        pointers = {"x_ptr": x, "tables_ptr": table, "bias_ptr": bias, "temperature_ptr": acc, "y_ptr": acc}
        constants = hash_constants(tau, paper, acc) | {"HAS_BIAS": bias is not None}
        constants |= {"BLOCK_N": forward_tile.block_n, "BLOCK_H": forward_tile.block_h}
        yield name, _source(forward, pointers, constants), forward_tile.num_warps

    backward = kernels.memory_lookup_backward_kernel
    for name, x, table, acc, tau, paper, grad_x, mode in [
        ("backward fp32, bf16 tables, paper, atomic, τ=8", f32, bf16, f32, 8, True, True, "atomic"),
        ("backward fp64, l1, deterministic, τ=10", f64, f64, f64, 10, False, True, "deterministic"),
        ("backward fp32, tables only, atomic, τ=1", f32, f32, f32, 1, False, False, "atomic"),
    ]:
        atomic, deterministic = mode == "atomic", mode == "deterministic"
        pointers = {
            "x_ptr": x,
            "tables_ptr": table,
            "grad_y_ptr": acc,
            "temperature_ptr": acc,
            "grad_x_ptr": x if grad_x else None,
            "grad_tables_ptr": acc if atomic else None,
            "rows_ptr": i64 if deterministic else None,
            "weights_ptr": acc if deterministic else None,
        }
        constants = hash_constants(tau, paper, acc) | {
            "BLOCK_N": backward_tile.block_n,
            "BLOCK_H": backward_tile.block_h,
        }
        constants |= {"GRAD_X": grad_x, "SCATTER_TABLES": atomic, "SAVE_HASH": deterministic}
        yield name, _source(backward, pointers, constants), backward_tile.num_warps

    scatter = kernels.segment_scatter_kernel
    for name, acc, table in [("segment scatter fp32 → bf16", f32, bf16), ("segment scatter fp64", f64, f64)]:
        pointers = {"grad_y_ptr": acc, "sorted_weights_ptr": acc, "grad_tables_ptr": table}
        pointers |= dict.fromkeys(("sorted_tokens_ptr", "segment_starts_ptr", "segment_rows_ptr"), i64)
        constants = {"BLOCK_H": backward_tile.block_h, "ACC": {f32: tl.float32, f64: tl.float64}[acc]}
        yield name, _source(scatter, pointers, constants), backward_tile.num_warps


def compile_all(arch: int = 80) -> list[str]:
    """Compile every variant to a cubin for sm_``arch``; returns their names. Raises on the first failure."""
    if kernels.INTERPRETED:
        raise RuntimeError("the kernels were defined for the interpreter: run with TRITON_INTERPRET unset or 0")
    target = GPUTarget("cuda", arch, 32)
    names = []
    for name, source, num_warps in kernel_variants():
        compiled = triton.compile(source, target=target, options={"num_warps": num_warps})
        if not compiled.asm.get("cubin"):
            raise RuntimeError(f"{name}: no cubin produced for sm_{arch}")
        names.append(name)
    return names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=80, help="CUDA compute capability as an integer, e.g. 80, 90")
    args = parser.parse_args(argv)
    for name in compile_all(args.arch):
        print(f"sm_{args.arch} ok: {name}")


if __name__ == "__main__":
    main()
