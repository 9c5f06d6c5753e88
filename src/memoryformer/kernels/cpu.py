"""The fused CPU Memory Layer operator (spec §1): built on first use, cached per machine, called directly.

``csrc/memory_lookup.cpp`` registers two operators in the ``memoryformer`` torch.library namespace:
``memory_lookup_cpu`` (hash + score + gather + bias in one OpenMP pass over the tokens, with its autograd in C++)
and ``memory_lookup_cpu_backward`` (grad_x from a recomputed hash, dense grad_tables in the tables' dtype);
``csrc/block_decode.cpp`` registers ``memory_block_decode`` (a whole MemoryFormer block for one new token, the
decode fast path of issue 15); both share the row arithmetic of ``csrc/lookup_math.h``. This
module compiles them with ``torch.utils.cpp_extension`` the first time they are needed (never at import) into
``$MEMORYFORMER_CACHE/kernels`` (default ``~/.cache/memoryformer/kernels``), in a directory keyed by everything
the binary depends on: source, flags, compiler, torch and Python versions, and the CPU (the build uses
``-march=native``).
A file lock makes concurrent first uses (pytest-xdist workers, torchrun ranks) build once and share the result.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from filelock import FileLock

from memoryformer.layers.hashing import Score

logger = logging.getLogger(__name__)

_CACHE_ENV_VAR = "MEMORYFORMER_CACHE"
_SOURCE_DIR = Path(__file__).parent / "csrc"
_SOURCES = (_SOURCE_DIR / "memory_lookup.cpp", _SOURCE_DIR / "block_decode.cpp")
_HEADERS = (_SOURCE_DIR / "lookup_math.h",)
# -march=native: AVX2/FMA registers for the gather; -ffp-contract=fast: fused multiply-adds (off in ISO C++ mode);
# -fno-trapping-math: lets the hash's branch-free exp loop vectorise (FP exceptions are never inspected).
_CFLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fno-trapping-math", "-fopenmp")
_LDFLAGS = ("-fopenmp",)
_BUILT_MARKER = "BUILT"  # written (atomically) after a successful build; holds the library's file name


def _cache_dir() -> Path:
    """Where compiled kernels live: ``$MEMORYFORMER_CACHE/kernels``, default ``~/.cache/memoryformer/kernels``."""
    root = os.environ.get(_CACHE_ENV_VAR)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "memoryformer") / "kernels"


def _cpu_signature() -> str:
    """The CPU model and instruction-set flags: a ``-march=native`` binary is only valid on a matching CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def _build_key() -> str:
    """A short hash of everything the compiled library depends on; a new key means a new build."""
    digest = hashlib.sha256()
    for source in (*_SOURCES, *_HEADERS):
        digest.update(source.read_bytes())
    compiler = os.environ.get("CXX", "c++")  # what torch.utils.cpp_extension invokes
    for part in (*_CFLAGS, *_LDFLAGS, compiler, torch.__version__, sys.version, _cpu_signature()):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:16]


def _built_library(build_dir: Path, build: Callable[[], Path]) -> Path:
    """The library in ``build_dir``, calling ``build()`` (which returns its path) at most once across processes.

    A marker written after a successful build makes later calls a cheap file read; the file lock serialises
    first uses, and the marker is re-checked under it so waiters reuse the winner's build.
    """
    marker = build_dir / _BUILT_MARKER
    if not marker.exists():
        build_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(build_dir) + ".lock"):
            if not marker.exists():
                library = build()
                temporary = marker.with_suffix(f".tmp{os.getpid()}")
                temporary.write_text(library.name)
                os.replace(temporary, marker)
    return build_dir / marker.read_text()


def _compile(name: str, build_dir: Path) -> Path:
    """Compile and load the extension with torch's JIT builder (g++ + ninja); returns the shared library."""
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # the pip `ninja` wheel, when the virtualenv's bin is not on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    # We hold the exclusive lock, so cpp_extension's own lock file can only be stale (a killed build); left in
    # place it would make this build wait forever.
    (build_dir / "lock").unlink(missing_ok=True)
    library = cpp_extension.load(
        name=name,
        sources=[str(source) for source in _SOURCES],
        extra_include_paths=[str(_SOURCE_DIR)],
        extra_cflags=list(_CFLAGS),
        extra_ldflags=list(_LDFLAGS),
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    return Path(library)


def _register_fake_kernels() -> None:
    """Shape-and-dtype versions of the operators, so torch.compile and FakeTensor tracing can see through them."""

    @torch.library.register_fake("memoryformer::memory_lookup_cpu")
    def _(x, tables, bias, tau, score, temperature):
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return x.new_empty((x.shape[0], tables.shape[1]), dtype=dtype)

    @torch.library.register_fake("memoryformer::memory_lookup_cpu_backward")
    def _(grad_y, x, tables, tau, score, temperature, need_grad_x, need_grad_tables):
        grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if need_grad_x else x.new_empty(0)
        grad_tables = torch.empty_like(tables, memory_format=torch.contiguous_format) if need_grad_tables else None
        return grad_x, tables.new_empty(0) if grad_tables is None else grad_tables


def _load() -> torch._ops.OpOverload:
    """Build (once per machine) and load the operators; returns the forward operator. Raises on failure."""
    key = _build_key()
    name = f"memoryformer_cpu_{key}"
    build_dir = _cache_dir() / f"memory_lookup-{key}"
    library = _built_library(build_dir, lambda: _compile(name, build_dir))
    torch.ops.load_library(str(library))  # a no-op when _compile has just loaded it
    _register_fake_kernels()
    return torch.ops.memoryformer.memory_lookup_cpu.default


def _failure_summary(error: BaseException) -> str:
    """The compiler's error lines (or the exception's first lines) from a failed build."""
    lines = str(error).splitlines()
    errors = [line.strip() for line in lines if "error" in line.lower()]
    return "\n".join((errors or lines)[:8])


# Set once per process by _try_load: the forward operator, or why it is unavailable. Plain globals rather than a
# cache decorator so that torch.compile reads them as constants instead of tracing the loader.
_forward_op: torch._ops.OpOverload | None = None
_build_error: str | None = None


def _try_load() -> None:
    global _forward_op, _build_error
    try:
        _forward_op = _load()
    except Exception as error:
        _build_error = _failure_summary(error)
        logger.warning(
            "The fused CPU Memory Layer kernel could not be built; backend='auto' falls back to 'embedding_bag'.\n%s",
            _build_error,
        )


def cpu_kernel_available() -> bool:
    """Whether the fused CPU operator builds and loads here (tries once per process; warns once on failure)."""
    if _forward_op is None and _build_error is None:
        # Under torch.compile the build runs outside the graph: file I/O and compilation cannot be traced.
        (torch.compiler.disable(_try_load) if torch.compiler.is_compiling() else _try_load)()
    return _forward_op is not None


def memory_lookup_cpu(
    x: torch.Tensor,
    tables: torch.Tensor,
    bias: torch.Tensor | None,
    tau: int,
    score: Score = "l1",
    temperature: float = 1.0,
) -> torch.Tensor:
    """y [N, h] = Σ_k w_k(x) · tables[r_k(x)] + bias for x [N, K·τ] with the fused C++ operator (spec §1).

    Same contract as :func:`memoryformer.kernels.reference.memory_lookup_reference`: returns fp32 (fp64 when x is
    fp64) whatever the tables' dtype; differentiable w.r.t. x, tables and bias. The operator validates its inputs
    (CPU, x [N, K·τ], tables [K·2^τ, h], bias [h]) and copies non-contiguous ones.
    """
    if not cpu_kernel_available():
        raise RuntimeError(
            "the fused CPU Memory Layer kernel is unavailable (it needs a C++ compiler with OpenMP and ninja):\n"
            f"{_build_error}\nUse backend='embedding_bag' (or 'auto', which falls back to it)."
        )
    return _forward_op(x, tables, bias, tau, score, temperature)


def memory_block_decode_cpu(*arguments: object) -> torch.Tensor:
    """The fused decode of one MemoryFormer block (``csrc/block_decode.cpp``), positional in its schema's order:
    hidden, cos, sin, key_cache, value_cache, length, then the block's weights and shapes as
    ``MemoryFormerBlock.fused_decode_operands`` lists them (positional: a call parses ~10 µs faster than with 25
    keywords, a fifth of the Python around one block's decode).

    Writes the new keys and values at position ``length`` of the caches and returns the block's output.
    Callers check :func:`cpu_kernel_available` first (``MemoryFormerBlock`` does, through its lookup backend).
    """
    return torch.ops.memoryformer.memory_block_decode.default(*arguments)


__all__ = ["cpu_kernel_available", "memory_block_decode_cpu", "memory_lookup_cpu"]
