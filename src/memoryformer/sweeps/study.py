"""The small-scale reproduction study (issue 13): fixed comparisons, several seeds each, resumable run by run.

A study is a preset in ``conf/study/<name>.yaml`` (plain YAML, see ``cpu.yaml``): a training ``recipe`` (Hydra
overrides of ``conf/config.yaml`` shared by every run: the same tokens and the same recipe), named
``configurations`` (the overrides that make each one), the ``seeds`` every configuration is trained with, and the
``comparisons`` the report makes between configurations. :func:`run_study` trains every (configuration, seed) that
is not finished yet, one ``scripts/pretrain.py`` process after another, seed by seed (all configurations of the
first seed, then the second …, so a study stopped half-way still compares like with like). A finished run is
skipped, an interrupted one resumes from its last checkpoint (``train.resume=auto``), a failed one is recorded in
``<run>/FAILED`` and retried by the next invocation. Every attempt is appended to ``<output_dir>/ledger.jsonl``
(wall time, exit status, commit, machine, command). :func:`write_study_report` writes the report — markdown, CSV
and the learning curves, with the command, commits, machine and wall time — from whatever has finished.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from memoryformer.config import CONF_DIR, check_run_inputs, compose_config, register_resolvers
from memoryformer.paths import PROJECT_ROOT
from memoryformer.reporting import markdown_table, plot_learning_curves, write_csv_atomic, write_text_atomic
from memoryformer.sweeps.compare import LEGEND, STAT_COLUMNS, comparison_markdown, learning_curves, statistics_rows
from memoryformer.sweeps.job import FAILED_FILE, seed_run_name
from memoryformer.sweeps.runs import Configuration, read_run, trained_configuration

LEDGER_FILE = "ledger.jsonl"
PRETRAIN_SCRIPT = PROJECT_ROOT / "scripts" / "pretrain.py"


class StudyError(ValueError):
    """A study preset or run directory that cannot be used as it is; the message says what to change."""


# --- the preset ------------------------------------------------------------------------------------------------


def load_study(preset: str | os.PathLike, overrides: Sequence[str] = ()) -> DictConfig:
    """The study preset ``conf/study/<preset>.yaml`` (or a YAML path) with ``key=value`` overrides, checked."""
    path = Path(preset)
    if path.suffix not in (".yaml", ".yml"):
        path = CONF_DIR / "study" / f"{preset}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in (CONF_DIR / "study").glob("*.yaml"))
        raise StudyError(f"no study preset {preset!r} ({path}); the presets are {choices}, or give a YAML path")
    register_resolvers()  # ${project_root:...} in output_dir / report_dir
    study = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
    missing = [key for key in ("name", "seeds", "recipe", "configurations", "comparisons") if key not in study]
    if missing:
        raise StudyError(f"study preset {path} lacks {missing}; see conf/study/cpu.yaml for the layout")
    if not study.seeds or len(set(study.seeds)) != len(study.seeds):
        raise StudyError(f"study {study.name}: seeds must be a non-empty list of distinct integers, got {study.seeds}")
    for name, comparison in study.comparisons.items():
        unknown = [c for c in comparison.configurations if c not in study.configurations]
        if unknown:
            raise StudyError(
                f"study {study.name}: comparison {name!r} names unknown configurations {unknown}; "
                f"the preset defines {list(study.configurations)}"
            )
    return study


@dataclass(frozen=True)
class PlannedRun:
    """One training of a study: a configuration at a seed, and the ``scripts/pretrain.py`` overrides that make it."""

    configuration: str
    seed: int
    overrides: tuple[str, ...]
    run_dir: Path

    @property
    def name(self) -> str:
        return self.run_dir.name


def plan_study(study: DictConfig, extra_overrides: Sequence[str] = ()) -> list[PlannedRun]:
    """Every run of the study, seed by seed; ``extra_overrides`` go to every run after the preset's own."""
    output_dir = Path(study.output_dir)
    runs = []
    for seed in study.seeds:
        for name, configuration_overrides in study.configurations.items():
            run_name = seed_run_name(name, seed)
            overrides = (
                *study.recipe,
                *configuration_overrides,
                *extra_overrides,
                f"seed={seed}",
                f"train.output_dir={output_dir}",
                f"train.run_name={run_name}",
                f"train.wandb.group=study-{study.name}-{name}",  # one W&B group per configuration, seeds as runs
                "train.resume=auto",
                f"hydra.run.dir={output_dir / run_name}",  # Hydra's .hydra/ and pretrain.log beside the run
            )
            runs.append(PlannedRun(name, seed, overrides, output_dir / run_name))
    return runs


def check_run_dir(planned: PlannedRun) -> str:
    """``done``, ``failed``, ``incomplete`` or ``new``; raises when the directory holds a different training."""
    if not planned.run_dir.exists():
        return "new"
    run = read_run(planned.run_dir)
    if run.config is not None:
        intended = OmegaConf.to_container(compose_config(list(planned.overrides)), resolve=True)
        wanted = trained_configuration(intended) | {"seed": planned.seed}
        found = trained_configuration(run.config) | {"seed": run.config["seed"]}
        if wanted != found:
            differing = sorted(_differences(wanted, found))
            raise StudyError(
                f"{planned.run_dir} was trained with other settings than the study now asks for "
                f"(differing: {', '.join(differing)}); move it away, or give the study another output_dir"
            )
    return run.status


def _differences(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = set(a) | set(b)
    out = []
    for key in keys:
        x, y = a.get(key), b.get(key)
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            out += _differences(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key}: {y!r} → {x!r}")
    return out


def check_study_inputs(study: DictConfig, extra_overrides: Sequence[str] = ()) -> None:
    """Before any run starts: the inputs of every configuration resolve, or the one
    :class:`~memoryformer.sources.MissingInputError` a run would stop with. Every run of a configuration reads the
    same inputs, so a missing one would otherwise fail all of them alike, one process after another."""
    for planned in {run.configuration: run for run in plan_study(study, extra_overrides)}.values():
        check_run_inputs(compose_config(list(planned.overrides)))


# --- running it ----------------------------------------------------------------------------------------------


def git_commit() -> str:
    """The checked-out commit, ``+dirty`` when tracked files have uncommitted changes; ``unknown`` outside git."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True).stdout

    try:
        commit = git("rev-parse", "--short=12", "HEAD").strip()
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no").strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict[str, Any]:
    """What the wall times were measured on: host, CPU model and cores, GPUs, Python and torch."""
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpus": gpus,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def launch_pretrain(launcher: Sequence[str], overrides: Sequence[str]) -> int:
    """Run ``<launcher> scripts/pretrain.py <overrides>`` in its own process (GPU presets launch with Accelerate);
    returns its exit status. Ctrl-C reaches the child too, and propagates here as KeyboardInterrupt."""
    return subprocess.run([*launcher, str(PRETRAIN_SCRIPT), *overrides], cwd=PROJECT_ROOT).returncode


def _append_ledger(path: Path, record: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:  # one line per attempt, appended: a crash loses at most the attempt being written
        f.write(json.dumps(record, default=str) + "\n")


def read_ledger(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(output_dir) / LEDGER_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_study(
    study: DictConfig,
    extra_overrides: Sequence[str] = (),
    max_runs: int | None = None,
    command: str = "",
    launch: Callable[[Sequence[str], Sequence[str]], int] = launch_pretrain,
) -> dict[str, list[str]]:
    """Train every unfinished run of the study in plan order; at most ``max_runs`` trainings in this invocation.

    Returns the run names by outcome: ``skipped`` (already finished), ``trained``, ``failed``, ``left`` (not
    reached because of ``max_runs``). Preset/run-directory mismatches are found before anything trains.
    """
    plan = plan_study(study, extra_overrides)
    states = {planned.name: check_run_dir(planned) for planned in plan}  # every mismatch before any training
    launcher = shlex.split(study.launcher) if study.get("launcher") else [sys.executable]
    ledger, host = Path(study.output_dir) / LEDGER_FILE, machine()
    outcome: dict[str, list[str]] = {"skipped": [], "trained": [], "failed": [], "left": []}
    for planned in plan:
        if states[planned.name] == "done":
            outcome["skipped"].append(planned.name)
            continue
        if max_runs is not None and len(outcome["trained"]) + len(outcome["failed"]) >= max_runs:
            outcome["left"].append(planned.name)
            continue
        (planned.run_dir / FAILED_FILE).unlink(missing_ok=True)  # a retry: its old failure no longer stands
        record = {
            "run": planned.name,
            "configuration": planned.configuration,
            "seed": planned.seed,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "resumed": states[planned.name] != "new",
            "commit": git_commit(),  # per run: the checkout may move while a long study runs
            "machine": host,
            "load_average": [round(x, 2) for x in os.getloadavg()],  # other jobs on the machine slow a run down
            "study_command": command,
            "command": shlex.join([*launcher, str(PRETRAIN_SCRIPT.relative_to(PROJECT_ROOT)), *planned.overrides]),
        }
        tick = time.perf_counter()
        try:
            returncode = launch(launcher, planned.overrides)
        except KeyboardInterrupt:
            _append_ledger(ledger, record | {"seconds": time.perf_counter() - tick, "status": "interrupted"})
            raise
        status = "done" if returncode == 0 and read_run(planned.run_dir).status == "done" else "failed"
        _append_ledger(ledger, record | {"seconds": time.perf_counter() - tick, "status": status, "exit": returncode})
        if status == "failed":
            error = (
                f"scripts/pretrain.py exited with status {returncode}"
                if returncode
                else f"scripts/pretrain.py exited normally but left the run {read_run(planned.run_dir).status}"
            ) + f" (log: {planned.run_dir / 'pretrain.log'})"
            write_text_atomic(planned.run_dir / FAILED_FILE, json.dumps({"error": error, "seed": planned.seed}) + "\n")
        outcome["trained" if status == "done" else "failed"].append(planned.name)
    return outcome


# --- the report ----------------------------------------------------------------------------------------------

RUN_COLUMNS = ["run", "configuration", "seed", "status", "steps", "tokens", "val_loss", "val_ppl", "seconds", "commit"]


def study_configurations(study: DictConfig, extra_overrides: Sequence[str] = ()) -> dict[str, Configuration]:
    """Each configuration of the study with the runs that exist so far; every seed of the preset is expected."""
    configurations = {name: Configuration(name, [], list(study.seeds)) for name in study.configurations}
    for planned in plan_study(study, extra_overrides):
        if planned.run_dir.exists():
            configurations[planned.configuration].runs.append(read_run(planned.run_dir))
    return configurations


def _describe(host: Mapping[str, Any]) -> str:
    gpus = f", {len(host['gpus'])} × {host['gpus'][0]}" if host["gpus"] else ", no GPU"
    return f"{host['cpu']} ({host['cores']} cores{gpus}), Python {host['python']}, torch {host['torch']}"


def _wall_time(ledger: Sequence[Mapping[str, Any]]) -> str:
    if not ledger:
        return "—"
    seconds = sum(record["seconds"] for record in ledger)
    first, last = min(r["started"] for r in ledger), max(r["started"] for r in ledger)
    return f"{seconds / 60:.1f} min in {len(ledger)} training process(es), started {first} … {last}"


def write_study_report(
    study: DictConfig, command: str, extra_overrides: Sequence[str] = (), report_dir: str | os.PathLike | None = None
) -> dict[str, Any]:
    """``study.md``, ``study.csv`` (a row per configuration and comparison), ``runs.csv`` and ``curves.png``."""
    out = Path(report_dir if report_dir is not None else study.report_dir)
    configurations = study_configurations(study, extra_overrides)
    ledger = read_ledger(study.output_dir)
    seconds_by_run: dict[str, float] = {}
    for record in ledger:
        seconds_by_run[record["run"]] = seconds_by_run.get(record["run"], 0.0) + record["seconds"]
    commits = sorted({record["commit"] for record in ledger}) or [git_commit()]
    machines = sorted({_describe(record["machine"]) for record in ledger})
    loads = [record["load_average"][0] for record in ledger]
    other_commands = sorted({record["study_command"] for record in ledger} - {command, ""})

    sections, csv_rows, panels = [], [], []
    for key, comparison in study.comparisons.items():
        group = [configurations[name] for name in comparison.configurations]
        rows = statistics_rows(group)
        csv_rows += [{"comparison": key} | row for row in rows]
        sections.append(f"## {comparison.title}\n\n" + comparison_markdown(rows, [comparison.get("paper") or ""]))
        panels.append((comparison.title, learning_curves(group)))

    run_rows = []
    for configuration in configurations.values():
        for run in configuration.runs:
            run_rows.append(
                {
                    "run": run.name,
                    "configuration": configuration.label,
                    "seed": run.seed,
                    "status": run.status,
                    "steps": run.final.get("step"),
                    "tokens": run.final.get("tokens"),
                    "val_loss": run.final.get("val_loss"),
                    "val_ppl": run.final.get("val_ppl"),
                    "seconds": seconds_by_run.get(run.name),
                    "commit": ", ".join(sorted({r["commit"] for r in ledger if r["run"] == run.name})) or None,
                }
            )
    expected = len(study.seeds) * len(study.configurations)
    finished = sum(row["status"] == "done" for row in run_rows)
    header = [
        f"# {study.title}\n",
        *([study.description.strip() + "\n"] if study.get("description") else []),
        f"- **Command**: `{command}` (resumable: the same command continues with the next unfinished run)"
        + "".join(f"; runs also trained by `{other}`" for other in other_commands),
        f"- **Runs**: {finished} of {expected} finished ({len(study.configurations)} configurations × seeds "
        f"{', '.join(map(str, study.seeds))}; the seed sets both the model init and the data order)",
        f"- **Commit(s)**: {', '.join(commits)}",
        "- **Machine**: " + ("; ".join(machines) if machines else "no run recorded yet"),
        "- **Load average** when runs started (1 min): "
        + (f"{min(loads):.1f}–{max(loads):.1f}" if loads else "—")
        + " (other jobs on the machine slow every run down)",
        f"- **Wall time**: {_wall_time(ledger)}; report written "
        + datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "- **Recipe** (every run): `"
        + " ".join(study.recipe)
        + (" " + " ".join(extra_overrides) if extra_overrides else "")
        + "`",
        "- **Configurations**: "
        + "; ".join(f"{name}: `{' '.join(overrides)}`" for name, overrides in study.configurations.items()),
        "",
        LEGEND + "\n",
    ]
    runs_table = markdown_table(run_rows, RUN_COLUMNS, {"val_loss": ".4f", "val_ppl": ".1f", "seconds": ".0f"})
    markdown = "\n".join(header) + "\n" + "\n".join(sections) + "\n![learning curves](curves.png)\n\n## Runs\n\n"
    paths = {
        "markdown": write_text_atomic(out / "study.md", markdown + runs_table),
        "csv": write_csv_atomic(out / "study.csv", csv_rows, ["comparison", *STAT_COLUMNS]),
        "runs": write_csv_atomic(out / "runs.csv", run_rows, RUN_COLUMNS),
        "plot": plot_learning_curves(panels, out / "curves.png"),
    }
    return {"paths": paths, "rows": csv_rows, "runs": run_rows, "finished": finished, "expected": expected}
