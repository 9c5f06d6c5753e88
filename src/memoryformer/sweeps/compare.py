"""Comparing configurations trained with several seeds: final numbers with intervals, learning curves (issue 13).

:func:`statistics_rows` turns configurations (:class:`~memoryformer.sweeps.runs.Configuration`) into one row each:
final validation loss over the finished seeds (mean, std, 95% t-interval), the perplexity exp(mean loss) with
exp of the interval's bounds, zero-shot accuracy where scored, FLOPs per token, and Welch's test of each row
against the previous one (:mod:`memoryformer.statistics`). Unfinished, failed and never-started seeds are listed
per row and left out of every average. :func:`write_comparison` writes it as markdown + CSV + a PNG of the
learning curves (mean with a band) against tokens and training FLOPs; :func:`compare_runs` does it for any run
directories (``make compare``).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from memoryformer.reporting import Curve, markdown_table, plot_learning_curves, write_csv_atomic, write_text_atomic
from memoryformer.statistics import CONFIDENCE, Estimate, welch_test
from memoryformer.sweeps.runs import Configuration, expand_run_paths, group_seeds, read_run

STAT_COLUMNS = [
    "configuration",
    "seeds_done",
    "seeds",  # finished seeds, e.g. "1234 1235 1236"
    "unfinished",  # seeds left out, with why
    "steps",
    "tokens",
    "parameters",
    "flops_per_token",  # forward, at the run's sequence length
    "training_flops",  # 3 × forward × tokens
    "val_loss_mean",
    "val_loss_std",
    "val_loss_ci_low",
    "val_loss_ci_high",
    "val_ppl",  # exp(mean val loss)
    "val_ppl_ci_low",
    "val_ppl_ci_high",
    "delta_vs_prev",  # mean val loss minus the previous row's
    "p_vs_prev",  # Welch's two-sided p-value of that difference
    "beyond_noise_vs_prev",  # p < 0.05; empty when either row has fewer than 2 finished seeds
    "avg_acc_mean",
    "avg_acc_std",
    "avg_acc_ci_low",
    "avg_acc_ci_high",
    "avg_acc_delta_vs_prev",
    "avg_acc_p_vs_prev",
    "avg_acc_beyond_noise_vs_prev",
    "eval_limit",
]

LEGEND = (
    "Each row is one configuration over its finished seeds (model init and data order both follow the seed). "
    "val loss: final validation loss, mean ± sample std; 95% CI: mean ± t(0.975, n−1)·std/√n. val PPL: "
    "exp(mean loss), interval exp(CI). Δ vs previous: this row's mean loss minus the row above's, with Welch's "
    "unequal-variance t-test; *beyond noise* = two-sided p < 0.05, i.e. |Δ| > t(0.975, ν)·√(s₁²/n₁ + s₂²/n₂). "
    "A test needs ≥ 2 finished seeds on both sides. Unfinished, failed or never-started seeds are listed and not "
    "averaged."
)


def _interval_columns(prefix: str, est: Estimate | None) -> dict[str, Any]:
    interval = est.interval if est is not None else None
    return {
        f"{prefix}_mean": est.mean if est is not None else None,
        f"{prefix}_std": est.std if est is not None else None,
        f"{prefix}_ci_low": interval[0] if interval else None,
        f"{prefix}_ci_high": interval[1] if interval else None,
    }


def _difference_columns(prefix: str, previous: Estimate | None, est: Estimate | None) -> dict[str, Any]:
    """Δ = mean − previous mean, Welch's p-value and the beyond-noise mark (None where either side is missing)."""
    both = previous is not None and est is not None
    difference = welch_test(previous, est) if both else None
    return {
        f"{prefix}delta_vs_prev": est.mean - previous.mean if both else None,
        f"{prefix}p_vs_prev": difference.p_value if difference else None,
        f"{prefix}beyond_noise_vs_prev": difference.beyond_noise if difference else None,
    }


def _ppl(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 50))


def statistics_row(configuration: Configuration, previous: Configuration | None = None) -> dict[str, Any]:
    """One row of :data:`STAT_COLUMNS` for ``configuration``, tested against ``previous`` (if any)."""
    loss = configuration.final("val_loss")
    acc = configuration.final_acc()
    example = configuration.example
    final = example.final if configuration.done else {}
    row: dict[str, Any] = {
        "configuration": configuration.label,
        "seeds_done": len(configuration.done),
        "seeds": " ".join(str(run.seed) for run in configuration.done),
        "unfinished": "; ".join(configuration.unfinished) or None,
        "steps": final.get("step"),
        "tokens": final.get("tokens"),
        "parameters": example.parameters if example else None,
        "flops_per_token": example.flops_per_token if example else None,
        "training_flops": example.training_flops(final["tokens"]) if configuration.done else None,
    }
    row |= _interval_columns("val_loss", loss)
    interval = loss.interval if loss is not None else None
    row |= {
        "val_ppl": _ppl(loss.mean if loss else None),
        "val_ppl_ci_low": _ppl(interval[0]) if interval else None,
        "val_ppl_ci_high": _ppl(interval[1]) if interval else None,
    }
    row |= _difference_columns("", previous.final("val_loss") if previous is not None else None, loss)
    row |= _interval_columns("avg_acc", acc)
    row |= _difference_columns("avg_acc_", previous.final_acc() if previous is not None else None, acc)
    limits = {run.avg_acc[1] for run in configuration.done if run.avg_acc[0] is not None}
    row["eval_limit"] = limits.pop() if len(limits) == 1 else None
    return row


def statistics_rows(configurations: Sequence[Configuration]) -> list[dict[str, Any]]:
    """A :func:`statistics_row` per configuration, each tested against the one before it."""
    return [
        statistics_row(configuration, configurations[i - 1] if i else None)
        for i, configuration in enumerate(configurations)
    ]


def _plus_minus(mean: float | None, spread: float | None, spec: str) -> str | None:
    if mean is None:
        return None
    return format(mean, spec) + ("" if spread is None else f" ± {spread:{spec}}")


def _bracket(low: float | None, high: float | None, spec: str) -> str | None:
    return None if low is None else f"[{low:{spec}}, {high:{spec}}]"


def _difference_cells(delta: float | None, p_value: float | None, beyond: bool | None) -> tuple[str | None, ...]:
    if delta is None:
        return None, None
    text = f"{delta:+.3f}" + (f" (p = {p_value:.2g})" if p_value is not None else "")
    return text, "n/a" if beyond is None else "**yes**" if beyond else "no"


def statistics_cells(row: Mapping[str, Any]) -> dict[str, Any]:
    """The human-readable cells of a :func:`statistics_row` (what the markdown tables show)."""
    ppl = row["val_ppl"]
    if ppl is not None and row["val_ppl_ci_low"] is not None:
        ppl = f"{ppl:.1f} [{row['val_ppl_ci_low']:.1f}, {row['val_ppl_ci_high']:.1f}]"
    elif ppl is not None:
        ppl = f"{ppl:.1f}"
    delta, beyond = _difference_cells(row["delta_vs_prev"], row["p_vs_prev"], row["beyond_noise_vs_prev"])
    cells = {
        "seeds": f"{row['seeds_done']}" + (" ⚠" if row["unfinished"] else ""),
        "val loss (mean ± std)": _plus_minus(row["val_loss_mean"], row["val_loss_std"], ".3f"),
        "95% CI": _bracket(row["val_loss_ci_low"], row["val_loss_ci_high"], ".3f"),
        "val PPL [95% CI]": ppl,
        "Δ loss vs previous (p)": delta,
        "beyond noise": beyond,
    }
    if row["avg_acc_mean"] is not None:
        delta, beyond = _difference_cells(
            row["avg_acc_delta_vs_prev"], row["avg_acc_p_vs_prev"], row["avg_acc_beyond_noise_vs_prev"]
        )
        cells |= {
            "avg acc (mean ± std)": _plus_minus(row["avg_acc_mean"], row["avg_acc_std"], ".3f"),
            "avg acc 95% CI": _bracket(row["avg_acc_ci_low"], row["avg_acc_ci_high"], ".3f"),
            "Δ acc vs previous (p)": delta,
            "acc beyond noise": beyond,
        }
    return cells


def unfinished_lines(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """A markdown line per configuration with seeds left out of its averages."""
    return [f"⚠ **{row['configuration']}**: not averaged: {row['unfinished']}" for row in rows if row["unfinished"]]


def learning_curves(configurations: Sequence[Configuration], key: str = "val_loss") -> list[Curve]:
    """Each configuration's validation curve over its finished seeds: mean with the 95% interval as a band."""
    curves = []
    for configuration in configurations:
        points = configuration.curve(key)
        if not points:
            continue
        example = configuration.done[0]
        estimates = [est for _, _, est in points]
        with_band = all(est.interval is not None for est in estimates)
        tokens = [tokens for _, tokens, _ in points]
        curves.append(
            Curve(
                label=configuration.label,
                tokens=tokens,
                flops=None if example.flops_per_token is None else [example.training_flops(t) for t in tokens],
                mean=[est.mean for est in estimates],
                low=[est.interval[0] for est in estimates] if with_band else None,
                high=[est.interval[1] for est in estimates] if with_band else None,
                seeds=len(configuration.done),
            )
        )
    return curves


def comparison_markdown(rows: Sequence[Mapping[str, Any]], notes: Sequence[str] = ()) -> str:
    """A comparison's table (statistics cells, tokens, FLOPs per token), then ``notes`` and the unfinished seeds."""
    shown = [
        {"configuration": row["configuration"]}
        | {"params": row["parameters"], "FLOPs/token (fwd)": row["flops_per_token"], "tokens": row["tokens"]}
        | statistics_cells(row)
        for row in rows
    ]
    columns = list(dict.fromkeys(key for cells in shown for key in cells))
    shown = [{column: cells.get(column) for column in columns} for cells in shown]
    table = markdown_table(shown, columns, {"params": ",d", "FLOPs/token (fwd)": ".3g", "tokens": ",d"})
    return table + "\n" + "\n\n".join([*notes, *unfinished_lines(rows)]) + "\n"


def write_comparison(
    configurations: Sequence[Configuration], output_dir: str | os.PathLike, stem: str, title: str
) -> dict[str, Any]:
    """``<stem>.md``, ``<stem>.csv`` (one row per configuration) and ``<stem>.png`` (learning curves)."""
    rows = statistics_rows(configurations)
    out = Path(output_dir)
    markdown = f"# {title}\n\n" + comparison_markdown(rows, [LEGEND]) + f"\n![learning curves]({stem}.png)\n"
    paths = {
        "markdown": write_text_atomic(out / f"{stem}.md", markdown),
        "csv": write_csv_atomic(out / f"{stem}.csv", rows, STAT_COLUMNS),
        "plot": plot_learning_curves([(title, learning_curves(configurations))], out / f"{stem}.png"),
    }
    return {"paths": paths, "rows": rows, "configurations": configurations}


def compare_runs(
    patterns: Iterable[str], output_dir: str | os.PathLike, title: str = "Comparison", stem: str = "comparison"
) -> dict[str, Any]:
    """Compare run directories given as paths or globs; seeds of one configuration are grouped automatically."""
    configurations = group_seeds([read_run(path) for path in expand_run_paths(patterns)])
    return write_comparison(configurations, output_dir, stem, title)


__all__ = [
    "CONFIDENCE",
    "LEGEND",
    "STAT_COLUMNS",
    "compare_runs",
    "comparison_markdown",
    "learning_curves",
    "statistics_cells",
    "statistics_row",
    "statistics_rows",
    "unfinished_lines",
    "write_comparison",
]


def print_report(result: Mapping[str, Any], unfinished_label: str) -> int:
    """Print a comparison or sweep result (its markdown, then its files); exit status 1 if a seed is not averaged."""
    print(result["paths"]["markdown"].read_text())
    for path in result["paths"].values():
        print(path)
    unfinished = [seed for configuration in result["configurations"] for seed in configuration.unfinished]
    if unfinished:
        print(f"{unfinished_label}: {'; '.join(unfinished)}", file=sys.stderr)
    return 1 if unfinished else 0
