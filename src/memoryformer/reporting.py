"""Writing result files: atomic writes, markdown and CSV tables from rows of dicts, and seed-aware plots.

Shared by every result-table writer (FLOPs, evaluation, sweeps, comparisons, the study). A row is a ``dict`` from
column name to value; ``columns`` picks and orders the columns. Every write goes to a temporary file in the target
directory and is renamed over the target, so a crash never leaves a half-written result behind.

The plots (:func:`plot_learning_curves`, :func:`plot_sweep_values`) take plain numbers: a mean per point and,
when several seeds finished, the bounds of its confidence interval, drawn as a band or an error bar.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on error delete it.

    For writers that want a file name rather than a string (e.g. ``Figure.savefig``). The temporary name keeps
    ``path``'s suffix so such writers infer the same format. Parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name, not mkstemp: the writer creates the file, so it gets the usual umask permissions, not 0600.
    tmp_path = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.tmp{path.suffix}")
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _check_columns(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    if not columns:
        raise ValueError("columns is empty: name at least one column to write")
    for i, row in enumerate(rows):
        missing = [c for c in columns if c not in row]
        if missing:
            raise KeyError(f"row {i} has no column(s) {missing}; its columns are {list(row)}")


def _markdown_cell(value: Any, spec: str | None) -> str:
    if value is None:
        return ""
    text = format(value, spec) if spec else str(value)
    # A literal "|" would split the cell; newlines would end the row.
    return text.replace("|", r"\|").replace("\n", " ")


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    formats: Mapping[str, str] | None = None,
) -> str:
    """A GitHub-flavoured markdown table of ``rows`` with a header of ``columns``, ending in a newline.

    ``formats`` maps a column to a ``format()`` spec (e.g. ``{"params": ",d", "loss": ".3f"}``); other values
    are shown with ``str``. ``None`` shows as an empty cell.
    """
    _check_columns(rows, columns)
    formats = formats or {}
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_markdown_cell(row[c], formats.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_csv_atomic(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """Write ``rows`` as CSV with a header of ``columns`` to ``path`` atomically; ``None`` is an empty field."""
    _check_columns(rows, columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text_atomic(path, buffer.getvalue())


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless

    return Figure(figsize=(width, height), layout="constrained")


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """``fig.savefig`` (150 dpi) atomically; returns the path."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=150)
    return Path(path)


@dataclass(frozen=True)
class Curve:
    """One configuration's learning curve: the mean over seeds at each point, and its interval if n ≥ 2."""

    label: str
    tokens: Sequence[float]
    flops: Sequence[float] | None  # training FLOPs at each point; None when unknown
    mean: Sequence[float]
    low: Sequence[float] | None = None  # interval bounds (None: one seed, no band)
    high: Sequence[float] | None = None
    seeds: int = 1


def plot_learning_curves(
    panels: Sequence[tuple[str, Sequence[Curve]]],
    path: str | os.PathLike,
    ylabel: str = "validation loss",
    band: str = "95% t-interval of the mean",
) -> Path:
    """One row per (title, curves) panel: the metric against tokens (left) and training FLOPs (right).

    Each curve is its seeds' mean with a shaded band between ``low`` and ``high`` (the caller's interval, which
    ``band`` names in the figure's caption).
    """
    fig = _new_figure(11, 3.6 * len(panels))
    axes = fig.subplots(len(panels), 2, squeeze=False)
    for (title, curves), (by_tokens, by_flops) in zip(panels, axes, strict=True):
        for i, curve in enumerate(curves):
            color = f"C{i}"
            label = f"{curve.label} (n={curve.seeds})"
            for ax, xs in ((by_tokens, curve.tokens), (by_flops, curve.flops)):
                if xs is None:
                    continue
                ax.plot(xs, curve.mean, "o-", color=color, markersize=3, label=label)
                if curve.low is not None and curve.high is not None:
                    ax.fill_between(xs, curve.low, curve.high, color=color, alpha=0.2, linewidth=0)
        by_tokens.set_title(title, loc="left", fontsize="medium")
        by_tokens.set_xlabel("training tokens")
        by_flops.set_xlabel("training FLOPs (3 × forward)")
        for ax in (by_tokens, by_flops):
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
        by_flops.set_xscale("log")
        by_tokens.legend(fontsize="small")
    fig.suptitle(f"line: mean over finished seeds; band: {band}", fontsize="small", color="0.3")
    return save_figure(fig, path)


def plot_sweep_values(
    labels: Sequence[str],
    means: Sequence[float | None],
    lows: Sequence[float | None],
    highs: Sequence[float | None],
    path: str | os.PathLike,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    notes: Sequence[str | None] = (),
    reference: Sequence[float | None] = (),
    reference_label: str = "paper",
) -> Path:
    """``means`` with error bars from ``lows`` to ``highs`` (an interval, may be asymmetric; None: no bar) against
    categorical ``labels``; a note (e.g. "2 done") where a value is missing or partial; an optional ``reference``
    series (the paper's numbers) on a right-hand axis."""
    fig = _new_figure(6.4, 4.2)
    ax = fig.add_subplot()
    positions = list(range(len(labels)))
    shown = [i for i in positions if means[i] is not None]
    if shown:
        ax.errorbar(
            shown,
            [means[i] for i in shown],
            yerr=[
                [means[i] - lows[i] if lows[i] is not None else 0.0 for i in shown],
                [highs[i] - means[i] if highs[i] is not None else 0.0 for i in shown],
            ],
            fmt="o-",
            color="tab:blue",
            capsize=4,
            label="ours (mean, 95% CI)",
        )
    for i, note in enumerate(notes):
        if note:
            ax.annotate(
                note, (i, 0.95), xycoords=("data", "axes fraction"), color="tab:red", ha="center", fontsize="small"
            )
            if means[i] is None:
                ax.axvline(i, color="tab:red", linestyle=":", alpha=0.6)
    ax.set_xticks(positions, labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel, color="tab:blue")
    ax.grid(True, alpha=0.3)
    with_reference = [i for i, value in enumerate(reference) if value is not None]
    if with_reference:
        twin = ax.twinx()
        twin.plot(
            with_reference, [reference[i] for i in with_reference], "s--", color="tab:orange", label=reference_label
        )
        twin.set_ylabel(f"{ylabel} ({reference_label})", color="tab:orange")
        fig.legend(loc="outside upper right", ncols=2, fontsize="small")
    elif shown:
        ax.legend()
    ax.set_title(title, loc="left")
    return save_figure(fig, path)


__all__ = [
    "Curve",
    "atomic_path",
    "markdown_table",
    "plot_learning_curves",
    "plot_sweep_values",
    "save_figure",
    "write_csv_atomic",
    "write_text_atomic",
]
