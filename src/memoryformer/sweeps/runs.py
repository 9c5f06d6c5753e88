"""Reading run directories, and grouping the seeds of one configuration.

A run directory (``<train.output_dir>/<train.run_name>``, written by :func:`memoryformer.train.pretrain`) holds
``config.yaml``, ``metrics.jsonl`` (one record per logged step; validation steps carry ``val_loss``/``val_ppl``),
``model/`` once trained, ``eval/`` once scored, and ``FAILED`` when a sweep or study recorded its failure. Sweeps
and the study name runs ``<configuration>-seed<seed>``; :func:`group_seeds` puts the seeds of one configuration
together by their configs, so that any set of run directories can be compared (``make compare``).
"""

from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from memoryformer.flops import model_flops_per_token
from memoryformer.models import model_config_from_config, parameter_count
from memoryformer.models.registry import split_model_config
from memoryformer.statistics import Estimate, estimate
from memoryformer.sweeps.job import FAILED_FILE, configuration_name

# Config keys that say where and how a run is recorded, not what it trains: two runs that differ only in these
# (and in `seed`) are seeds of one configuration.
BOOKKEEPING_KEYS = (
    "seed",
    "train.run_name",
    "train.output_dir",
    "train.resume",
    "train.tracker",
    "train.wandb",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.sample_prompt",
    "train.sample_tokens",
    "train.peak_tflops",
    "data.prepared_dir",
    "data.num_workers",
)


def trained_configuration(config: Mapping[str, Any]) -> dict[str, Any]:
    """A resolved run config without :data:`BOOKKEEPING_KEYS`: what the seeds of one configuration share."""
    trimmed = OmegaConf.create(dict(config))  # a copy: the deletions below leave ``config`` alone
    for key in BOOKKEEPING_KEYS:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(trimmed, parent) if parent else trimmed
        if node is not None and leaf in node:
            del node[leaf]
    return OmegaConf.to_container(trimmed)


@dataclass
class Run:
    """One run directory: ``done`` (trained, saved, scored if it was to be), ``failed`` or ``incomplete``."""

    name: str
    run_dir: Path
    status: str
    config: dict[str, Any] | None = None  # the run's resolved config.yaml
    validation: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl records with a validation
    error: str | None = None
    failure: dict[str, Any] = field(default_factory=dict)  # the FAILED record, if any

    @property
    def final(self) -> dict[str, Any]:
        """The last record with a validation (empty if none)."""
        return self.validation[-1] if self.validation else {}

    @property
    def seed(self) -> int | None:
        return self.config["seed"] if self.config is not None else self.failure.get("seed")

    @property
    def sweep(self) -> str | None:
        if self.config is not None:
            return (self.config.get("sweep") or {}).get("name")
        return self.failure.get("sweep")

    @property
    def value(self) -> Any:
        """The swept value of a sweep's run (``sweep.parameter`` of its config), else None."""
        if self.config is None:
            return self.failure.get("value")
        sweep = self.config.get("sweep")
        return OmegaConf.select(OmegaConf.create(self.config), sweep["parameter"]) if sweep else None

    @cached_property
    def flops_per_token(self) -> int | None:
        """Forward FLOPs per token of the run's model at its sequence length (``model_flops_per_token``)."""
        if self.config is None:
            return None
        try:
            model_config = model_config_from_config(self.config["model"])
        except ValueError:  # an invalid model: the run failed on it, and says so in `error`
            return None
        return model_flops_per_token(model_config, self.config["train"]["seq_len"])

    @cached_property
    def parameters(self) -> int | None:
        """The run's model's parameter count (on the meta device: instant at any size)."""
        if self.config is None:
            return None
        name, overrides = split_model_config(self.config["model"])
        try:
            return parameter_count(name, **overrides)
        except ValueError:  # an invalid model: the run failed on it, and says so in `error`
            return None

    def training_flops(self, tokens: float) -> float | None:
        """Training FLOPs after ``tokens`` tokens: forward + backward ≈ 3 × forward (the trainer's convention)."""
        return None if self.flops_per_token is None else 3 * self.flops_per_token * tokens

    @cached_property
    def avg_acc(self) -> tuple[float | None, int | None]:
        """(average zero-shot accuracy, documents per task or None for all) of ``<run>/eval``, if scored."""
        if not (self.run_dir / "eval" / "results.json").is_file():
            return None, None
        from memoryformer.evaluation import read_results  # only for scored runs: it imports lm-eval's stack

        results = read_results(self.run_dir / "eval")
        return results["summary"].get("avg/acc"), results["model_info"]["limit"]


def _validation_records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [record for record in records if "val_loss" in record]


def _finished(run_dir: Path, config: Mapping[str, Any], final: Mapping[str, Any]) -> bool:
    """Trained to the last step and saved, and zero-shot scored if the run was to be (``train.eval_at_end``)."""
    trained = final.get("step") == config["train"]["max_steps"] and (run_dir / "model").is_dir()
    return trained and (not config["train"]["eval_at_end"] or (run_dir / "eval" / "results.json").is_file())


def read_run(run_dir: str | os.PathLike) -> Run:
    """The state of one run directory."""
    run_dir = Path(run_dir)
    run = Run(run_dir.name, run_dir, "incomplete", validation=_validation_records(run_dir))
    if (run_dir / "config.yaml").is_file():
        run.config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    if (run_dir / FAILED_FILE).is_file():
        run.failure = json.loads((run_dir / FAILED_FILE).read_text())
        run.status, run.error = "failed", run.failure["error"]
    elif run.config is not None and _finished(run_dir, run.config, run.final):
        run.status = "done"
        if not math.isfinite(run.final["val_loss"]):  # a diverged run finished, but it has no number to average
            run.status, run.error = "failed", f"diverged: final val_loss {run.final['val_loss']}"
    return run


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "config.yaml").is_file() or (path / FAILED_FILE).is_file())


def collect_runs(directory: str | os.PathLike) -> list[Run]:
    """Every run directory directly inside ``directory`` (one holding ``config.yaml`` or ``FAILED``), by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no directory {directory}; train its runs first (make sweep / make study)")
    runs = [read_run(child) for child in sorted(directory.iterdir()) if is_run_dir(child)]
    if not runs:
        raise FileNotFoundError(f"{directory} holds no run directories (no */config.yaml or */{FAILED_FILE})")
    return runs


def expand_run_paths(patterns: Iterable[str]) -> list[Path]:
    """Run directories named by paths or globs, in the order given; a pattern matching no run is an error."""
    paths: list[Path] = []
    for pattern in patterns:
        matches = (
            sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern)))
            if glob.has_magic(pattern)
            else [Path(pattern)]
        )
        found = [path for path in matches if is_run_dir(path)]
        if not found:
            raise FileNotFoundError(
                f"{pattern!r} names no run directory (a directory with config.yaml or {FAILED_FILE}); give run "
                f"directories or globs such as 'runs/study/cpu/mf-nano-seed*'"
            )
        paths += [path for path in found if path not in paths]
    return paths


@dataclass
class Configuration:
    """The seeds of one configuration: finished ones are averaged, the others listed, never averaged."""

    label: str
    runs: list[Run]
    expected_seeds: list[int] = field(default_factory=list)  # seeds that should exist (sweep/study), if known

    @property
    def done(self) -> list[Run]:
        return [run for run in self.runs if run.status == "done"]

    @property
    def not_done(self) -> list[Run]:
        return [run for run in self.runs if run.status != "done"]

    @property
    def missing_seeds(self) -> list[int]:
        """Expected seeds with no run directory at all (never started)."""
        present = {run.seed for run in self.runs}
        return [seed for seed in self.expected_seeds if seed not in present]

    @property
    def unfinished(self) -> list[str]:
        """Every seed not averaged in, with why: ``e2-seed3 (failed: ValueError ...)``, ``seed 4 (not started)``."""
        listed = [f"{run.name} ({run.status}" + (f": {run.error})" if run.error else ")") for run in self.not_done]
        return listed + [f"seed {seed} (not started)" for seed in self.missing_seeds]

    @property
    def example(self) -> Run | None:
        """A run that shows the configuration's settings: a finished one if any; None before any run started (a
        study stopped before it reached this configuration)."""
        return next(iter(self.done or [run for run in self.runs if run.config is not None] or self.runs), None)

    def final(self, key: str = "val_loss") -> Estimate | None:
        """The estimate of the final ``key`` over finished seeds; None if no seed finished."""
        values = [run.final[key] for run in self.done if run.final.get(key) is not None]
        return estimate(values) if values else None

    def final_acc(self) -> Estimate | None:
        values = [run.avg_acc[0] for run in self.done if run.avg_acc[0] is not None]
        return estimate(values) if values else None

    def curve(self, key: str = "val_loss") -> list[tuple[int, int, Estimate]]:
        """(step, tokens, estimate over finished seeds) at each validation step that every finished seed logged."""
        by_step: dict[int, list[dict[str, Any]]] = {}
        for run in self.done:
            for record in run.validation:
                by_step.setdefault(record["step"], []).append(record)
        return [
            (step, records[0]["tokens"], estimate(record[key] for record in records))
            for step, records in sorted(by_step.items())
            if len(records) == len(self.done)
        ]


def group_seeds(runs: Sequence[Run]) -> list[Configuration]:
    """The runs grouped into configurations (same trained config, any seed), in order of first appearance.

    A run that failed before writing its config joins the configuration of its name (``<name>-seed<N>``) in the
    same directory, or stands alone. Configurations that share a name but not a directory are told apart by it.
    """
    groups: dict[str, Configuration] = {}
    for run in runs:
        if run.config is None:
            continue
        key = json.dumps(trained_configuration(run.config), sort_keys=True, default=str)
        group = groups.setdefault(key, Configuration(configuration_name(run.name), []))
        if configuration_name(run.name) not in group.label.split("+"):
            group.label += "+" + configuration_name(run.name)  # one config under two names: show both
        group.runs.append(run)
    for run in runs:
        if run.config is not None:
            continue
        label, parent = configuration_name(run.name), run.run_dir.parent
        match = [g for g in groups.values() if g.label == label and g.runs[0].run_dir.parent == parent]
        (match[0] if match else groups.setdefault(f"{parent}/{label}", Configuration(label, []))).runs.append(run)
    position = {id(run): i for i, run in enumerate(runs)}
    ordered = sorted(groups.values(), key=lambda group: min(position[id(run)] for run in group.runs))
    labels = [group.label for group in ordered]
    for group in ordered:
        if labels.count(group.label) > 1:
            group.label = f"{group.runs[0].run_dir.parent.name}/{group.label}"
    return ordered
