"""A roofline model of the Triton lookup: bytes and FLOPs per token, and the bandwidth a GPU could reach (issue 16).

Per Memory Layer (K chunks of τ bits, h outputs, N tokens; table element size e_t, x element size e_x), the new
kernels move:

Forward (``hash_kernel`` + ``gather_kernel``)
    - compulsory HBM bytes: x (N·K·τ·e_x), rows + weights written and read back (2·N·K·8), y (N·h·4), and each
      table row the batch touches once: min(N, 2^τ)·K·h·e_t (at N = 16k every row of every chunk is touched).
    - gathered bytes (L2 → SM): N·K·h·e_t. Token blocks run through the chunks in step, so the live working set is
      a few chunks' 2^τ·h·e_t slices (786 KB for mf-tiny's QKV in bf16): gathers after the first touch hit L2.
    - FLOPs: 2·N·K·h (one FMA per gathered value) plus ~10 per x element for the hash.
Backward (``walk_by_row``'s sort + ``chunk_grad_kernel`` + ``grad_x_kernel``)
    - compulsory HBM bytes: grad_y once (N·h·4), x and grad_x, the sort of each chunk's rows (``torch.sort``: cub's
      radix sort of int32 keys with int64 indices, about four passes each reading and writing 12 bytes per
      (token, chunk): 96, an estimate), the walk built from it (rows, weights and indices read, 16-byte steps
      written: 32) and read once (16), the touched table rows once (∂w), the fp32 table gradient zero-filled and
      written once (2·K·2^τ·h·4) plus its cast to the table dtype, and ∂L/∂w's partial sums written and read back
      (N·K·8 per 512-feature block).
    - gathered bytes (L2 → SM): grad_y once per chunk (N·K·h·4: each token's g_n row, in row order), each
      segment's table rows once (∂w: the touched rows again), the table gradient written once, and the walk's steps
      read by the other feature blocks' programs (N·K·16 each).
    - FLOPs: 2·N·K·h for ∂L/∂w and 2·N·K·h for the table gradient, plus ~30 per x element for ∂w/∂z.

Time bound = max(compulsory bytes / HBM bandwidth, gathered bytes / L2 bandwidth, FLOPs / peak, hot-loop warp
instructions / issue rate (from the kernel report, when given)), and the
"fraction of HBM peak" is the compulsory bytes over that time, divided by HBM bandwidth — what ``make bench-gpu``
measures the same way (compulsory bytes / measured time). At N = 1 no bound applies: a decode lookup moves
~0.2–0.8 MB, under a microsecond of HBM time, so it is bound by launch and memory latency (2 launches + a
reduction, each a few µs; under CUDA graphs ~2 µs each) — the model reports that floor instead.

Hardware numbers are datasheet values (A100-SXM4-80GB, H100-SXM5); the L2 bandwidth is an assumption (3× HBM),
not a datasheet figure. Nothing here was measured on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from memoryformer.kernels.triton import TABLE_BLOCK_H


@dataclass(frozen=True)
class LayerShape:
    """One Memory Layer of a model (spec §2–4): input K·τ, output h."""

    model: str
    layer: str
    tau: int
    num_chunks: int
    out_features: int


def layer_shapes(model: str, d: int, expand_bits: int = 2, tau: int = 8) -> list[LayerShape]:
    """The three lookups of a MemoryFormer block: shared-hash QKV (h = 3d), ML1 (h = K(τ+e)), ML2 (τ+e bits, h = d)."""
    k = d // tau
    return [
        LayerShape(model, "qkv", tau, k, 3 * d),
        LayerShape(model, "ml1", tau, k, k * (tau + expand_bits)),
        LayerShape(model, "ml2", tau + expand_bits, k, d),
    ]


MODEL_WIDTHS = {"mf-tiny": 512, "mf-small": 768, "mf-base": 1024}


@dataclass(frozen=True)
class Gpu:
    name: str
    hbm_gbs: float  # datasheet HBM bandwidth, GB/s
    fp32_tflops: float  # datasheet non-tensor FP32 peak
    sms: int
    boost_ghz: float
    launch_us: float = 4.0  # one kernel launch, eager (≈2 under a CUDA graph)

    @property
    def warp_instructions_per_us(self) -> float:
        return self.sms * 4 * self.boost_ghz * 1e3  # four schedulers per SM, one warp instruction each per clock

    @property
    def l2_gbs(self) -> float:
        return 3 * self.hbm_gbs  # assumption, see the module docstring


GPUS = {
    "A100": Gpu("A100-SXM4-80GB", 2039.0, 19.5, sms=108, boost_ghz=1.41),
    "H100": Gpu("H100-SXM5-80GB", 3350.0, 67.0, sms=132, boost_ghz=1.98),
}
TOKENS = (1, 2048, 16384)


@dataclass(frozen=True)
class Traffic:
    compulsory_bytes: float
    gathered_bytes: float
    flops: float  # on the FP32 pipes
    launches: int
    tokens: int


def forward_traffic(shape: LayerShape, num_tokens: int, table_bytes: int = 2, x_bytes: int = 4) -> Traffic:
    n, k, h, tau = num_tokens, shape.num_chunks, shape.out_features, shape.tau
    touched_rows = min(n, 2**tau) * k
    compulsory = n * k * tau * x_bytes + 2 * n * k * 8 + n * h * 4 + touched_rows * h * table_bytes
    flops = 2 * n * k * h + 10 * n * k * tau
    return Traffic(compulsory, n * k * h * table_bytes, flops, launches=2 if n > 1 else 3, tokens=n)


SORT_BYTES = 96  # per (token, chunk): ~4 radix passes reading and writing an int32 key and an int64 index (estimate)


def backward_traffic(shape: LayerShape, num_tokens: int, table_bytes: int = 2, x_bytes: int = 4) -> Traffic:
    n, k, h, tau = num_tokens, shape.num_chunks, shape.out_features, shape.tau
    touched_rows = min(n, 2**tau) * k
    table_grad = k * 2**tau * h * 4
    blocks = max(1, h // TABLE_BLOCK_H)  # the walk's feature blocks (a rest rides in the last)
    compulsory = (
        n * h * 4  # grad_y
        + 2 * n * k * tau * x_bytes  # x, grad_x
        + n * k * (SORT_BYTES + 32 + 16)  # sort, walk built (rows, weights, indices in; 16-byte steps out), read
        + touched_rows * h * table_bytes  # rows gathered for ∂L/∂w
        + table_grad * 2  # zero-fill and write the fp32 gradient …
        + table_grad // 4 * table_bytes  # … and cast it to the table dtype
        + n * k * 8 * blocks  # ∂L/∂w partial sums, written and read back
    )
    gathered = n * k * h * 4 + touched_rows * h * table_bytes + table_grad + n * k * 16 * (blocks - 1)
    flops = 4 * n * k * h + 30 * n * k * tau
    # sort, index gather, walk build (3), searchsorted, zero-fill, the walk (1–2), grad_x, cast, ∂L/∂bias
    return Traffic(compulsory, gathered, flops, launches=12, tokens=n)


def bound(traffic: Traffic, gpu: Gpu, terms_per_token: float = 0.0, instructions_per_kterm: float = 0.0) -> dict:
    """The roofline time (µs), the term that binds it, and the fraction of HBM peak the compulsory bytes reach.

    ``instructions_per_kterm`` (from the kernel report: hot-loop warp instructions per 1024 lookup terms) adds the
    instruction-issue bound for ``terms_per_token`` · N terms.
    """
    terms = {
        "hbm": traffic.compulsory_bytes / (gpu.hbm_gbs * 1e3),
        "l2": traffic.gathered_bytes / (gpu.l2_gbs * 1e3),
        "fp32": traffic.flops / (gpu.fp32_tflops * 1e6),
        "issue": traffic.tokens * terms_per_token * instructions_per_kterm / 1024 / gpu.warp_instructions_per_us,
        "launch": traffic.launches * gpu.launch_us,
    }
    bandwidth_terms = {key: terms[key] for key in ("hbm", "l2", "fp32", "issue")}
    limiter = max(bandwidth_terms, key=bandwidth_terms.get)
    if terms["launch"] > bandwidth_terms[limiter]:
        limiter = "launch"
    seconds = terms[limiter]
    return {
        "time_us": seconds,
        "limiter": limiter,
        "hbm_fraction": terms["hbm"] / seconds,
        "terms_us": terms,
    }


def roofline(
    models: tuple[str, ...] = ("mf-tiny", "mf-small", "mf-base"),
    gpu: str = "H100",
    instructions_per_kterm: dict[str, float] | None = None,
) -> list[dict]:
    """Per model, layer, N and phase: bytes and FLOPs per token, the bound and the expected fraction of HBM peak.

    Training gathers bf16 (autocast copy of the fp32 tables); x is fp32. ``instructions_per_kterm`` maps a phase
    to the kernel report's hot-loop instructions per 1024 terms (K·h terms per token), adding the issue bound.
    """
    issue = instructions_per_kterm or {}
    rows = []
    for model in models:
        for shape in layer_shapes(model, MODEL_WIDTHS[model]):
            for n in TOKENS:
                phases = {"forward": forward_traffic(shape, n), "backward": backward_traffic(shape, n)}
                for phase, traffic in phases.items():
                    terms = shape.num_chunks * shape.out_features
                    rows.append({
                        "model": model, "layer": shape.layer, "tau": shape.tau, "K": shape.num_chunks,
                        "h": shape.out_features, "tokens": n, "phase": phase, "gpu": GPUS[gpu].name,
                        "bytes_per_token": traffic.compulsory_bytes / n,
                        "gathered_bytes_per_token": traffic.gathered_bytes / n,
                        "flops_per_token": traffic.flops / n,
                        **bound(traffic, GPUS[gpu], terms, issue.get(phase, 0.0)),
                    })  # fmt: skip
    return rows


def render_markdown(rows: list[dict]) -> list[str]:
    lines = [
        "| model | layer | N | phase | HBM B/token | gathered B/token | FLOP/token | bound (µs) | limiter "
        "| HBM % of peak |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['layer']} (τ={r['tau']}, h={r['h']}) | {r['tokens']} | {r['phase']} | "
            f"{r['bytes_per_token']:,.0f} | {r['gathered_bytes_per_token']:,.0f} | {r['flops_per_token']:,.0f} | "
            f"{r['time_us']:,.1f} | {r['limiter']} | {100 * r['hbm_fraction']:.1f} |"
        )
    return lines


__all__ = ["GPUS", "Gpu", "LayerShape", "backward_traffic", "bound", "forward_traffic", "render_markdown", "roofline"]
