"""Table 1-style result tables (markdown and CSV) from any number of evaluation result files (spec §6).

A row per evaluated model: name, layers, hidden size, FLOPs per block at s = 2048 without attention and in
total (spec §5, G = 10⁹ multiply-accumulates), zero-shot ``acc`` ± stderr per task and the average. A model
named like one of the paper's (see :func:`~memoryformer.evaluation.paper_results.paper_row`) gets the paper's
row right below it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from memoryformer.evaluation.paper_results import PaperRow, paper_row
from memoryformer.evaluation.tasks import PAPER_TASKS
from memoryformer.flops import GIGA, PAPER_TABLE1_FLOPS
from memoryformer.reporting import markdown_table, write_csv_atomic, write_text_atomic

RESULTS_FILE = "results.json"
TABLE_STEM = "table"
TASK_HEADERS = {
    "piqa": "PIQA",
    "winogrande": "WinoGrande",
    "wsc": "WSC",
    "arc_easy": "ARC-E",
    "arc_challenge": "ARC-C",
    "logiqa": "LogiQA",
}


def _number(value: Any) -> float | None:
    """lm-eval writes "N/A" for a stderr it cannot compute (e.g. one document)."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _mean(values: Sequence[float | None]) -> float | None:
    return None if not values or None in values else sum(values) / len(values)


def _our_row(results: Mapping[str, Any], tasks: Sequence[str]) -> dict[str, Any]:
    info = results["model_info"]
    row: dict[str, Any] = {
        "model": info["name"],
        "source": "ours",
        "layers": info["layers"],
        "hidden": info["hidden"],
        "flops_without_attention_G": info["flops_without_attention"] / GIGA,
        "flops_total_G": info["flops_total"] / GIGA,
        "limit": info["limit"],
    }
    for task in tasks:
        metrics = results["results"].get(task, {})
        row[f"{task}_acc"] = _number(metrics.get("acc,none"))
        row[f"{task}_acc_stderr"] = _number(metrics.get("acc_stderr,none"))
    row["avg_acc"] = _mean([row[f"{task}_acc"] for task in tasks])
    return row


def _paper_table_row(paper: PaperRow, tasks: Sequence[str]) -> dict[str, Any]:
    flops = PAPER_TABLE1_FLOPS[paper.name]
    row: dict[str, Any] = {
        "model": f"{paper.display_name} (paper)",
        "source": "paper",
        "layers": paper.layers,
        "hidden": paper.hidden,
        "flops_without_attention_G": flops[0],
        "flops_total_G": flops[1],
        "limit": None,
    }
    for task in tasks:
        row[f"{task}_acc"] = paper.accuracy[task]
        row[f"{task}_acc_stderr"] = None
    # The paper's printed average when all six columns are shown (it is rounded from unrounded accuracies).
    row["avg_acc"] = paper.average if list(tasks) == list(PAPER_TASKS) else _mean([paper.accuracy[t] for t in tasks])
    return row


def table_rows(all_results: Iterable[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows (ours, each followed by the paper's row for the same model) and the tasks shown, in Table 1 order."""
    all_results = list(all_results)
    for results in all_results:
        if "model_info" not in results:
            raise ValueError("a results dict without 'model_info' was not written by evaluate_checkpoint")
    evaluated = {task for results in all_results for task in results["results"]}
    tasks = [task for task in PAPER_TASKS if task in evaluated]
    rows: list[dict[str, Any]] = []
    for results in all_results:
        rows.append(_our_row(results, tasks))
        paper = paper_row(results["model_info"]["name"])
        if paper is not None and not any(row["model"] == f"{paper.display_name} (paper)" for row in rows):
            rows.append(_paper_table_row(paper, tasks))
    return rows, tasks


def csv_columns(tasks: Sequence[str]) -> list[str]:
    per_task = [f"{task}_{metric}" for task in tasks for metric in ("acc", "acc_stderr")]
    shape = ["model", "source", "layers", "hidden", "flops_without_attention_G", "flops_total_G"]
    return [*shape, *per_task, "avg_acc", "limit"]


def _accuracy_cell(acc: float | None, stderr: float | None) -> str:
    if acc is None:
        return ""
    return f"{acc:.3f}" if stderr is None else f"{acc:.3f} ± {stderr:.3f}"


def markdown(rows: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> str:
    """Table 1 as markdown, with a legend saying what the numbers are."""
    shown = []
    for row in rows:
        cells = {
            "Model": row["model"] + ("†" if row["limit"] is not None else ""),
            "Layers": row["layers"],
            "Hidden": row["hidden"],
            "FLOPs w/o attn (G)": row["flops_without_attention_G"],
            "FLOPs total (G)": row["flops_total_G"],
            "Avg": row["avg_acc"],
        }
        cells |= {TASK_HEADERS[t]: _accuracy_cell(row[f"{t}_acc"], row[f"{t}_acc_stderr"]) for t in tasks}
        shown.append(cells)
    columns = ["Model", "Layers", "Hidden", "FLOPs w/o attn (G)", "FLOPs total (G)"]
    columns += [TASK_HEADERS[t] for t in tasks] + ["Avg"]
    legend = (
        "Zero-shot accuracy (lm-eval-harness `acc`) ± its standard error. FLOPs: multiply-accumulates of one "
        "block at s = 2048 in G = 10⁹ (spec §5). Rows marked (paper) are the paper's Table 1."
    )
    limits = sorted({row["limit"] for row in rows if row["limit"] is not None})
    if limits:
        legend += f" † evaluated on the first {', '.join(map(str, limits))} documents per task only: not comparable."
    formats = {"FLOPs w/o attn (G)": ".2f", "FLOPs total (G)": ".2f", "Avg": ".3f"}
    return markdown_table(shown, columns, formats) + "\n" + legend + "\n"


def table_markdown(all_results: Iterable[Mapping[str, Any]]) -> str:
    """Table 1 of ``all_results`` as markdown (what ``table.md`` holds)."""
    return markdown(*table_rows(all_results))


def summary_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """One model's numbers as a flat dict for trackers: ``<task>/acc``, ``<task>/acc_stderr``, ``avg/acc``."""
    rows, tasks = table_rows([results])
    row = rows[0]
    metrics = {f"{task}/{metric}": row[f"{task}_{metric}"] for task in tasks for metric in ("acc", "acc_stderr")}
    metrics["avg/acc"] = row["avg_acc"]
    return {key: value for key, value in metrics.items() if value is not None}


def write_tables(all_results: Iterable[Mapping[str, Any]], output_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``table.md`` and ``table.csv`` for ``all_results`` into ``output_dir`` (atomically)."""
    rows, tasks = table_rows(all_results)
    out = Path(output_dir)
    return {
        "markdown": write_text_atomic(out / f"{TABLE_STEM}.md", markdown(rows, tasks)),
        "csv": write_csv_atomic(out / f"{TABLE_STEM}.csv", rows, csv_columns(tasks)),
    }


class ResultsNotFoundError(FileNotFoundError):
    """No evaluation results where `make tables` looked; the message says how to produce or name them."""


class InvalidResultsError(ValueError):
    """A file given to `make tables` that `make eval` did not write."""


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    """A results file written by ``evaluate_checkpoint`` (or the directory holding ``results.json``)."""
    path = Path(path)
    file = path / RESULTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise ResultsNotFoundError(f"no evaluation results at {file}; run `make eval` first or pass existing files")
    results = json.loads(file.read_text(encoding="utf-8"))
    if "model_info" not in results or "results" not in results:
        raise InvalidResultsError(
            f"{file} is not a results file written by `make eval` (no 'model_info'/'results' keys)"
        )
    return results


def find_results(runs_dir: str | os.PathLike) -> list[Path]:
    """Every results file under ``runs_dir``: each run's end-of-run or `make eval` results (``<run>/eval/``) and
    those of other models (``eval/<model>/``)."""
    runs = Path(runs_dir)
    return sorted({*runs.glob(f"*/eval/{RESULTS_FILE}"), *runs.glob(f"eval/*/{RESULTS_FILE}")})


def make_tables(result_files: Iterable[str | os.PathLike], output_dir: str | os.PathLike) -> dict[str, Path]:
    """Merge any number of result files (or directories holding ``results.json``) into one Table 1."""
    result_files = list(result_files)
    if not result_files:
        raise ResultsNotFoundError(
            "no evaluation results found or given; evaluate a checkpoint with `make eval` first (results go to "
            "runs/<run>/eval/) or name them: make tables RESULTS=a,b"
        )
    return write_tables([read_results(path) for path in result_files], output_dir)
