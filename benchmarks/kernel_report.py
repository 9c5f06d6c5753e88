"""``make bench`` section ``gpu_kernels``: what the GPU lookup kernels compile to, before and after issue 16.

No GPU needed: :mod:`memoryformer.kernels.triton.compile_check` compiles every launch of the new and the legacy
Triton kernels for sm_80 with the launcher's specialization (in a subprocess, so ``TRITON_INTERPRET`` in this
process does not matter) and reports registers, spills, 128-bit loads, atomics, barriers and the hot loop's
instructions per KB moved; :mod:`memoryformer.kernels.triton.roofline` adds the bytes/FLOPs per token and the
expected fraction of HBM bandwidth. ``make bench-gpu`` measures the same kernels on a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from memoryformer.kernels.triton.roofline import render_markdown, roofline
from memoryformer.reporting import markdown_table

ARCH = 80
# The case whose hot-loop instruction counts feed the roofline's issue bound: training with bf16 gathers.
ROOFLINE_CASE = "mf-tiny qkv τ=8 K=64 h=1536 N=16384 x fp32 tables bf16"


def run_kernel_report(quick: bool) -> dict[str, Any]:
    """The compiled-code report and the roofline (JSON-serialisable); ``{"skipped": why}`` without Triton."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return {"skipped": "Triton is not installed"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernels.json"
        command = [sys.executable, "-m", "memoryformer.kernels.triton.compile_check", "--arch", str(ARCH)]
        command += ["--report", str(path), *(["--quick"] if quick else [])]
        env = os.environ | {"TRITON_INTERPRET": "0"}
        result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if result.returncode:
            raise RuntimeError(f"compile_check failed:\n{result.stderr[-3000:]}")
        records = json.loads(path.read_text())
    issue = {phase: phase_cost(records, "new", phase, ROOFLINE_CASE) for phase in ("forward", "backward")}
    return {"arch": ARCH, "quick": quick, "kernels": records, "roofline": roofline(instructions_per_kterm=issue)}


def phase_cost(records: list[dict], implementation: str, phase: str, case: str) -> float:
    """Hot-loop warp instructions per 1024 lookup terms of one phase, summed over its kernels, each launch weighed
    by the share of h it computes (its ``coverage``)."""
    return sum(
        (r["instructions_per_kterm"] or 0) * r["coverage"]
        for r in records
        if (r["implementation"], r["phase"], r["case"]) == (implementation, phase, case)
    )


def _phase_summary(records: list[dict]) -> str:
    """One implementation's phase: its kernels' hot loops, spills, 128-bit loads, barriers and atomics."""
    parts = []
    for r in records:
        loop = r["loop_counts"]
        text = f"{r['kernel']} {r['registers']} regs"
        if r["spill_bytes"]:
            text += f" **{r['spill_bytes']} B spilled**"
        if loop:
            text += (
                f", loop {loop['instructions']} instr, {loop['global_loads_128bit']}/{loop['global_loads']} loads "
                f"128-bit, {loop['barriers']} bar"
            )
        if r["kernel_counts"]["atomics"]:
            text += f", {r['kernel_counts']['atomics']} atomics"
        parts.append(text)
    return "; ".join(parts)


def before_after_rows(records: list[dict]) -> list[dict]:
    """Per case and phase: legacy vs new, and the hot loops' warp instructions per 1024 lookup terms, summed over
    the phase's kernels (a separate ∂w loop and the table-gradient walk both count)."""
    rows = []
    for case in dict.fromkeys(r["case"] for r in records):
        for phase in ("forward", "backward"):
            sides = {
                impl: [r for r in records if (r["implementation"], r["phase"], r["case"]) == (impl, phase, case)]
                for impl in ("legacy", "new")
            }
            cost = {impl: phase_cost(records, impl, phase, case) for impl in sides}
            rows.append({
                "case": case,
                "phase": phase,
                "before (triton_legacy)": _phase_summary(sides["legacy"]),
                "after (triton)": _phase_summary(sides["new"]),
                "instr/1k terms before → after": f"{cost['legacy']:.0f} → {cost['new']:.0f}",
                "fewer ×": f"{cost['legacy'] / cost['new']:.1f}" if cost["new"] else None,
            })  # fmt: skip
    return rows


def render_kernel_report(section: Mapping[str, Any]) -> list[str]:
    if "skipped" in section:
        return ["## GPU kernels (compiled code)", "", f"Skipped: {section['skipped']}."]
    rows = before_after_rows(section["kernels"])
    return [
        "## GPU kernels (compiled code, no GPU)",
        "",
        f"Every launch of the Triton lookup compiled for sm_{section['arch']} with the launcher's specialization "
        "(`python -m memoryformer.kernels.triton.compile_check`), before (backend `triton_legacy`) and after "
        "(`triton`, issue 16). Instr/1k terms = SASS instructions of each hot loop × warps per 1024 (token, chunk, "
        "feature) terms it handles, summed over the phase's kernels, each weighed by the share of h its launch "
        "computes (the gather runs h = 640 as launches of 512 and 128 features; masked features count as work). "
        "In forward a term is one gathered value: divide by 1024 × the table element size for instructions per "
        "gathered byte. `chunk_grad_kernel` walks one token, BLOCK_H terms (+ REST_H in the program that also takes "
        "the rest of h), per iteration, doing each term's table-gradient sum and "
        "∂w product; the block it runs when the walk reaches a new row (store the finished row's gradient, load the "
        "next table row) counts at most min(N, 2^τ)/N of the iterations. An unrolled loop counts all the iterations "
        "of a pass. `hash_kernel` and `grad_x_kernel` work per (token, chunk), not per term, and are listed without "
        "a loop; the backward's stable sort of each chunk's rows (`torch.sort`, per (token, chunk)) is not compiled "
        "here and not counted.",
        "",
        markdown_table(rows, list(rows[0])) if rows else "(no results)",
        "",
        f"### Roofline model (H100, bf16 gathers, issue bound from `{ROOFLINE_CASE}`; not measured)",
        "",
        *render_markdown(section["roofline"]),
    ]
