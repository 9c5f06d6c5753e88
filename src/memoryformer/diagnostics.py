"""Bucket usage of the Memory Layers' hash tables: how often each bucket is retrieved (the paper's Figure 4).

Every Memory Layer cuts its input into K chunks of τ bits; chunk k of a token retrieves one of the 2^τ buckets
(rows) of table k (spec §1). For one block this module counts, over some token data, the retrievals of every
bucket of every table of its three hashes:

- ``Q/K/V``: the attention's hash. Q, K and V share ONE hash (spec §3; one ``MemoryLayer(d, 3d, τ)`` whose table
  rows are [T_Q | T_K | T_V]), so their bucket counts are identical by construction and are reported once.
- ``ML1``: the Memory Block's first layer, K tables of 2^τ buckets.
- ``ML2``: its second layer, K tables of 2^(τ+e) buckets.

Per table: the normalised entropy H(p)/log(2^τ) of its retrieval frequencies p (1 = perfectly uniform use,
0 = one bucket only), the fraction of buckets never retrieved, and the ratio of the most-retrieved bucket's count
to the mean count (1 = uniform).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memoryformer.layers import MemoryLayer, hash_chunks
from memoryformer.reporting import atomic_path, write_csv_atomic, write_text_atomic

SHARED_HASH_NOTE = (
    "Q, K and V share one hash (spec §3): their tables are retrieved with the same codes, so their bucket "
    "counts are identical and reported once as Q/K/V."
)
STAT_COLUMNS = [
    "projection",
    "table",
    "buckets",
    "tokens",
    "normalised_entropy",
    "never_used_fraction",
    "max_over_mean",
]


def bucket_counts(rows: torch.Tensor, num_chunks: int, tau: int) -> torch.Tensor:
    """Retrievals per bucket [K, 2^τ] (int64) from the global rows r = k·2^τ + code of a hash ([N, K])."""
    buckets = 2**tau
    flat = rows.reshape(-1)
    if flat.numel() and (flat.min() < 0 or flat.max() >= num_chunks * buckets):
        raise ValueError(f"rows must lie in [0, K·2^τ) = [0, {num_chunks * buckets}); got {flat.min()}…{flat.max()}")
    return torch.bincount(flat, minlength=num_chunks * buckets).reshape(num_chunks, buckets)


def layer_bucket_counts(layer: MemoryLayer, x: torch.Tensor) -> torch.Tensor:
    """Retrievals per bucket [K, 2^τ] of ``layer``'s tables for inputs x [..., in_features] (spec §1 steps 1–4)."""
    rows, _ = hash_chunks(x.detach().reshape(-1, layer.in_features), layer.tau)
    return bucket_counts(rows, layer.num_chunks, layer.tau)


@dataclass
class BucketUsage:
    """Bucket counts of one block's three hashes over ``tokens`` tokens."""

    layer: int
    tokens: int
    counts: dict[str, torch.Tensor]  # "Q/K/V", "ML1", "ML2" → [K, 2^τ] retrievals


def text_batches(
    tokenizer: Any, text: str, seq_len: int = 128, max_tokens: int = 32768, batch_size: int = 8
) -> list[torch.Tensor]:
    """Token-id batches [≤batch_size, seq_len] of the first ``max_tokens`` tokens of ``text`` (whole windows)."""
    if seq_len < 1 or max_tokens < seq_len or batch_size < 1:
        raise ValueError(
            f"need seq_len ≥ 1, max_tokens ≥ seq_len, batch_size ≥ 1; got {seq_len}, {max_tokens}, {batch_size}"
        )
    # ~4 characters per token in English: tokenize only what is needed (with a margin)
    ids = torch.tensor(tokenizer(text[: 8 * max_tokens]).input_ids[:max_tokens], dtype=torch.int64)
    windows = ids[: len(ids) // seq_len * seq_len].reshape(-1, seq_len)
    if len(windows) == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
    return list(windows.split(batch_size))


def block_memory_layers(model: nn.Module, layer: int) -> dict[str, MemoryLayer]:
    """The Memory Layers of block ``layer`` of a MemoryFormer (a ``MemoryFormerForCausalLM`` or its base model)."""
    blocks = getattr(getattr(model, "model", model), "layers", None)
    if blocks is None or not all(hasattr(block, "memory_block") for block in blocks):
        raise TypeError(f"{type(model).__name__} is not a MemoryFormer: it has no blocks with Memory Layers")
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer must be in [0, {len(blocks)}) for this {len(blocks)}-block model, got {layer}")
    block = blocks[layer]
    return {"Q/K/V": block.attention.qkv, "ML1": block.memory_block.ml1, "ML2": block.memory_block.ml2}


@torch.no_grad()
def block_bucket_usage(model: nn.Module, batches: Iterable[torch.Tensor], layer: int = 0) -> BucketUsage:
    """Run ``model`` on ``batches`` of token ids ([B, s] each) and count the retrievals of block ``layer``.

    The counts come from the inputs the Memory Layers really receive (forward pre-hooks), hashed exactly as
    the layers hash them.
    """
    layers = block_memory_layers(model, layer)
    counts = {
        name: torch.zeros(memory_layer.num_chunks, 2**memory_layer.tau, dtype=torch.int64)
        for name, memory_layer in layers.items()
    }

    def count_into(name: str):
        def hook(module: MemoryLayer, args: tuple) -> None:
            counts[name] += layer_bucket_counts(module, args[0]).cpu()

        return hook

    handles = [memory_layer.register_forward_pre_hook(count_into(name)) for name, memory_layer in layers.items()]
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        device = next(model.parameters()).device
        for batch in batches:
            model(input_ids=batch.to(device), use_cache=False)
            tokens += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if tokens == 0:
        raise ValueError("no tokens given: pass at least one non-empty batch of token ids")
    return BucketUsage(layer, tokens, counts)


def usage_statistics(counts: torch.Tensor) -> dict[str, list[float]]:
    """Per table (row of ``counts`` [K, B]): normalised entropy H(p)/log B, never-used fraction, max/mean count.

    p is the table's retrieval frequency (counts / their sum) with 0·log 0 = 0. A table that was never used at
    all (no tokens) has no frequencies: its entropy and max/mean are NaN.
    """
    if counts.dim() != 2 or counts.shape[1] < 2:
        raise ValueError(f"counts must be [tables, buckets] with at least 2 buckets, got shape {tuple(counts.shape)}")
    counts = counts.double()
    totals = counts.sum(1, keepdim=True)
    p = counts / totals
    entropy = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(1)
    mean = totals.squeeze(1) / counts.shape[1]
    return {
        "normalised_entropy": (entropy / math.log(counts.shape[1])).tolist(),
        "never_used_fraction": (counts == 0).double().mean(1).tolist(),
        "max_over_mean": (counts.max(1).values / mean).tolist(),
    }


def usage_report(usage: BucketUsage) -> dict[str, Any]:
    """JSON-ready statistics: per projection, per table and a summary (mean/min entropy, mean never-used, max ratio)."""
    projections = {}
    for name, counts in usage.counts.items():
        stats = usage_statistics(counts)
        projections[name] = {
            "tables": counts.shape[0],
            "buckets": counts.shape[1],
            "per_table": stats,
            "summary": {
                "mean_normalised_entropy": _mean(stats["normalised_entropy"]),
                "min_normalised_entropy": min(stats["normalised_entropy"]),
                "mean_never_used_fraction": _mean(stats["never_used_fraction"]),
                "max_over_mean": max(stats["max_over_mean"]),
            },
        }
    return {"layer": usage.layer, "tokens": usage.tokens, "note": SHARED_HASH_NOTE, "projections": projections}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def statistics_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One CSV row per (projection, table) of a :func:`usage_report`."""
    rows = []
    for name, projection in report["projections"].items():
        per_table = projection["per_table"]
        for k in range(projection["tables"]):
            rows.append(
                {
                    "projection": name,
                    "table": k,
                    "buckets": projection["buckets"],
                    "tokens": report["tokens"],
                    **{stat: values[k] for stat, values in per_table.items()},
                }
            )
    return rows


def plot_bucket_usage(usage: BucketUsage, path: str | os.PathLike, table: int = 0) -> Path:
    """Figure 4's view: per hash, the retrieval frequency of each bucket of table ``table`` (bars, the paper's
    style, with the uniform frequency dashed) above a heat map of every table (frequency relative to uniform)."""
    import matplotlib
    import numpy as np
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    names = list(usage.counts)
    fig = Figure(figsize=(5.2 * len(names), 6.4), layout="constrained")
    axes = fig.subplots(2, len(names), squeeze=False, height_ratios=[1, 1.3])
    for column, name in enumerate(names):
        counts = usage.counts[name].double()
        num_tables, buckets = counts.shape
        if not 0 <= table < num_tables:
            raise ValueError(f"table must be in [0, {num_tables}) for {name}, got {table}")
        frequency = counts / usage.tokens
        stats = usage_statistics(usage.counts[name])
        bars = axes[0, column]
        bars.bar(range(buckets), frequency[table].numpy(), width=1.0, color="tab:blue")
        bars.axhline(1 / buckets, color="black", linestyle="--", linewidth=1, label=f"uniform 1/{buckets}")
        bars.set_xlim(-0.5, buckets - 0.5)
        bars.set_xlabel("bucket (code)")
        bars.set_ylabel("retrieval frequency")
        bars.set_title(
            f"{name}, table {table} of {num_tables}: H/log {buckets} = {stats['normalised_entropy'][table]:.3f}, "
            f"unused {stats['never_used_fraction'][table]:.1%}",
            fontsize="small",
        )
        bars.legend(fontsize="small")
        # frequency relative to uniform (1 = uniform) on a log scale; never-used buckets masked (white)
        relative = np.ma.masked_equal((frequency * buckets).numpy(), 0)
        spread = relative.count() and relative.min() < relative.max()
        norm = LogNorm(vmin=relative.min(), vmax=relative.max()) if spread else None
        heat = axes[1, column]
        image = heat.imshow(relative, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
        heat.set_xlabel("bucket (code)")
        heat.set_ylabel("table k")
        heat.set_title(
            f"all {num_tables} tables: mean H/log {buckets} = {_mean(stats['normalised_entropy']):.3f}",
            fontsize="small",
        )
        fig.colorbar(image, ax=heat, label="frequency / uniform (white: never used)")
    fig.suptitle(f"Bucket usage of block {usage.layer} over {usage.tokens:,} tokens (Q, K and V share one hash)")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    return Path(path)


def write_bucket_usage(usage: BucketUsage, output_dir: str | os.PathLike, table: int = 0) -> dict[str, Path]:
    """Write ``bucket_usage_layer<L>.{json,csv,png}`` (statistics, per-table rows, Figure 4) and the raw counts
    (``bucket_counts_layer<L>.pt``) into ``output_dir``."""
    out = Path(output_dir)
    stem = f"layer{usage.layer}"
    report = usage_report(usage)
    with atomic_path(out / f"bucket_counts_{stem}.pt") as tmp:
        torch.save(usage.counts, tmp)
    return {
        "json": write_text_atomic(out / f"bucket_usage_{stem}.json", json.dumps(report, indent=2) + "\n"),
        "csv": write_csv_atomic(out / f"bucket_usage_{stem}.csv", statistics_rows(report), STAT_COLUMNS),
        "plot": plot_bucket_usage(usage, out / f"bucket_usage_{stem}.png", table),
        "counts": out / f"bucket_counts_{stem}.pt",
    }


__all__ = [
    "SHARED_HASH_NOTE",
    "BucketUsage",
    "block_bucket_usage",
    "block_memory_layers",
    "bucket_counts",
    "layer_bucket_counts",
    "plot_bucket_usage",
    "statistics_rows",
    "text_batches",
    "usage_report",
    "usage_statistics",
    "write_bucket_usage",
]
