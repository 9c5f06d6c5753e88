"""The table of an ablation sweep (spec §6, the paper's Tables 3–6), with seeds (issue 13).

A sweep is ``python scripts/pretrain.py -m +sweep=<name> [seed=1234,1235,1236]`` (conf/sweep/<name>.yaml): Hydra's
basic sweeper trains one run per (swept value, seed) into ``<train.output_dir>/<value label>-seed<seed>/``.
:func:`aggregate_sweep` reads those run directories (not W&B's servers) and writes, per swept value, the final
validation loss and perplexity over the finished seeds (mean ± std, 95% interval), Welch's test against the
previous value, the model's shape, FLOPs and table memory, and the paper's numbers (mf-tiny, 8,000 steps) beside
ours: markdown, CSV, a plot with error bars and the learning curves with bands.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memoryformer.flops import GIGA, PAPER_SEQ_LEN, block_exact_macs, block_flops
from memoryformer.layers import block_table_bytes, table_bytes
from memoryformer.models import model_config_from_config, recommended_lr
from memoryformer.reporting import (
    markdown_table,
    plot_learning_curves,
    plot_sweep_values,
    write_csv_atomic,
    write_text_atomic,
)
from memoryformer.sweeps.compare import (
    LEGEND,
    STAT_COLUMNS,
    learning_curves,
    statistics_cells,
    statistics_rows,
    unfinished_lines,
)
from memoryformer.sweeps.runs import Configuration, Run, collect_runs, group_seeds

log = logging.getLogger(__name__)

MB = 1e6  # the paper's memory unit (decimal MB)


# --- the paper's ablation tables -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PaperAblation:
    """One of the paper's ablation tables (spec §6): mf-tiny trained for 8,000 steps, by swept value."""

    table: int
    title: str
    label: str  # the swept quantity in headers and on the plot's axis
    val_ppl: dict[Any, float] = field(default_factory=dict)
    memory_mb: dict[Any, float] = field(default_factory=dict)  # table memory the paper prints, fp16, decimal MB
    memory_of: str | None = None  # which tables `memory_mb` measures: "q" (one layer's Q) or "memory_block"
    avg_acc: dict[Any, float] = field(default_factory=dict)  # average zero-shot accuracy (Table 6)


PAPER_ABLATIONS: dict[str, PaperAblation] = {
    "tau_k": PaperAblation(
        3,
        "bits per chunk τ and number of tables K = d/τ",
        "τ",
        val_ppl={4: 19.01, 8: 18.82, 10: 18.67},
        memory_mb={4: 2.1, 8: 16.8, 10: 53.5},
        memory_of="q",
    ),
    "lr": PaperAblation(4, "peak learning rate", "LR", val_ppl={1e-3: 19.86, 2e-3: 19.07, 3e-3: 18.82, 4e-3: 18.84}),
    "expand_bits": PaperAblation(
        5,
        "expanding bits e of the Memory Block",
        "e",
        val_ppl={0: 19.89, 1: 19.26, 2: 18.82, 3: 18.54},
        memory_mb={0: 33.6, 1: 52.4, 2: 88.1, 3: 157.3},
        memory_of="memory_block",
    ),
    "gelu": PaperAblation(
        6,
        "GeLU in the Memory Block",
        "activation",
        avg_acc={None: 0.404, "gelu": 0.402},
    ),
}


def _lookup(table: Mapping[Any, float], value: Any) -> float | None:
    """``table[value]``, comparing numbers with a relative tolerance (a swept 0.001 is the paper's 1e-3)."""
    for key, paper_value in table.items():
        both_numbers = isinstance(key, (int, float)) and isinstance(value, (int, float))
        if (both_numbers and math.isclose(key, value, rel_tol=1e-9)) or (not both_numbers and key == value):
            return paper_value
    return None


# --- the runs of a sweep, by swept value ----------------------------------------------------------------------


def _value_key(value: Any) -> tuple:
    return (value is not None, value if value is not None else 0)


def sweep_configurations(runs: Sequence[Run], expected_seeds: Sequence[int] | None = None) -> list[Configuration]:
    """The sweep's runs grouped by swept value (their seeds together), ordered by value.

    ``expected_seeds`` (e.g. from ``seed=1,2,3``) lets a value list seeds that never started; by default every
    seed seen anywhere in the sweep is expected of every value.
    """
    configurations = group_seeds(runs)
    values = {id(c): c.runs[0].value for c in configurations}
    if len(set(map(repr, values.values()))) != len(configurations):
        raise ValueError(
            "runs with the same swept value differ in other settings: "
            + ", ".join(f"{c.label}={values[id(c)]!r}" for c in configurations)
            + "; keep one sweep (one model, one step count) per directory"
        )
    seeds = sorted({run.seed for run in runs if run.seed is not None}) if expected_seeds is None else expected_seeds
    for configuration in configurations:
        configuration.expected_seeds = list(seeds)
    return sorted(configurations, key=lambda c: _value_key(values[id(c)]))


# --- the table ---------------------------------------------------------------------------------------------------

SWEEP_COLUMNS = [
    "value",
    *STAT_COLUMNS,
    "paper_val_ppl",
    "d",
    "heads",
    "tau",
    "K",
    "expand_bits",
    "activation",
    "lr",
    "block_flops_G",
    "block_exact_flops_G",
    "q_table_MB",
    "memory_block_tables_MB",
    "paper_memory_MB",
    "paper_avg_acc",
]


def _model_facts(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Shape, FLOPs per block (paper convention and exact, s = 2048) and fp16 table memory."""
    config = model_config_from_config(model_cfg)
    d, tau = config.hidden_size, config.tau
    return {
        "d": d,
        "heads": config.num_attention_heads,
        "tau": tau,
        "K": config.num_chunks,
        "expand_bits": config.expand_bits,
        "activation": config.memory_block_activation or "none",
        "block_flops_G": block_flops(config, PAPER_SEQ_LEN).without_attention / GIGA,
        "block_exact_flops_G": block_exact_macs(config, PAPER_SEQ_LEN).without_attention / GIGA,
        "q_table_MB": table_bytes(d, d, tau) / MB,
        "memory_block_tables_MB": block_table_bytes(d, tau, config.expand_bits) / MB,
    }


def _recommended_lr(model_name: str) -> float | None:
    try:
        return recommended_lr(model_name)[0]  # what the trainer uses for train.lr=null
    except ValueError:
        return None


def sweep_rows(configurations: Sequence[Configuration], paper: PaperAblation) -> list[dict[str, Any]]:
    """A row per swept value (:data:`SWEEP_COLUMNS`): our seeds' statistics, the model's facts, the paper's value."""
    rows = []
    for configuration, stats in zip(configurations, statistics_rows(configurations), strict=True):
        example = configuration.example
        row: dict[str, Any] = dict.fromkeys(SWEEP_COLUMNS) | stats | {"value": example.value}
        if example.config is not None:
            row["lr"] = example.config["train"]["lr"] or _recommended_lr(example.config["model"]["name"])
            try:
                row |= _model_facts(example.config["model"])
            except ValueError as error:  # an invalid model: its runs failed on it, and say so in `unfinished`
                log.warning("%s: no model facts (%s)", configuration.label, error)
        row["paper_val_ppl"] = _lookup(paper.val_ppl, example.value)
        row["paper_memory_MB"] = _lookup(paper.memory_mb, example.value)
        row["paper_avg_acc"] = _lookup(paper.avg_acc, example.value)
        rows.append(row)
    return rows


def _value_label(value: Any) -> str:
    return "none" if value is None else format(value, "g") if isinstance(value, float) else str(value)


def sweep_markdown(rows: Sequence[Mapping[str, Any]], paper: PaperAblation, runs: Sequence[Run]) -> str:
    """The table as markdown, with a legend saying what is compared with what."""
    ours = {(run.config or {}).get("model", {}).get("name") for run in runs} - {None}
    steps = {(run.config or {}).get("train", {}).get("max_steps") for run in runs} - {None}
    memory_column = {"q": "q_table_MB", "memory_block": "memory_block_tables_MB"}.get(paper.memory_of)
    memory_header = {"q": "memory of layer Q (MB)", "memory_block": "Memory-Block tables (MB)"}.get(paper.memory_of)
    shown = []
    for row in rows:
        cells = {paper.label: _value_label(row["value"]), "steps": row["steps"]} | statistics_cells(row)
        if paper.val_ppl:
            cells["paper val PPL"] = row["paper_val_ppl"]
        cells |= {"d": row["d"], "K": row["K"], "FLOPs/block w/o attn (G)": row["block_flops_G"]}
        if memory_column:
            cells |= {memory_header: row[memory_column], f"paper {memory_header}": row["paper_memory_MB"]}
        if paper.avg_acc:
            cells["paper avg acc"] = row["paper_avg_acc"]
        shown.append(cells)
    columns = list(dict.fromkeys(key for cells in shown for key in cells))
    shown = [{column: cells.get(column) for column in columns} for cells in shown]
    formats = {"paper val PPL": ".2f", "FLOPs/block w/o attn (G)": ".3f", "paper avg acc": ".3f"}
    if memory_header:
        formats |= {memory_header: ".1f", f"paper {memory_header}": ".1f"}
    legend = [
        f"Ours: {', '.join(sorted(ours)) or '?'}, {', '.join(map(str, sorted(steps))) or '?'} steps, final "
        "validation. Paper: mf-tiny, 8,000 steps, one run per value (spec §6). Compare rows within our columns and "
        "within the paper's, not across them: the models, data and training length differ.",
        LEGEND,
        "FLOPs: multiply-accumulates of one block at s = 2048 without attention, the paper's convention 6Ksd "
        "(spec §5). Memory: fp16 tables, decimal MB, biases excluded.",
    ]
    if paper.memory_of == "q":
        legend.append(
            "Q, K and V share one hash (spec §3); 'memory of layer Q' is one of the three. For τ=10 the paper "
            "prints 53.5 MB, which is K·2^τ·512·2 bytes (an output width of 512), while d = 510 gives 53.3 MB."
        )
    if paper.avg_acc:
        limits = sorted({row["eval_limit"] for row in rows if row["eval_limit"] is not None})
        legend.append(
            "avg acc: mean zero-shot accuracy over the scored tasks"
            + (f", first {', '.join(map(str, limits))} documents per task only (not comparable)." if limits else ".")
        )
    legend += unfinished_lines(rows)
    title = f"# Table {paper.table}: {paper.title} (ablation)\n\n"
    return title + markdown_table(shown, columns, formats) + "\n" + "\n\n".join(legend) + "\n"


def plot_sweep(rows: Sequence[Mapping[str, Any]], paper: PaperAblation, path: str | os.PathLike) -> Path:
    """Validation PPL against the swept value: ours (mean, 95% interval; left axis), the paper's (right axis)."""
    labels = [_value_label(row["value"]) for row in rows]
    if paper.memory_of == "q":
        labels = [label + (f"\nK={row['K']}" if row["K"] else "") for label, row in zip(labels, rows, strict=True)]
    notes = [
        None if not row["unfinished"] else f"{row['seeds_done']} done" if row["seeds_done"] else "none done"
        for row in rows
    ]
    return plot_sweep_values(
        labels,
        [row["val_ppl"] for row in rows],
        [row["val_ppl_ci_low"] for row in rows],  # exp of the loss interval: asymmetric in PPL
        [row["val_ppl_ci_high"] for row in rows],
        path,
        xlabel=paper.label,
        ylabel="validation PPL",
        title=f"Table {paper.table}: validation PPL vs {paper.label}",
        notes=notes,
        reference=[row["paper_val_ppl"] for row in rows],
        reference_label="paper (mf-tiny, 8k steps)",
    )


def aggregate_sweep(
    sweep_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    sweep: str | None = None,
    seeds: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Read a sweep's run directories and write ``table<N>_<sweep>.{md,csv,png}`` and ``…_curves.png``.

    ``sweep`` (tau_k, lr, expand_bits or gelu) defaults to the name recorded in the runs' configs; ``output_dir``
    to ``sweep_dir``; ``seeds`` (the expected seeds) to every seed found. Returns the written paths, the rows, the
    runs and the configurations (check ``unfinished`` for seeds left out).
    """
    runs = collect_runs(sweep_dir)
    recorded = {run.sweep for run in runs} - {None}
    if sweep is None:
        if len(recorded) != 1:
            raise ValueError(f"cannot tell which sweep {sweep_dir} holds (recorded: {sorted(recorded)}); pass sweep=")
        sweep = recorded.pop()
    if sweep not in PAPER_ABLATIONS:
        raise ValueError(f"unknown sweep {sweep!r}; the paper's ablations are {list(PAPER_ABLATIONS)}")
    paper = PAPER_ABLATIONS[sweep]
    configurations = sweep_configurations(runs, seeds)
    rows = sweep_rows(configurations, paper)
    out = Path(output_dir if output_dir is not None else sweep_dir)
    stem = f"table{paper.table}_{sweep}"
    curves_title = f"Table {paper.table}: validation loss by {paper.label}"
    paths = {
        "markdown": write_text_atomic(out / f"{stem}.md", sweep_markdown(rows, paper, runs)),
        "csv": write_csv_atomic(out / f"{stem}.csv", rows, SWEEP_COLUMNS),
        "plot": plot_sweep(rows, paper, out / f"{stem}.png"),
        "curves": plot_learning_curves([(curves_title, learning_curves(configurations))], out / f"{stem}_curves.png"),
    }
    return {"paths": paths, "rows": rows, "runs": runs, "configurations": configurations}
