"""The paper's six zero-shot tasks as lm-eval tasks, read from local JSON Lines files or from the hub (spec §6).

Each task is lm-eval 0.4.13's own built-in task: its YAML is loaded from the installed ``lm_eval/tasks`` package
(prompts, choices, targets, metrics and ``!function`` helpers included). Where a task's data resolves to a local
file (:mod:`memoryformer.sources`: ``eval.data_dir``, then ``$MEMORYFORMER_DATA`` or ``../shared/data``, then
``data/cache/``), only the dataset source is replaced: ``datasets``' ``json`` builder over one file per evaluated
split, every other split set to null (lm-eval builds its few-shot sampler from the training split even zero-shot,
and a declared split without a file fails). With no local file and the hub reachable, the built-in task runs
unchanged and reads its own ``dataset_path``. Either way the requests and scores are exactly the harness's.

The task names are lm-eval's. No name collides with the built-ins because the built-in index is never loaded:
configs are passed to ``TaskManager(include_defaults=False)`` as dicts. For lm-eval's own CLI,
:func:`write_task_yamls` writes the same local configs as YAML files for ``--include_path``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memoryformer.reporting import write_text_atomic
from memoryformer.sources import MissingInputError, Resolved, get_input, resolve_all

if TYPE_CHECKING:
    from lm_eval.api.task import Task


@dataclass(frozen=True)
class LocalTask:
    """Where one task's built-in config and local data live, and how many documents lm-eval evaluates."""

    builtin_yaml: str  # relative to the installed lm_eval/tasks directory
    split: str  # the split lm-eval evaluates (its test_split if the YAML sets one, else validation_split)
    data_file: str  # relative to an eval data directory (the catalogue's layout below a data root's eval/)
    num_docs: int


def _task(name: str, builtin_yaml: str) -> LocalTask:
    hub = get_input(f"eval/{name}").hub  # split, file and size: the catalogue of inputs
    return LocalTask(builtin_yaml, hub.split, get_input(f"eval/{name}").local.removeprefix("eval/"), hub.rows)


# Table 1's column order. File names and counts: ../shared/data/SOURCES.md §1.
TASKS: dict[str, LocalTask] = {
    "piqa": _task("piqa", "piqa/piqa.yaml"),
    "winogrande": _task("winogrande", "winogrande/default.yaml"),
    "wsc": _task("wsc", "super_glue/wsc/default.yaml"),  # wsc.fixed
    "arc_easy": _task("arc_easy", "arc/arc_easy.yaml"),
    "arc_challenge": _task("arc_challenge", "arc/arc_challenge.yaml"),
    "logiqa": _task("logiqa", "logiqa/logiqa.yaml"),
}
PAPER_TASKS: tuple[str, ...] = tuple(TASKS)

_SPLIT_KEYS = {"train": "training_split", "validation": "validation_split", "test": "test_split"}


def check_task_names(names: list[str] | tuple[str, ...]) -> list[str]:
    """``names`` as a list, or a clear error for an empty list, a duplicate or a name that is not a local task."""
    names = list(names)
    if not names:
        raise ValueError(f"no tasks given; choose from {list(TASKS)}")
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; the local tasks are {list(TASKS)}")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"task(s) {duplicates} given more than once")
    return names


def builtin_task_yaml(name: str) -> Path:
    """The installed lm-eval YAML that defines task ``name``."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent / TASKS[name].builtin_yaml


def resolve_tasks(names: list[str] | tuple[str, ...], data_dir: str | os.PathLike | None = None) -> dict[str, Resolved]:
    """Where each task's data is (a local file, or the hub for lm-eval's built-in task), or one clear error.

    ``data_dir`` (the config value ``eval.data_dir``) is looked in first, then the catalogue's local copies, then
    the hub unless offline (:func:`memoryformer.sources.resolve`).
    """
    names = check_task_names(names)
    explicit = [None if data_dir is None else Path(data_dir).expanduser() / TASKS[n].data_file for n in names]
    resolved = resolve_all([f"eval/{n}" for n in names], explicit)
    return {name: resolved[f"eval/{name}"] for name in names}


def check_eval_inputs(eval_cfg: Mapping[str, Any]) -> dict[str, Resolved]:
    """For start-up checks (the trainer's ``eval_at_end``): the tasks of ``eval_cfg`` (``conf/eval``) resolve.

    Raises :class:`~memoryformer.sources.MissingInputError` naming every way out, before any training.
    """
    return resolve_tasks(list(eval_cfg["tasks"]), eval_cfg.get("data_dir"))


def local_overrides(name: str, data_file: str | os.PathLike) -> dict[str, Any]:
    """What replaces the built-in task's dataset source to read ``data_file``: the only keys that differ."""
    task = TASKS[name]
    overrides: dict[str, Any] = dict.fromkeys(_SPLIT_KEYS.values())
    overrides.update(
        {
            _SPLIT_KEYS[task.split]: task.split,
            "dataset_path": "json",
            "dataset_name": None,
            # An absolute path: `datasets` resolves relative data_files against the current directory.
            "dataset_kwargs": {"data_files": {task.split: str(Path(data_file).resolve())}},
        }
    )
    return overrides


def task_config(name: str, data_dir: str | os.PathLike | None = None, source: Resolved | None = None) -> dict[str, Any]:
    """lm-eval's built-in config of task ``name``: unchanged for the hub, its dataset source replaced for a file."""
    from lm_eval.tasks._yaml_loader import load_yaml

    check_task_names([name])
    source = source or resolve_tasks([name], data_dir)[name]
    config = load_yaml(builtin_task_yaml(name), resolve_func=True)  # follows `include:`, imports !function
    if source.path is not None:
        config.update(local_overrides(name, source.path))
    return config


def load_tasks(
    names: list[str] | tuple[str, ...],
    data_dir: str | os.PathLike | None = None,
    sources: Mapping[str, Resolved] | None = None,
) -> dict[str, Task]:
    """Build the lm-eval tasks ``names`` (in that order), checking each evaluated split's size.

    A split with another number of documents than the published one (SOURCES.md) would give scores that are
    not comparable to anyone's, so it is an error rather than a warning; use ``limit`` for a quick run.
    """
    from lm_eval.tasks import TaskManager

    names = check_task_names(names)
    sources = sources or resolve_tasks(names, data_dir)  # every missing input fails before any loading
    configs = [task_config(name, source=sources[name]) for name in names]
    tasks = TaskManager(include_defaults=False).load(configs)["tasks"]
    for name in names:
        found, expected = len(tasks[name].eval_docs), TASKS[name].num_docs
        if found != expected:
            raise ValueError(
                f"task {name!r}: {sources[name].record()} holds {found} documents, the published "
                f"{TASKS[name].split} split has {expected}; use the files described in ../shared/data/SOURCES.md"
            )
    return {name: tasks[name] for name in names}


def write_task_yamls(
    out_dir: str | os.PathLike,
    names: list[str] | tuple[str, ...] = PAPER_TASKS,
    data_dir: str | os.PathLike | None = None,
) -> list[Path]:
    """Write one YAML per task with local data into ``out_dir``, for ``lm_eval --include_path out_dir``.

    Each file includes the installed built-in YAML and overrides only the dataset source
    (:func:`local_overrides`), under the built-in's name, so it replaces the built-in task for that CLI run.
    Generated from the resolved local files, never copied by hand; every task must resolve to a local file.
    """
    import yaml

    names = check_task_names(names)
    sources = resolve_tasks(names, data_dir)
    on_hub = [name for name in names if sources[name].path is None]
    if on_hub:
        raise MissingInputError(
            f"no local data for {on_hub}: the generated tasks read local files only. Online, lm_eval's built-in "
            f"tasks need no --include_path; offline, run `make download WHAT=eval` on a machine with internet first"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        config = {"include": str(builtin_task_yaml(name)), "task": name, **local_overrides(name, sources[name].path)}
        text = f"# Generated by `make eval-tasks` from {sources[name].record()}; do not edit.\n"
        written.append(write_text_atomic(out / f"{name}.yaml", text + yaml.safe_dump(config, sort_keys=False)))
    return written
