"""``make bench-gpu``: the lookup kernels timed on a CUDA GPU — forward, backward and a training step (issue 16).

    python -m benchmarks.bench_gpu [--quick] [--peak-gbs 3350] [--output-dir benchmarks/results]

Skips cleanly (exit 0, nothing written) when there is no CUDA device. Otherwise, for the three lookups of an
mf-tiny and an mf-base block (shared-hash QKV, ML1 and ML2: :func:`memoryformer.kernels.triton.roofline.layer_shapes`)
at N = 1, 2048 and 16384 tokens, under the trainer's bf16 autocast with fp32 master tables, it times:

- ``linear``: ``nn.Linear(K·τ, h)``, the layer a Memory Layer replaces;
- ``embedding_bag``: the hash as torch ops + ``F.embedding_bag`` (the portable backend);
- ``triton``: the kernels of :mod:`memoryformer.kernels.triton` (bf16 gathers from the autocast copy);
- ``triton_legacy``: the first kernels (global-atomic table gradients).

Forward is timed under ``torch.no_grad`` (decode) and backward as ``torch.autograd.grad`` of a retained graph.
Each lookup time is turned into achieved bandwidth with the roofline model's compulsory bytes
(:mod:`memoryformer.kernels.triton.roofline`) and a fraction of the GPU's HBM peak (datasheet value for A100/H100,
or ``--peak-gbs``). The training step is one ``MemoryFormerBlock`` of each model (8 × 2048 tokens, fused AdamW,
bf16 autocast) per lookup backend, against the Pythia block of the same width. Writes ``gpu_latest.json`` and
``gpu_latest.md`` to the output directory. CUDA events time every call; medians over repeats, warm-up excluded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from benchmarks.bench_models import build_block, rotary_embedding, run_block
from memoryformer.kernels import lookup_function
from memoryformer.kernels.triton.roofline import (
    GPUS,
    MODEL_WIDTHS,
    LayerShape,
    backward_traffic,
    forward_traffic,
    layer_shapes,
)
from memoryformer.paths import PROJECT_ROOT
from memoryformer.reporting import write_text_atomic

LOOKUPS = ("embedding_bag", "triton", "triton_legacy")
FULL = {"models": ("mf-tiny", "mf-base"), "tokens": (1, 2048, 16384), "repeats": 20, "train_batch": (8, 2048)}
QUICK = {"models": ("mf-tiny",), "tokens": (1, 2048), "repeats": 5, "train_batch": (1, 2048)}
BLOCK_PAIRS = {"mf-tiny": "pythia-70m", "mf-base": "pythia-410m"}
WARMUP = 3


def cuda_median_us(fn: Callable[[], object], repeats: int) -> float:
    """Median µs of fn() timed with CUDA events, after warm-up."""
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def peak_hbm_gbs(override: float | None) -> float | None:
    if override:
        return override
    name = torch.cuda.get_device_name()
    return next((gpu.hbm_gbs for key, gpu in GPUS.items() if key in name), None)


def layer_calls(shape: LayerShape, num_tokens: int, implementation: str) -> tuple[Callable, Callable]:
    """(forward, backward) closures of one lookup (or nn.Linear) on fresh CUDA inputs, under bf16 autocast."""
    device = torch.device("cuda")
    width = shape.num_chunks * shape.tau
    x = torch.randn(num_tokens, width, device=device, requires_grad=True)
    grad_y = torch.randn(num_tokens, shape.out_features, device=device)
    if implementation == "linear":
        module = nn.Linear(width, shape.out_features, device=device)

        def apply() -> torch.Tensor:
            return module(x)

        params = [x, *module.parameters()]
    else:
        tables = torch.randn(shape.num_chunks << shape.tau, shape.out_features, device=device) * 0.02
        tables.requires_grad_()
        bias = torch.zeros(shape.out_features, device=device, requires_grad=True)
        lookup = lookup_function(implementation)

        def apply() -> torch.Tensor:
            return lookup(x, tables, bias, shape.tau)

        params = [x, tables, bias]

    def forward() -> None:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            apply()

    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = apply()

    def backward() -> None:
        torch.autograd.grad(y, params, grad_y.to(y.dtype), retain_graph=True)

    return forward, backward


def lookup_results(sizes: dict, peak_gbs: float | None) -> list[dict]:
    results = []
    for model in sizes["models"]:
        for shape in layer_shapes(model, MODEL_WIDTHS[model]):
            for n in sizes["tokens"]:
                traffic = {"forward": forward_traffic(shape, n), "backward": backward_traffic(shape, n)}
                for implementation in ("linear", *LOOKUPS):
                    calls = dict(zip(("forward", "backward"), layer_calls(shape, n, implementation), strict=True))
                    for phase, call in calls.items():
                        median_us = cuda_median_us(call, sizes["repeats"])
                        gbs = traffic[phase].compulsory_bytes / (median_us * 1e3)
                        results.append({
                            "model": model, "layer": shape.layer, "tau": shape.tau, "K": shape.num_chunks,
                            "h": shape.out_features, "tokens": n, "phase": phase, "implementation": implementation,
                            "median_us": median_us, "achieved_gbs": gbs,
                            "fraction_of_peak": gbs / peak_gbs if peak_gbs else None,
                        })  # fmt: skip
                    torch.cuda.empty_cache()
    return results


def block_training_step(name: str, overrides: dict, batch: int, seq: int) -> Callable[[], None]:
    """step(): forward, backward and a fused AdamW step of layer 0 of the named model, under bf16 autocast."""
    block, config = build_block(name, **overrides)
    block = block.cuda().train()
    optimizer = torch.optim.AdamW(block.parameters(), lr=1e-4, fused=True)
    x = torch.randn(batch, seq, config.hidden_size, device="cuda")
    position_embeddings = rotary_embedding(config).cuda()(x, torch.arange(seq, device="cuda")[None])

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = run_block(block, x, position_embeddings, None)
        out = out[0] if isinstance(out, tuple) else out
        out.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def training_step_results(sizes: dict) -> list[dict]:
    """One block's training step per lookup backend, and the Pythia block's of the same width."""
    batch, seq = sizes["train_batch"]
    results = []
    for model in sizes["models"]:
        variants = [(f"{model} ({backend})", model, {"lookup_backend": backend}) for backend in LOOKUPS]
        variants.append((BLOCK_PAIRS[model], BLOCK_PAIRS[model], {}))
        for label, name, overrides in variants:
            median_us = cuda_median_us(block_training_step(name, overrides, batch, seq), sizes["repeats"])
            results.append({"block": label, "tokens": batch * seq, "median_us": median_us,
                            "tokens_per_s": batch * seq / (median_us * 1e-6)})  # fmt: skip
            torch.cuda.empty_cache()
    return results


def render_markdown(report: dict) -> str:
    lines = [
        "# GPU lookup benchmark (`make bench-gpu`)",
        "",
        f"{report['device']}; HBM peak {report['peak_hbm_gbs'] or 'unknown'} GB/s; torch {report['torch']}. "
        "Median µs per call (CUDA events); GB/s = the roofline model's compulsory bytes / time.",
        "",
        "| model | layer | N | phase | implementation | µs | GB/s | % of HBM peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["lookups"]:
        fraction = "" if r["fraction_of_peak"] is None else f"{100 * r['fraction_of_peak']:.1f}"
        lines.append(
            f"| {r['model']} | {r['layer']} (τ={r['tau']}, h={r['h']}) | {r['tokens']} | {r['phase']} | "
            f"{r['implementation']} | {r['median_us']:.1f} | {r['achieved_gbs']:.0f} | {fraction} |"
        )
    lines += ["", "## Training step, one block", "", "| block | tokens | µs | tokens/s |", "|---|---|---|---|"]
    for r in report["training"]:
        lines.append(f"| {r['block']} | {r['tokens']} | {r['median_us']:.0f} | {r['tokens_per_s']:,.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="mf-tiny only, N ≤ 2048, few repeats")
    parser.add_argument("--peak-gbs", type=float, help="HBM peak of this GPU (default: datasheet for A100/H100)")
    parser.add_argument("--output-dir", type=Path, default=PROJECT_ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("[bench-gpu] skipped: no CUDA device (the kernel report in `make bench` covers this machine)")
        return 0
    sizes = QUICK if args.quick else FULL
    peak = peak_hbm_gbs(args.peak_gbs)
    report = {
        "device": torch.cuda.get_device_name(),
        "peak_hbm_gbs": peak,
        "torch": torch.__version__,
        "quick": args.quick,
        "lookups": lookup_results(sizes, peak),
        "training": training_step_results(sizes),
    }
    write_text_atomic(args.output_dir / "gpu_latest.json", json.dumps(report, indent=1) + "\n")
    write_text_atomic(args.output_dir / "gpu_latest.md", render_markdown(report))
    print(f"[bench-gpu] wrote {args.output_dir / 'gpu_latest.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
