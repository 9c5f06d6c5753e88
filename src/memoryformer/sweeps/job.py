"""The Hydra task of a sweep: in a multirun each run directory carries its seed, and a failed run is recorded in
its run directory while the sweep goes on."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from memoryformer.reporting import write_text_atomic

log = logging.getLogger(__name__)

FAILED_FILE = "FAILED"  # JSON: error, traceback, Hydra overrides and the swept value of a run that raised
SEED_SUFFIX = re.compile(r"-seed(-?\d+)$")


def configuration_name(run_name: str) -> str:
    """A run name without its ``-seed<N>`` suffix: ``e2-seed1234`` → ``e2``."""
    return SEED_SUFFIX.sub("", run_name)


def seed_run_name(configuration: str, seed: int) -> str:
    """The run name of one seed of a configuration: ``e2``, 1234 → ``e2-seed1234``."""
    return f"{configuration}-seed{seed}"


def name_seeded_run(cfg: DictConfig) -> None:
    """Give a multirun's run its seed (issue 13): ``train.run_name`` gets ``-seed<seed>`` unless it ends so already
    (as the sweeps' names do), and a run with no W&B group joins the group of its configuration's seeds. So
    ``pretrain.py -m seed=1,2,3`` writes three run directories, not one, and W&B draws them as one band."""
    if not SEED_SUFFIX.search(cfg.train.run_name):
        cfg.train.run_name = seed_run_name(cfg.train.run_name, cfg.seed)
    if cfg.train.wandb.group is None:
        cfg.train.wandb.group = configuration_name(cfg.train.run_name)


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


def swept_values(overrides: Sequence[str], key: str) -> list[Any] | None:
    """The values a command-line sweep ``key=a,b,c`` gives ``key`` (e.g. the seeds of ``seed=1,2,3``), else None."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if override.key_or_group == key and override.is_sweep_override():
            return list(override.sweep_iterator())
    return None


def pretrain_job(cfg: DictConfig) -> Path | None:
    """Train one run of a Hydra job; the run directory, or ``None`` for a failed run in a multirun.

    In a multirun (``-m``), the run is named with its seed (:func:`name_seeded_run`) and an exception fails only
    its own run: it is logged, written to ``<run>/FAILED`` (JSON: error, traceback, overrides, swept value, seed)
    and the sweep continues with the next run. A run that succeeds removes a ``FAILED`` left by an earlier attempt.
    Outside a multirun the run keeps its name and the exception propagates.
    """
    from hydra.core.hydra_config import HydraConfig

    from memoryformer.train import pretrain

    if not _in_multirun():
        return pretrain(cfg)
    with contextlib.suppress(Exception):  # an unresolvable name fails in pretrain, recorded in Hydra's job dir
        name_seeded_run(cfg)
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
            "seed": OmegaConf.select(cfg, "seed"),
        }
        write_text_atomic(run_dir / FAILED_FILE, json.dumps(record, indent=2, default=str) + "\n")
        log.error("run %s failed (the sweep continues): %s\n%s", run_dir, record["error"], record["traceback"])
        return None
    (run_dir / FAILED_FILE).unlink(missing_ok=True)
    return result
