"""Ablation sweeps (spec §6, the paper's Tables 3–6): running them with Hydra multirun and tabulating them.

A sweep is ``python scripts/pretrain.py -m +sweep=<name>`` with ``conf/sweep/<name>.yaml``: Hydra's basic
sweeper trains one run per swept value into ``<train.output_dir>/<train.run_name>/``. This module holds what
the configs and the entry points need:

- :func:`register_sweep_resolvers` — the ``${sweep_width:...}`` and ``${sweep_heads:...}`` resolvers of
  Table 3, which fit the model width to τ (d = K·τ; τ=10 on mf-tiny gives the paper's d = 510).
- :func:`pretrain_job` — the Hydra task: in a multirun a failed run is logged, recorded as ``FAILED`` (JSON with
  the traceback) in its run directory, and the sweep goes on; a single run still raises.
- :func:`collect_runs` / :func:`aggregate_sweep` — read the run directories (not W&B's servers) and write the
  table as markdown and CSV, with the paper's numbers (mf-tiny, 8,000 steps) beside ours, and a plot of
  validation perplexity against the swept value.

It lives at the package top level, like ``flops.py``, because it joins training, FLOPs accounting and reporting;
``evaluation/`` is the lm-eval side.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from memoryformer.reporting import atomic_path, markdown_table, write_csv_atomic, write_text_atomic

log = logging.getLogger(__name__)

FAILED_FILE = "FAILED"  # JSON: error, traceback, Hydra overrides and the swept value of a run that raised
MB = 1e6  # the paper's memory unit (decimal MB)


# --- config resolvers (Table 3: d = K·τ) ---------------------------------------------------------------------


def fitted_width(model_name: str, tau: int) -> int:
    """The width d = K·τ with K = ⌊d_model/τ⌋: the model's own width when τ divides it, else rounded down.

    The paper's τ=10 row of Table 3 is mf-tiny at d = 510 = 51·10 (spec §6).
    """
    from memoryformer.models import model_config

    if not isinstance(tau, int) or tau < 1:
        raise ValueError(f"tau must be a positive integer, got {tau!r}")
    d = model_config(model_name).hidden_size
    if tau > d:
        raise ValueError(f"tau={tau} exceeds the width d={d} of {model_name}: K = ⌊d/τ⌋ would be 0")
    return tau * (d // tau)


def fitted_heads(model_name: str, hidden_size: int) -> int:
    """The model's number of heads if it suits ``hidden_size``, else the nearest that does (ties: fewer heads).

    A head count suits a width when it divides it and leaves an even number of rotary dims per head
    (int(head_dim · rotary_pct) rotates pairs); e.g. mf-tiny at d = 510 gets 10 heads, mf-nano at d = 120 gets 3.
    """
    from memoryformer.models import model_config

    config = model_config(model_name)
    suitable = [
        h
        for h in range(1, hidden_size + 1)
        if hidden_size % h == 0 and int(hidden_size // h * config.rotary_pct) % 2 == 0
    ]
    if not suitable:
        raise ValueError(f"no number of heads gives an even rotary width at hidden_size={hidden_size}")
    return min(suitable, key=lambda h: (abs(h - config.num_attention_heads), h))


def register_sweep_resolvers() -> None:
    """``${sweep_width:MODEL,TAU}`` → :func:`fitted_width`; ``${sweep_heads:MODEL,WIDTH}`` → :func:`fitted_heads`."""
    if not OmegaConf.has_resolver("sweep_width"):
        OmegaConf.register_new_resolver("sweep_width", fitted_width)
    if not OmegaConf.has_resolver("sweep_heads"):
        OmegaConf.register_new_resolver("sweep_heads", fitted_heads)


# --- the Hydra task --------------------------------------------------------------------------------------------


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _failure_dir(cfg: DictConfig) -> Path:
    """The run directory; Hydra's job directory if even that cannot be resolved (e.g. a bad interpolation)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return Path(cfg.train.output_dir) / cfg.train.run_name
    except Exception:  # the failure being recorded may be this very resolution
        return Path(HydraConfig.get().runtime.output_dir)


def _swept_value(cfg: DictConfig) -> Any:
    try:
        return OmegaConf.select(cfg, cfg.sweep.parameter, throw_on_resolution_failure=True)
    except Exception:
        return None


def _finish_open_trackers() -> None:
    """A run that raised never reached ``end_training``: close its W&B run so the next run gets its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=1)


def without_sweeps(overrides: Sequence[str]) -> list[str]:
    """The overrides that are not sweeps (``key=a,b``): what composes the config a whole sweep shares."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [override.input_line for override in parsed if not override.is_sweep_override()]


def pretrain_job(cfg: DictConfig) -> Path | None:
    """Train one run of a Hydra job; the run directory, or ``None`` for a failed run in a multirun.

    In a multirun (``-m``), an exception fails only its own run: it is logged, written to ``<run>/FAILED``
    (JSON: error, traceback, overrides, swept value) and the sweep continues with the next run. A run that
    succeeds removes a ``FAILED`` left by an earlier attempt. Outside a multirun the exception propagates.
    """
    from hydra.core.hydra_config import HydraConfig

    from memoryformer.train import pretrain

    if not _in_multirun():
        return pretrain(cfg)
    run_dir = _failure_dir(cfg)
    try:
        result = pretrain(cfg)
    except Exception as error:
        _finish_open_trackers()
        record = {
            "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc(),
            "overrides": list(HydraConfig.get().overrides.task),
            "sweep": OmegaConf.select(cfg, "sweep.name"),
            "parameter": OmegaConf.select(cfg, "sweep.parameter"),
            "value": _swept_value(cfg),
        }
        write_text_atomic(run_dir / FAILED_FILE, json.dumps(record, indent=2, default=str) + "\n")
        log.error("run %s failed (the sweep continues): %s\n%s", run_dir, record["error"], record["traceback"])
        return None
    (run_dir / FAILED_FILE).unlink(missing_ok=True)
    return result


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


# --- reading the runs of a sweep -------------------------------------------------------------------------------


@dataclass
class SweepRun:
    """One run directory of a sweep: ``done`` (final model and validation), ``failed`` or ``incomplete``."""

    name: str
    run_dir: Path
    status: str
    sweep: str | None = None  # the sweep's name (conf/sweep/<name>.yaml)
    value: Any = None  # the swept value
    config: dict[str, Any] | None = None  # the run's resolved config.yaml
    final: dict[str, Any] = field(default_factory=dict)  # the last metrics.jsonl record with a validation
    error: str | None = None


def _final_validation(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    with_validation = [record for record in records if "val_ppl" in record]
    return with_validation[-1] if with_validation else {}


def _finished(run_dir: Path, config: Mapping[str, Any], final: Mapping[str, Any]) -> bool:
    """Trained to the last step and saved, and zero-shot scored if the run was to be (``train.eval_at_end``)."""
    trained = final.get("step") == config["train"]["max_steps"] and (run_dir / "model").is_dir()
    return trained and (not config["train"]["eval_at_end"] or (run_dir / "eval" / "results.json").is_file())


def read_run(run_dir: str | os.PathLike) -> SweepRun:
    """The state of one run directory written by :func:`pretrain_job`."""
    run_dir = Path(run_dir)
    run = SweepRun(run_dir.name, run_dir, "incomplete")
    if (run_dir / "config.yaml").is_file():
        config = OmegaConf.load(run_dir / "config.yaml")
        if "sweep" not in config:
            raise ValueError(f"{run_dir} is not a run of an ablation sweep (its config.yaml has no `sweep` node)")
        run.config = OmegaConf.to_container(config)
        run.sweep, run.value = config.sweep.name, OmegaConf.select(config, config.sweep.parameter)
    run.final = _final_validation(run_dir)
    if (run_dir / FAILED_FILE).is_file():
        failure = json.loads((run_dir / FAILED_FILE).read_text())
        run.status, run.error = "failed", failure["error"]
        if run.config is None:
            run.sweep, run.value = failure.get("sweep"), failure.get("value")
    elif run.config is not None and _finished(run_dir, run.config, run.final):
        run.status = "done"
    return run


def collect_runs(sweep_dir: str | os.PathLike) -> list[SweepRun]:
    """Every run directory of a sweep (one holding ``config.yaml`` or ``FAILED``), ordered by swept value."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"no sweep directory {sweep_dir}; run `make sweep SWEEP=<name>` first")
    runs = [
        read_run(child)
        for child in sorted(sweep_dir.iterdir())
        if child.is_dir() and ((child / "config.yaml").is_file() or (child / FAILED_FILE).is_file())
    ]
    if not runs:
        raise FileNotFoundError(f"{sweep_dir} holds no run directories (no */config.yaml or */{FAILED_FILE})")
    return sorted(runs, key=lambda run: (run.value is not None, run.value if run.value is not None else 0))


# --- the table ---------------------------------------------------------------------------------------------------

COLUMNS = [
    "value",
    "run",
    "status",
    "steps",
    "val_loss",
    "val_ppl",
    "paper_val_ppl",
    "d",
    "heads",
    "tau",
    "K",
    "expand_bits",
    "activation",
    "lr",
    "params",
    "block_flops_G",
    "block_exact_flops_G",
    "q_table_MB",
    "memory_block_tables_MB",
    "paper_memory_MB",
    "avg_acc",
    "eval_limit",
    "paper_avg_acc",
    "error",
]


def _model_facts(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Shape, parameters, FLOPs per block (paper convention and exact, s = 2048) and fp16 table memory."""
    from memoryformer.flops import GIGA, PAPER_SEQ_LEN, block_exact_macs, block_flops
    from memoryformer.layers import block_table_bytes, table_bytes
    from memoryformer.models import model_config_from_config, parameter_count
    from memoryformer.models.registry import split_model_config

    config = model_config_from_config(model_cfg)
    name, overrides = split_model_config(model_cfg)
    d, tau = config.hidden_size, config.tau
    return {
        "d": d,
        "heads": config.num_attention_heads,
        "tau": tau,
        "K": config.num_chunks,
        "expand_bits": config.expand_bits,
        "activation": config.memory_block_activation or "none",
        "params": parameter_count(name, **overrides),  # on the meta device: instant at any size
        "block_flops_G": block_flops(config, PAPER_SEQ_LEN).without_attention / GIGA,
        "block_exact_flops_G": block_exact_macs(config, PAPER_SEQ_LEN).without_attention / GIGA,
        "q_table_MB": table_bytes(d, d, tau) / MB,
        "memory_block_tables_MB": block_table_bytes(d, tau, config.expand_bits) / MB,
    }


def _recommended_lr(model_name: str) -> float | None:
    from memoryformer.models import recommended_lr

    try:
        return recommended_lr(model_name)[0]  # what the trainer uses for train.lr=null
    except ValueError:
        return None


def _average_accuracy(run_dir: Path) -> tuple[float | None, int | None]:
    """(average zero-shot accuracy, documents per task or None for all) of ``<run>/eval``, if it was scored."""
    from memoryformer.evaluation import read_results

    if not (run_dir / "eval" / "results.json").is_file():
        return None, None
    results = read_results(run_dir / "eval")
    return results["summary"].get("avg/acc"), results["model_info"]["limit"]


def sweep_rows(runs: Sequence[SweepRun], paper: PaperAblation) -> list[dict[str, Any]]:
    """A row per run (:data:`COLUMNS`): ours from the run directory, the paper's for the same swept value."""
    rows = []
    for run in runs:
        row: dict[str, Any] = dict.fromkeys(COLUMNS)
        row |= {"value": run.value, "run": run.name, "status": run.status, "error": run.error}
        row |= {
            "steps": run.final.get("step"),
            "val_loss": run.final.get("val_loss"),
            "val_ppl": run.final.get("val_ppl"),
        }
        if run.config is not None:
            row["lr"] = run.config["train"]["lr"] or _recommended_lr(run.config["model"]["name"])
            try:
                row |= _model_facts(run.config["model"])
            except ValueError as error:  # an invalid model: the run failed on it, and says so in `error`
                log.warning("run %s: no model facts (%s)", run.name, error)
        row["avg_acc"], row["eval_limit"] = _average_accuracy(run.run_dir)
        row["paper_val_ppl"] = _lookup(paper.val_ppl, run.value)
        row["paper_memory_MB"] = _lookup(paper.memory_mb, run.value)
        row["paper_avg_acc"] = _lookup(paper.avg_acc, run.value)
        rows.append(row)
    return rows


def _value_label(value: Any) -> str:
    return "none" if value is None else format(value, "g") if isinstance(value, float) else str(value)


def sweep_markdown(rows: Sequence[Mapping[str, Any]], paper: PaperAblation, runs: Sequence[SweepRun]) -> str:
    """The table as markdown, with a legend saying what is compared with what."""
    ours = {(run.config or {}).get("model", {}).get("name") for run in runs} - {None}
    steps = {(run.config or {}).get("train", {}).get("max_steps") for run in runs} - {None}
    memory_column = {"q": "q_table_MB", "memory_block": "memory_block_tables_MB"}.get(paper.memory_of)
    memory_header = {"q": "memory of layer Q (MB)", "memory_block": "Memory-Block tables (MB)"}.get(paper.memory_of)
    headers = {"value": paper.label, "status": "status", "steps": "steps", "val_ppl": "val PPL"}
    if paper.val_ppl:
        headers["paper_val_ppl"] = "paper val PPL"
    headers |= {"d": "d", "K": "K", "block_flops_G": "FLOPs/block w/o attn (G)"}
    if memory_column:
        headers |= {memory_column: memory_header, "paper_memory_MB": f"paper {memory_header}"}
    if paper.avg_acc:
        headers |= {"avg_acc": "avg acc", "paper_avg_acc": "paper avg acc"}
    shown = [{headers[key]: row[key] for key in headers} for row in rows]
    for cells in shown:
        cells[paper.label] = _value_label(cells[paper.label])
    formats = {
        "val PPL": ".2f",
        "paper val PPL": ".2f",
        "FLOPs/block w/o attn (G)": ".3f",
        "avg acc": ".3f",
        "paper avg acc": ".3f",
    }
    if memory_header:
        formats |= {memory_header: ".1f", f"paper {memory_header}": ".1f"}
    legend = [
        f"Ours: {', '.join(sorted(ours)) or '?'}, {', '.join(map(str, sorted(steps))) or '?'} steps, validation "
        "perplexity at the last step. Paper: mf-tiny, 8,000 steps (spec §6). Compare rows within our columns and "
        "within the paper's, not across them: the models, data and training length differ.",
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
    failed = [row for row in rows if row["status"] != "done"]
    for row in failed:
        legend.append(f"**{row['status']}**: `{row['run']}`" + (f" — {row['error']}" if row["error"] else ""))
    title = f"# Table {paper.table}: {paper.title} (ablation)\n\n"
    return title + markdown_table(shown, list(headers.values()), formats) + "\n" + "\n\n".join(legend) + "\n"


def plot_sweep(rows: Sequence[Mapping[str, Any]], paper: PaperAblation, path: str | os.PathLike) -> Path:
    """Validation PPL against the swept value: ours (left axis) and the paper's (right axis); failed runs marked."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    positions = list(range(len(rows)))  # categorical: τ, e and activations are labels as much as numbers
    labels = [_value_label(row["value"]) for row in rows]
    if paper.memory_of == "q":
        labels = [label + (f"\nK={row['K']}" if row["K"] else "") for label, row in zip(labels, rows, strict=True)]
    done = [i for i, row in enumerate(rows) if row["status"] == "done"]
    if done:
        ax.plot(done, [rows[i]["val_ppl"] for i in done], "o-", color="tab:blue", label="ours")
    for i, row in enumerate(rows):
        if row["status"] != "done":
            ax.axvline(i, color="tab:red", linestyle=":", alpha=0.6)
            ax.annotate(row["status"], (i, 0.95), xycoords=("data", "axes fraction"), color="tab:red", ha="center")
    ax.set_xticks(positions, labels)
    ax.set_xlabel(paper.label)
    ax.set_ylabel("validation PPL (ours)", color="tab:blue")
    ax.grid(True, alpha=0.3)
    with_paper = [i for i, row in enumerate(rows) if row["paper_val_ppl"] is not None]
    if with_paper:
        twin = ax.twinx()
        paper_ppl = [rows[i]["paper_val_ppl"] for i in with_paper]
        twin.plot(with_paper, paper_ppl, "s--", color="tab:orange", label="paper (mf-tiny, 8k steps)")
        twin.set_ylabel("validation PPL (paper)", color="tab:orange")
        fig.legend(loc="outside upper right", ncols=2, fontsize="small")
    elif done:
        ax.legend()
    ax.set_title(f"Table {paper.table}: validation PPL vs {paper.label}", loc="left")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=150)
    return Path(path)


def aggregate_sweep(
    sweep_dir: str | os.PathLike, output_dir: str | os.PathLike | None = None, sweep: str | None = None
) -> dict[str, Any]:
    """Read a sweep's run directories and write ``table<N>_<sweep>.{md,csv,png}`` into ``output_dir``.

    ``sweep`` (tau_k, lr, expand_bits or gelu) defaults to the name recorded in the runs' configs; ``output_dir``
    to ``sweep_dir``. Returns the written paths, the rows and the runs (check ``status`` for failures).
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
    rows = sweep_rows(runs, paper)
    out = Path(output_dir if output_dir is not None else sweep_dir)
    stem = f"table{paper.table}_{sweep}"
    paths = {
        "markdown": write_text_atomic(out / f"{stem}.md", sweep_markdown(rows, paper, runs)),
        "csv": write_csv_atomic(out / f"{stem}.csv", rows, COLUMNS),
        "plot": plot_sweep(rows, paper, out / f"{stem}.png"),
    }
    return {"paths": paths, "rows": rows, "runs": runs}
