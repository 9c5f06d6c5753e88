"""The paper's six zero-shot tasks as lm-eval tasks that read local JSON Lines files (spec §6).

Each task is lm-eval 0.4.13's own built-in task: its YAML is loaded from the installed ``lm_eval/tasks`` package
(prompts, choices, targets, metrics and ``!function`` helpers included) and only the dataset source is replaced,
so the requests and scores are exactly the harness's. The source becomes ``datasets``' ``json`` builder over one
file per evaluated split under the eval data directory (``../shared/data/eval`` by default, see its SOURCES.md);
every other split is set to null because lm-eval builds its few-shot sampler from the training split even
zero-shot, and a declared split without a file fails.

The task names are lm-eval's. No name collides with the built-ins because the built-in index is never loaded:
configs are passed to ``TaskManager(include_defaults=False)`` as dicts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lm_eval.api.task import Task


@dataclass(frozen=True)
class LocalTask:
    """Where one task's built-in config and local data live, and how many documents lm-eval evaluates."""

    builtin_yaml: str  # relative to the installed lm_eval/tasks directory
    split: str  # the split lm-eval evaluates (its test_split if the YAML sets one, else validation_split)
    data_file: str  # relative to the eval data directory
    num_docs: int


# Table 1's column order. File names and counts: ../shared/data/SOURCES.md §1.
TASKS: dict[str, LocalTask] = {
    "piqa": LocalTask("piqa/piqa.yaml", "validation", "piqa/validation.jsonl", 1838),
    "winogrande": LocalTask("winogrande/default.yaml", "validation", "winogrande_xl/validation.jsonl", 1267),
    "wsc": LocalTask("super_glue/wsc/default.yaml", "validation", "wsc/validation.jsonl", 104),  # wsc.fixed
    "arc_easy": LocalTask("arc/arc_easy.yaml", "test", "arc_easy/test.jsonl", 2376),
    "arc_challenge": LocalTask("arc/arc_challenge.yaml", "test", "arc_challenge/test.jsonl", 1172),
    "logiqa": LocalTask("logiqa/logiqa.yaml", "test", "logiqa/test.jsonl", 651),
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


def task_data_file(name: str, data_dir: str | os.PathLike) -> Path:
    """The local file of task ``name``'s evaluated split, or a clear error if it is missing."""
    path = Path(data_dir).expanduser().resolve() / TASKS[name].data_file
    if not path.is_file():
        raise FileNotFoundError(
            f"task {name!r} needs {path}, which does not exist; point `eval.data_dir` (or data_dir=) at the "
            f"directory holding the eval JSON Lines files (../shared/data/eval, see ../shared/data/SOURCES.md)"
        )
    return path


def task_config(name: str, data_dir: str | os.PathLike) -> dict[str, Any]:
    """lm-eval's built-in config of task ``name`` with only its dataset source replaced by the local file."""
    from lm_eval.tasks._yaml_loader import load_yaml

    check_task_names([name])
    task = TASKS[name]
    config = load_yaml(builtin_task_yaml(name), resolve_func=True)  # follows `include:`, imports !function
    config.update({key: None for key in _SPLIT_KEYS.values()})
    config.update(
        {
            _SPLIT_KEYS[task.split]: task.split,
            "dataset_path": "json",
            "dataset_name": None,
            # An absolute path: `datasets` resolves relative data_files against the current directory.
            "dataset_kwargs": {"data_files": {task.split: str(task_data_file(name, data_dir))}},
        }
    )
    return config


def load_tasks(names: list[str] | tuple[str, ...], data_dir: str | os.PathLike) -> dict[str, Task]:
    """Build the lm-eval tasks ``names`` (in that order) from the local files, checking each file's size.

    A file with another number of documents than the published split (SOURCES.md) would give scores that are
    not comparable to anyone's, so it is an error rather than a warning; use ``limit`` for a quick run.
    """
    from lm_eval.tasks import TaskManager

    names = check_task_names(names)
    configs = [task_config(name, data_dir) for name in names]  # every missing file fails before any loading
    tasks = TaskManager(include_defaults=False).load(configs)["tasks"]
    for name in names:
        found, expected = len(tasks[name].eval_docs), TASKS[name].num_docs
        if found != expected:
            raise ValueError(
                f"task {name!r}: {task_data_file(name, data_dir)} holds {found} documents, the published "
                f"{TASKS[name].split} split has {expected}; use the files described in ../shared/data/SOURCES.md"
            )
    return {name: tasks[name] for name in names}
