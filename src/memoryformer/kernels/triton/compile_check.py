"""Compile the lookup kernels for a CUDA architecture on a machine without a GPU, and report their machine code.

The interpreter checks what the kernels compute, not what the GPU would run. This module drives the real launch
code (:mod:`memoryformer.kernels.triton` and its ``legacy`` twin) on ``meta`` tensors of the trainer's layer shapes,
records every kernel launch instead of running it, and specializes each the way Triton's launcher would (16-byte
aligned pointers and multiples of 16 marked divisible, an argument equal to 1 made a constant, e.g. N = 1 at
decode). Each specialization is lowered TTIR → TTGIR → PTX → cubin with the ``ptxas`` bundled in the Triton wheel
and disassembled with its ``nvdisasm``; nothing runs.

The report (:func:`kernel_report`) gives per kernel: registers and spill bytes (``ptxas -v``), global loads by width
(``LDG.E.128`` is a 128-bit vector), atomics (``RED``/``ATOM``), barriers, and the SASS instructions of the hot loop
(the backward branch around the most global loads) per pass and per 1024 lookup terms (token, chunk, feature): warp
instructions × warps × 1024 / the terms of a pass. A pass is ``unroll`` source iterations when the loop was unrolled
(by ptxas, or by Triton's ``loop_unroll_factor``; found from the one-iteration remainder loop); a source iteration
handles BLOCK_N × BLOCK_H terms (a token tile), or BLOCK_H in ``chunk_grad_kernel``, which walks one token at a time
and does all the backward's per-term work there: the table-gradient sum and the ∂w product. A launch's count is
weighed by the share of h it computes (:func:`coverage`). The hot loop's instructions are all those from its head to
its backward branch, except that a block a forward branch in the loop jumps over counts only as often as it can run
(:func:`conditional_rate`: in ``chunk_grad_kernel`` the store of a finished row's table gradient and the load of the
next row). In forward a term is one gathered table value, so instructions per gathered byte = that / 1024 / the
table element size. ``make bench`` includes the report (section ``gpu_kernels``, :mod:`benchmarks.kernel_report`).

Usage (``TRITON_INTERPRET`` must be unset or 0)::

    python -m memoryformer.kernels.triton.compile_check [--arch 80] [--report kernels.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction, MockTensor

from memoryformer.kernels import triton as lookup
from memoryformer.kernels.triton import kernels, legacy, legacy_kernels
from memoryformer.kernels.triton.roofline import MODEL_WIDTHS, LayerShape, layer_shapes

NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
META = torch.device("meta")


@dataclass(frozen=True)
class Launch:
    """One recorded kernel launch: what Triton's launcher would specialize and compile."""

    kernel: JITFunction
    args: tuple
    kwargs: dict

    def source(self) -> tuple[ASTSource, dict]:
        """The ASTSource with the launcher's specialization, and the compile options (num_warps, …)."""
        bound = dict(zip(self.kernel.arg_names, self.args, strict=False))
        constexpr_names = {p.name for p in self.kernel.params if p.is_constexpr}
        options = {key: self.kwargs[key] for key in ("num_warps", "num_stages") if key in self.kwargs}
        bound |= {key: value for key, value in self.kwargs.items() if key not in options}
        signature, constants, attrs = {}, {}, {}
        for index, name in enumerate(self.kernel.arg_names):
            value = bound[name]
            if name in constexpr_names:
                signature[name], constants[name] = "constexpr", value
                continue
            if isinstance(value, torch.Tensor):  # a meta tensor: the CUDA allocator's pointers are 256-byte aligned
                value = MockTensor(value.dtype)
            kind, attr = native_specialize_impl(BaseBackend, value, False, True, True)
            signature[name] = kind
            if kind == "constexpr":
                constants[name] = value
            elif attr:
                attrs[(index,)] = BaseBackend.parse_attr(attr)
        return ASTSource(self.kernel, signature, constants, attrs), options


@contextlib.contextmanager
def recorded_launches() -> Iterator[list[Launch]]:
    """Replace every kernel of the new and legacy modules by a recorder for the duration of the block."""
    launches: list[Launch] = []

    class Recorder:
        def __init__(self, kernel: JITFunction) -> None:
            self.kernel = kernel

        def __getitem__(self, grid) -> Callable:
            return lambda *args, **kwargs: launches.append(Launch(self.kernel, args, kwargs))

    saved = []
    for module in (kernels, legacy_kernels):
        for name, value in vars(module).items():
            if isinstance(value, JITFunction) and not name.startswith("_"):
                saved.append((module, name, value))
                setattr(module, name, Recorder(value))
    try:
        yield launches
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


@dataclass(frozen=True)
class Case:
    """A lookup to compile: a layer shape, N tokens, dtypes of x and of the gathered tables."""

    shape: LayerShape
    num_tokens: int
    x_dtype: torch.dtype
    table_dtype: torch.dtype

    @property
    def name(self) -> str:
        names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
        s = self.shape
        return (
            f"{s.model} {s.layer} τ={s.tau} K={s.num_chunks} h={s.out_features} N={self.num_tokens} "
            f"x {names[self.x_dtype]} tables {names[self.table_dtype]}"
        )


def record_case(case: Case, implementation: str) -> list[tuple[str, Launch]]:
    """(phase, launch) of one forward + backward of ``implementation`` ("new" or "legacy") on meta tensors."""
    s = case.shape
    x = torch.empty(case.num_tokens, s.num_chunks * s.tau, dtype=case.x_dtype, device=META)
    tables = torch.empty(s.num_chunks << s.tau, s.out_features, dtype=case.table_dtype, device=META)
    bias = torch.empty(s.out_features, dtype=case.table_dtype, device=META)
    accumulator = torch.float64 if case.x_dtype == torch.float64 else torch.float32
    temperature = torch.empty((), dtype=accumulator, device=META)
    grad_y = torch.empty(case.num_tokens, s.out_features, dtype=accumulator, device=META)
    phases: list[tuple[str, Launch]] = []
    with recorded_launches() as launches:
        if implementation == "new":
            rows, weights = lookup._hash(x, s.tau, "l1", temperature)
            lookup._gather(rows, weights, tables, bias)
            phases += [("forward", launch) for launch in launches]
            del launches[:]
            lookup._backward(x, tables, rows, weights, grad_y, s.tau, "l1", temperature, True, tables.dtype)
        else:
            legacy._forward(x, tables, bias, s.tau, "l1", temperature)
            phases += [("forward", launch) for launch in launches]
            del launches[:]
            legacy._backward(x, tables, grad_y, s.tau, "l1", temperature, True, True, False)
        phases += [("backward", launch) for launch in launches]
    return phases


def default_cases() -> list[Case]:
    """The trainer's lookups on mf-tiny and mf-base: every layer kind (τ = 8 and 10), training at N = 16k with fp32
    master tables gathered as fp32 and (bf16 autocast) as a bf16 copy, bf16 activations, and decode at N = 1."""
    f32, bf16 = torch.float32, torch.bfloat16
    cases = []
    for model in ("mf-tiny", "mf-base"):
        for shape in layer_shapes(model, MODEL_WIDTHS[model]):
            cases += [Case(shape, 16384, f32, f32), Case(shape, 16384, f32, bf16)]
        qkv = layer_shapes(model, MODEL_WIDTHS[model])[0]
        cases += [Case(qkv, 16384, bf16, bf16), Case(qkv, 1, f32, bf16)]
    return cases


def quick_cases() -> list[Case]:
    """One case per code path, for tests: training τ=8 with bf16 gathers, τ=10 fp32, decode, and fp64 on a ragged
    shape (masked feature blocks)."""
    qkv, _, ml2 = layer_shapes("mf-tiny", MODEL_WIDTHS["mf-tiny"])
    return [
        Case(qkv, 16384, torch.float32, torch.bfloat16),
        Case(ml2, 16384, torch.float32, torch.float32),
        Case(qkv, 1, torch.float32, torch.bfloat16),
        Case(LayerShape("ragged", "fp64", 4, 3, 40), 70, torch.float64, torch.float64),
    ]


def disassemble(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        return subprocess.run(
            [str(NVIDIA_BIN / "nvdisasm"), "-c", file.name], capture_output=True, text=True, check=True
        ).stdout


def ptxas_usage(ptx: str, arch: int) -> dict[str, int]:
    """Registers and spill bytes from ``ptxas -v`` (what the driver would report as n_regs / n_spills)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        command = [str(NVIDIA_BIN / "ptxas"), "-v", f"-arch=sm_{arch}a" if arch >= 90 else f"-arch=sm_{arch}"]
        log = subprocess.run([*command, str(path), "-o", str(path.with_suffix(".cubin"))],
                             capture_output=True, text=True, check=True).stderr  # fmt: skip
    registers = re.search(r"Used (\d+) registers", log)
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    return {"registers": int(registers.group(1)) if registers else 0, "spill_bytes": sum(spills)}


SASS_INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(.+?)\s*;", re.MULTILINE)


def sass_counts(sass: str) -> dict[str, Any]:
    """Whole-kernel counts and the hot loop's (the backward branch whose body holds the most global loads), with
    the number of source iterations ptxas unrolled into it."""
    lines = sass.splitlines()
    instructions = [(i, m.group(1)) for i, line in enumerate(lines) if (m := SASS_INSTRUCTION.match(line))]
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}

    def count(body: list[str]) -> dict[str, int]:
        opcodes = [re.sub(r"^@!?U?P\w+\s+", "", op).split()[0] for op in body]  # drop the predicate
        global_loads = [op for op in opcodes if op.startswith("LDG")]
        return {
            "instructions": len(opcodes),
            "global_loads": len(global_loads),
            "global_loads_128bit": sum(op.endswith(".128") for op in global_loads),
            "atomics": sum(op.startswith(("RED", "ATOM")) for op in opcodes),
            "barriers": sum(op.startswith("BAR") for op in opcodes),
            "shared_memory_ops": sum(op.startswith(("LDS", "STS")) for op in opcodes),
        }

    def branch_target(op: str) -> int | None:
        target = re.search(r"\bBRA\b.*`\((\.L_x_\d+)\)", op)
        return labels.get(target.group(1)) if target else None

    loops = []
    for position, op in instructions:
        target = branch_target(op)
        if target is not None and target < position:
            body = [(p, o) for p, o in instructions if target <= p <= position]
            loop = count([o for _, o in body])
            # Blocks inside the loop that a forward branch jumps over run only when its condition says so (in
            # chunk_grad_kernel: a row change); the report weighs them by how often that can happen.
            skipped = set()
            for p, o in body:
                forward = branch_target(o)
                if forward is not None and p < forward <= position:
                    skipped.update(q for q, _ in body if p < q < forward)
            loop["conditional_instructions"] = len(skipped)
            if loop["global_loads"]:
                loops.append(loop)
    best = max(loops, key=lambda loop: loop["global_loads"], default=None)
    if best is not None:
        # ptxas unrolls a loop of unknown trip count into a body of several iterations plus a one-iteration
        # remainder loop; every kernel here has one source loop, so the ratio of their loads is the unroll factor.
        fewest = min(loop["global_loads"] for loop in loops)
        best["unroll"] = best["global_loads"] // fewest if best["global_loads"] % fewest == 0 else 1
    return {"kernel": count([op for _, op in instructions]), "loop": best}


@dataclass
class KernelRecord:
    implementation: str
    case: str
    phase: str
    kernel: str
    num_warps: int
    registers: int
    spill_bytes: int
    kernel_counts: dict
    loop_counts: dict | None
    loop_terms: int | None  # (token, chunk, feature) terms per pass of the hot loop (source iterations × unroll)
    instructions_per_kterm: float | None  # hot-loop (or, loop-free, whole-kernel) warp instructions per 1024 terms,
    # its conditional blocks weighed by conditional_rate
    coverage: float  # features the launch computes per feature of h: < 1 for part of h, more with masked blocks


def loop_terms(launch: Launch) -> int | None:
    """Lookup terms (token, chunk, feature) one program handles per source iteration of its hot loop: the unit in
    which kernels of different shapes compare (a term is one gathered table value in forward)."""
    bound = dict(zip(launch.kernel.arg_names, launch.args, strict=False)) | launch.kwargs
    if launch.kernel.__name__ == "chunk_grad_kernel":
        return walk_block_features(bound)  # one token per iteration (its chunk k fixed by the program)
    if launch.kernel.__name__ in ("hash_kernel", "grad_x_kernel", "segment_scatter_kernel"):
        return None  # per (token, chunk), not per term: no hot loop over table rows
    return bound["BLOCK_N"] * bound["BLOCK_H"]


def walk_block_features(bound: dict) -> int:
    """Features one ``chunk_grad_kernel`` program walks: its block and its rest (masked ones included)."""
    return bound["BLOCK_H"] + bound["REST_H"]


def coverage(launch: Launch, case: Case) -> float:
    """Features a launch computes, masked ones included, per feature of h: its instructions per term count that
    often per term of the layer (a gather launch over 512 of h = 640 features: 0.8; a 256-wide block over 200:
    1.28)."""
    bound = dict(zip(launch.kernel.arg_names, launch.args, strict=False)) | launch.kwargs
    if launch.kernel.__name__ == "chunk_grad_kernel":
        blocks = 1 if bound["REST_H"] else triton.cdiv(bound["H"], bound["BLOCK_H"])
        return blocks * walk_block_features(bound) / case.shape.out_features
    if "H" not in bound or "BLOCK_H" not in bound:
        return 1.0
    return triton.cdiv(bound["H"], bound["BLOCK_H"]) * bound["BLOCK_H"] / case.shape.out_features


def conditional_rate(launch: Launch, case: Case) -> float:
    """How often, at most, a hot-loop iteration runs the loop's conditional blocks: in ``chunk_grad_kernel``, whose
    walk goes through a chunk's tokens grouped by row, once per distinct row, so at most min(N, 2^τ) of N tokens
    (1/64 at τ = 8 and N = 16k); elsewhere they are counted as always run."""
    if launch.kernel.__name__ == "chunk_grad_kernel":
        return min(case.num_tokens, 1 << case.shape.tau) / case.num_tokens
    return 1.0


def compile_launch(launch: Launch, arch: int) -> tuple[Any, str]:
    source, options = launch.source()
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    if not compiled.asm.get("cubin"):
        raise RuntimeError(f"{launch.kernel.__name__}: no cubin produced for sm_{arch}")
    return compiled, source.hash()


def kernel_report(arch: int = 80, cases: list[Case] | None = None) -> list[KernelRecord]:
    """Compile every launch of every case, new and legacy, once per distinct specialization, and measure it."""
    if kernels.INTERPRETED:
        raise RuntimeError("the kernels were defined for the interpreter: run with TRITON_INTERPRET unset or 0")
    records, measured = [], {}
    for case in cases or default_cases():
        for implementation in ("new", "legacy"):
            for phase, launch in record_case(case, implementation):
                compiled, key = compile_launch(launch, arch)
                if key not in measured:
                    usage = ptxas_usage(compiled.asm["ptx"], arch)
                    measured[key] = usage, sass_counts(disassemble(compiled.asm["cubin"]))
                usage, counts = measured[key]
                num_warps = launch.kwargs.get("num_warps", 4)
                terms = loop_terms(launch)
                # No loop (e.g. one chunk per program at decode, specialized away): the whole kernel is one step.
                instructions = (counts["loop"] or counts["kernel"])["instructions"]
                if counts["loop"]:  # the conditional blocks weighed by how often they can run
                    conditional = counts["loop"]["conditional_instructions"]
                    instructions -= conditional * (1 - conditional_rate(launch, case))
                if terms:  # a pass through the hot loop runs `unroll` source iterations
                    terms *= (counts["loop"] or {}).get("unroll", 1)
                per_kterm = round(instructions * num_warps * 1024 / terms, 1) if terms else None
                records.append(KernelRecord(
                    implementation, case.name, phase, launch.kernel.__name__, num_warps, usage["registers"],
                    usage["spill_bytes"], counts["kernel"], counts["loop"], terms, per_kterm, coverage(launch, case),
                ))  # fmt: skip
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=80, help="CUDA compute capability as an integer, e.g. 80, 90")
    parser.add_argument("--report", type=Path, help="write the kernel report (JSON) here")
    parser.add_argument("--quick", action="store_true", help="one case per code path instead of the trainer's shapes")
    args = parser.parse_args(argv)
    records = kernel_report(args.arch, quick_cases() if args.quick else None)
    for r in records:
        loop = r.loop_counts or {}
        print(
            f"sm_{args.arch} ok: {r.implementation:6} {r.phase:8} {r.kernel:30} {r.case}: {r.registers} regs, "
            f"{r.spill_bytes} B spilled, loop {loop.get('instructions', '-')} instr "
            f"({loop.get('global_loads_128bit', '-')}/{loop.get('global_loads', '-')} loads 128-bit), "
            f"{r.kernel_counts['atomics']} atomics, {r.instructions_per_kterm} instr/1k terms"
        )
    if args.report:
        args.report.write_text(json.dumps([asdict(r) for r in records], indent=1) + "\n")


if __name__ == "__main__":
    main()
