"""The lookup Σ_k w_k · T[r_k] + bias behind one function, with backends chosen by device (spec §1).

Backends (all share the contract of :func:`memory_lookup_reference`):

- ``reference``: plain PyTorch, the oracle for tests (float64-capable).
- ``embedding_bag``: the hash as torch ops + ``F.embedding_bag``; portable, the fallback.
- ``cpu``: one fused C++ operator (hash + score + gather + bias, OpenMP over tokens), compiled on first use.
- ``triton``: Triton kernels for CUDA GPUs (tested on CPU under ``TRITON_INTERPRET=1``).
- ``triton_legacy``: the first Triton kernels (atomic table gradients), kept to benchmark against (issue 16).
- ``auto``: ``triton`` on CUDA, ``cpu`` on CPU when it compiles, else ``embedding_bag``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from memoryformer.kernels.embedding_bag import memory_lookup_embedding_bag
from memoryformer.kernels.reference import memory_lookup_reference
from memoryformer.layers.hashing import Score

BACKENDS: tuple[str, ...] = ("auto", "reference", "embedding_bag", "cpu", "triton", "triton_legacy")

LookupFn = Callable[..., torch.Tensor]


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown lookup backend {backend!r}; choose one of {BACKENDS}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend that ``backend`` means on ``device``."""
    check_backend(backend)
    if backend != "auto":
        return backend
    if device.type == "cuda":
        from memoryformer.kernels.triton import triton_available

        return "triton" if triton_available() else "embedding_bag"
    if device.type == "cpu":
        from memoryformer.kernels.cpu import cpu_kernel_available

        return "cpu" if cpu_kernel_available() else "embedding_bag"
    return "embedding_bag"


def lookup_function(backend: str) -> LookupFn:
    """The implementation of a concrete backend name."""
    if backend == "reference":
        return memory_lookup_reference
    if backend == "embedding_bag":
        return memory_lookup_embedding_bag
    if backend == "cpu":
        from memoryformer.kernels.cpu import memory_lookup_cpu

        return memory_lookup_cpu
    if backend == "triton":
        from memoryformer.kernels.triton import memory_lookup_triton

        return memory_lookup_triton
    if backend == "triton_legacy":
        # Imported by a call, not an import statement: checkpoints' remote code (models/export.py bundles what this
        # module's import statements name, and allows only a few stdlib modules) must not ship this benchmark-only
        # backend, which needs Triton.
        legacy = __import__("memoryformer.kernels.triton.legacy", fromlist=["memory_lookup_triton_legacy"])
        return legacy.memory_lookup_triton_legacy
    raise ValueError(f"{backend!r} is not a concrete lookup backend; choose one of {BACKENDS[1:]}")


def memory_lookup(
    x: torch.Tensor,
    tables: torch.Tensor,
    bias: torch.Tensor | None,
    tau: int,
    score: Score = "l1",
    temperature: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """y [N, h] = Σ_k w_k(x) · tables[r_k(x)] + bias for x [N, K·τ], tables [K·2^τ, h].

    Returns fp32 (fp64 when x is fp64) whatever the tables' dtype: accumulation is never in 16 bits.
    """
    return _dispatch(backend, x.device.type)(x, tables, bias, tau, score, temperature)


@functools.cache
def _dispatch(backend: str, device_type: str) -> LookupFn:
    # Resolved once per (backend, device type): at decode (N = 1) the per-call imports would cost more than the op.
    return lookup_function(resolve_backend(backend, torch.device(device_type)))


__all__ = [
    "BACKENDS",
    "memory_lookup",
    "memory_lookup_embedding_bag",
    "memory_lookup_reference",
    "resolve_backend",
]
