"""The Hydra task of a sweep: in a multirun a failed run is recorded in its run directory and the sweep goes on."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from memoryformer.reporting import write_text_atomic

log = logging.getLogger(__name__)

FAILED_FILE = "FAILED"  # JSON: error, traceback, Hydra overrides and the swept value of a run that raised


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

    In a multirun (``-m``), an exception fails only its own run: it is logged, written to ``<run>/FAILED``
    (JSON: error, traceback, overrides, swept value, seed) and the sweep continues with the next run. A run that
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
            "seed": OmegaConf.select(cfg, "seed"),
        }
        write_text_atomic(run_dir / FAILED_FILE, json.dumps(record, indent=2, default=str) + "\n")
        log.error("run %s failed (the sweep continues): %s\n%s", run_dir, record["error"], record["traceback"])
        return None
    (run_dir / FAILED_FILE).unlink(missing_ok=True)
    return result
