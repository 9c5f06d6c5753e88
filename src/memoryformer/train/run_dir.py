"""The run directory's safety rules (issue 12 items 2, 3): one writer at a time, no silent mixing of runs.

- A lock beside the run directory (``<output_dir>/.<run_name>.lock``, :func:`memoryformer.locks.exclusive`) is
  held by the main process for the whole run; a second run into the same directory is refused at once, naming
  the holder. It sits beside the directory, not in it, so moving the run aside does not move the lock.
- ``train.resume=never`` into a directory that already holds a run is refused unless ``train.overwrite=true``,
  which renames the old run to ``<run>.old-<UTC time>`` (one atomic rename) before anything is written.
- ``run.json`` gives the run an id when it starts afresh; checkpoints record it, so another run's checkpoints
  are never resumed from.
- Every start (fresh or resumed) keeps its config as ``config_history/<UTC time>-step-N.yaml`` (never
  overwritten); ``config.yaml`` is the current one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from memoryformer.locks import exclusive
from memoryformer.reporting import write_text_atomic

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
HISTORY_DIR = "config_history"


class RunDirectoryError(RuntimeError):
    """A run directory that this run may not use as asked (another run's, or in use)."""


def lock_path(run_dir: Path) -> Path:
    return run_dir.with_name(f".{run_dir.name}.lock")


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[Path]:
    """Hold the run directory's lock, or raise :class:`memoryformer.locks.LockHeldError` naming its holder."""
    hint = f"another training run is writing {run_dir}: wait for it, stop it, or choose another train.run_name"
    with exclusive(lock_path(run_dir), blocking=False, hint=hint) as path:
        yield path


def _utc_stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "model")  # what a run that trained at least one step leaves


def holds_a_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run's outputs (an attempt that failed before training holds none)."""
    return any((run_dir / name).exists() for name in RUN_OUTPUTS)


def prepare_run_dir(run_dir: Path, resume: str, overwrite: bool) -> str:
    """Make ``run_dir`` ready for this run (main process, under the lock); returns the run id.

    A directory without a run's outputs (:func:`holds_a_run`) starts a new run. ``resume=never`` on one with
    outputs is refused unless ``overwrite``, which moves it aside first.
    """
    if resume == "never" and holds_a_run(run_dir):
        if not overwrite:
            held = ", ".join(sorted(p.name for p in run_dir.iterdir())[:6])
            raise RunDirectoryError(
                f"train.resume=never, but {run_dir} already holds a run ({held}). "
                f"Add train.overwrite=true to move it aside and start afresh, use train.resume=auto to continue it, "
                f"or choose another train.run_name"
            )
        aside = run_dir.with_name(f"{run_dir.name}.old-{_utc_stamp()}")
        run_dir.rename(aside)
        log.warning("moved the previous run in %s aside to %s (train.overwrite=true)", run_dir, aside)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_file = run_dir / RUN_FILE
    if run_file.is_file():
        return json.loads(run_file.read_text())["run_id"]
    run_id = uuid.uuid4().hex[:12]
    write_text_atomic(run_file, json.dumps({"run_id": run_id, "created": _utc_stamp()}) + "\n")
    return run_id


def read_run_id(run_dir: Path) -> str:
    return json.loads((run_dir / RUN_FILE).read_text())["run_id"]


def record_config(run_dir: Path, cfg: DictConfig, start_step: int, note: str = "") -> Path:
    """Write ``config.yaml`` (current) and a new ``config_history/`` entry for this start; returns the entry."""
    text = OmegaConf.to_yaml(cfg, resolve=True)
    write_text_atomic(run_dir / CONFIG_FILE, text)
    history = run_dir / HISTORY_DIR
    history.mkdir(exist_ok=True)
    header = f"# started at step {start_step}{'; ' + note if note else ''}\n"
    for attempt in range(100):  # never overwrite: a second start within the same second gets a suffix
        entry = history / f"{_utc_stamp()}-step-{start_step:08d}{f'-{attempt}' if attempt else ''}.yaml"
        try:
            with entry.open("x", encoding="utf-8") as f:
                f.write(header + text)
            return entry
        except FileExistsError:
            continue
    raise RunDirectoryError(f"could not create a new config history entry in {history}")
