"""Atomic, resumable training checkpoints on top of ``Accelerator.save_state``.

A checkpoint is ``<run>/checkpoints/step-XXXXXXXX/``: Accelerate's state (model, optimizer, scheduler, RNG, and
DeepSpeed's shards when it is on) plus ``trainer_state.json`` (step, data position, what was trained). It is
written under a ``.tmp-`` name and renamed into place only when complete, so a save killed midway leaves the
previous checkpoint untouched and is never picked by resume.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from memoryformer.reporting import write_text_atomic

STATE_FILE = "trainer_state.json"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (corrupt, or from another model/run setup)."""


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (temporary and incomplete directories are ignored)."""
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.glob(f"{PREFIX}*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    found = complete_checkpoints(checkpoints_dir)
    return found[-1] if found else None


def save_checkpoint(
    accelerator: Accelerator, checkpoints_dir: Path, step: int, trainer_state: dict[str, Any], keep: int
) -> Path:
    """Save on every rank (collective), publish atomically from the main process, keep the newest ``keep``."""
    final = checkpoints_dir / checkpoint_name(step)
    tmp = checkpoints_dir / f"{TMP_PREFIX}{checkpoint_name(step)}"
    if accelerator.is_main_process:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_text_atomic(tmp / STATE_FILE, json.dumps(trainer_state, indent=2, sort_keys=True))
        shutil.rmtree(final, ignore_errors=True)  # re-saving the same step (e.g. final == periodic)
        tmp.rename(final)
        for old in complete_checkpoints(checkpoints_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in checkpoints_dir.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    try:
        return json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"checkpoint {checkpoint} is corrupt or incomplete ({err}); delete it to resume from the one before, "
            f"or start afresh with train.resume=never"
        ) from err


def check_compatible(state: dict[str, Any], expected: dict[str, Any], checkpoint: Path) -> None:
    """Refuse to resume a run whose model or batch geometry differs from the checkpoint's."""
    mismatched = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
    if mismatched:
        details = "; ".join(f"{k}: checkpoint has {a!r}, this run has {b!r}" for k, (a, b) in mismatched.items())
        raise CheckpointError(
            f"cannot resume from {checkpoint}: {details}. Use a new train.run_name (or train.resume=never to "
            f"overwrite), or run with the checkpoint's settings"
        )


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, expected: dict[str, Any]) -> dict[str, Any]:
    """Restore Accelerate's state from ``checkpoint`` after checking it belongs to this run's setup."""
    state = read_trainer_state(checkpoint)
    check_compatible(state, expected, checkpoint)
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as err:  # torch/safetensors raise many types for truncated or foreign files
        raise CheckpointError(
            f"checkpoint {checkpoint} could not be loaded ({type(err).__name__}: {err}); delete it to resume from "
            f"the one before, or start afresh with train.resume=never"
        ) from err
    return state


def load_for_inference(path: str | Path) -> tuple[Any, Any]:
    """(model, tokenizer) from a Hugging Face model directory, a run directory, or a training checkpoint.

    A training checkpoint (``<run>/checkpoints/step-N``) is rebuilt from the run's ``config.yaml`` and its
    Accelerate ``model.safetensors`` (single-process and DDP checkpoints; DeepSpeed shards need DeepSpeed's own
    ``zero_to_fp32`` first).
    """
    from omegaconf import OmegaConf
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from memoryformer.data import load_tokenizer
    from memoryformer.models import build_model_from_config

    path = Path(path).expanduser()
    if (path / "model" / "config.json").is_file():
        path = path / "model"  # a run directory: its final model
    if (path / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(path), load_tokenizer(str(path))
    if (path / STATE_FILE).is_file():
        run_config = path.parent.parent / "config.yaml"
        weights = path / "model.safetensors"
        if not run_config.is_file() or not weights.is_file():
            raise FileNotFoundError(f"{path} lacks {run_config.name} (two levels up) or {weights.name}")
        cfg = OmegaConf.load(run_config)
        model = build_model_from_config(cfg.model)
        model.load_state_dict(load_file(str(weights)))
        return model, load_tokenizer(cfg.data.tokenizer)
    raise FileNotFoundError(
        f"{path} is neither a model directory (config.json), a run directory (model/) nor a training checkpoint "
        f"({STATE_FILE}); pass CKPT=runs/<run>, runs/<run>/model or runs/<run>/checkpoints/step-N"
    )
