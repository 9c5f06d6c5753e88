"""Atomic, verified, resumable training checkpoints on top of ``Accelerator.save_state`` (issue 12 items 1, 5).

A checkpoint is ``<run>/checkpoints/step-XXXXXXXX/``: Accelerate's state (model, optimizer, scheduler, RNG, and
DeepSpeed's shards when it is on) plus ``trainer_state.json`` (step, run id, what was trained, the optimisation
settings, and the sha256 of every other file). It is written under a ``.tmp-`` name and renamed into place only
when complete, so a save killed midway leaves the previous checkpoint untouched and is never picked by resume.
Resume verifies the hashes and falls back, with a warning, to the previous intact checkpoint; a checkpoint of
another run (another run id) is never resumed from. A model with non-finite parameters is never saved.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from memoryformer.reporting import write_text_atomic

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"
CORRUPT_PREFIX = ".corrupt-"  # a checkpoint that failed verification, kept for inspection but never resumed


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (corrupt, or from another model/run setup)."""


class IncompatibleCheckpointError(CheckpointError):
    """A checkpoint of another model, data or batch setup: no earlier checkpoint of the run would fit either."""


class NonFiniteModelError(ValueError):
    """A model whose parameters hold NaN or infinity: it is not saved, exported or evaluated."""


def check_finite_parameters(model: torch.nn.Module, what: str = "the model") -> None:
    """Raise :class:`NonFiniteModelError` naming the first parameters that are not finite (issue 12 item 1)."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p.detach()).all()]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteModelError(
            f"{what} has non-finite parameters ({shown}): it diverged and is not usable; take an earlier "
            f"checkpoint (runs/<run>/checkpoints/step-N) or retrain with a lower train.lr"
        )


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix(PREFIX))


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest step first (temporary, corrupt and incomplete directories are ignored)."""
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.glob(f"{PREFIX}*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    found = complete_checkpoints(checkpoints_dir)
    return found[-1] if found else None


def file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory`` except the trainer state, by relative path."""
    hashes = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != STATE_FILE):
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        hashes[str(path.relative_to(directory))] = digest.hexdigest()
    return hashes


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    try:
        return json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {checkpoint} has no readable {STATE_FILE} ({err})") from err


def verify_checkpoint(checkpoint: Path) -> dict[str, Any]:
    """The trainer state of ``checkpoint`` after checking every file against its recorded sha256."""
    state = read_trainer_state(checkpoint)
    expected = state.get("files")
    if expected is None:  # saved before checkpoints recorded hashes: nothing to verify against
        log.warning("checkpoint %s records no file hashes; resuming from it unverified", checkpoint)
        return state
    actual = file_hashes(checkpoint)
    damaged = sorted(name for name in expected if actual.get(name) != expected[name])
    if damaged:
        raise CheckpointError(f"checkpoint {checkpoint}: {', '.join(damaged)} missing or changed since it was saved")
    return state


def check_compatible(state: dict[str, Any], expected: dict[str, Any], checkpoint: Path) -> None:
    """Refuse to resume a run whose model or batch geometry differs from the checkpoint's."""
    mismatched = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
    if mismatched:
        details = "; ".join(f"{k}: checkpoint has {a!r}, this run has {b!r}" for k, (a, b) in mismatched.items())
        raise IncompatibleCheckpointError(
            f"cannot resume from {checkpoint}: {details}. Use a new train.run_name (or train.resume=never "
            f"train.overwrite=true to move the old run aside), or run with the checkpoint's settings"
        )


class Checkpointer:
    """Saves, prunes and restores one run's checkpoints: owns the cadence, the run identity and verification.

    ``identity`` is what a checkpoint must share with the run resuming it (model, data, batch geometry, seed);
    ``run_id`` tells this run's checkpoints from any other's in the same directory.
    """

    def __init__(
        self, accelerator: Accelerator, directory: Path, every: int, keep: int, run_id: str, identity: dict[str, Any]
    ) -> None:
        self.accelerator, self.directory, self.every, self.keep = accelerator, directory, every, keep
        self.run_id, self.identity = run_id, identity
        self.last_saved: Path | None = None  # the newest checkpoint known intact: saved or verified by this process

    def should_save(self, step: int, last: bool) -> bool:
        return last or step % self.every == 0

    def save(self, step: int, model: torch.nn.Module, extra_state: dict[str, Any]) -> Path:
        """Save on every rank (collective), publish atomically from the main process, keep the newest ``keep``."""
        check_finite_parameters(self.accelerator.unwrap_model(model), f"the model at step {step}")
        accelerator = self.accelerator
        final = self.directory / checkpoint_name(step)
        tmp = self.directory / f"{TMP_PREFIX}{checkpoint_name(step)}"
        if accelerator.is_main_process:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {**self.identity, **extra_state, "step": step, "run_id": self.run_id, "files": file_hashes(tmp)}
            write_text_atomic(tmp / STATE_FILE, json.dumps(state, indent=2, sort_keys=True))
            shutil.rmtree(final, ignore_errors=True)  # re-saving the same step (e.g. a stop request on a save step)
            tmp.rename(final)
            self._prune()
        accelerator.wait_for_everyone()
        self.last_saved = final
        return final

    def _prune(self) -> None:
        """Keep this run's newest ``keep`` (the one just saved is always among them; checkpoints from before run
        ids count as this run's, as on resume); drop leftover temporaries."""
        ours = [p for p in complete_checkpoints(self.directory) if self._run_of(p) in (self.run_id, None)]
        for old in ours[: -self.keep] if self.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.directory.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)

    @staticmethod
    def _run_of(checkpoint: Path) -> str | None:
        try:
            return read_trainer_state(checkpoint).get("run_id")
        except CheckpointError:
            return None

    def restore(self, resume: str, is_usable: Callable[[], None]) -> dict[str, Any] | None:
        """Load the checkpoint ``resume`` names (``auto``: this run's newest intact one); its state, or None.

        Each candidate is verified (sha256), loaded, and passed to ``is_usable`` (which raises to reject it,
        e.g. non-finite weights); a candidate that fails is reported, moved aside as ``.corrupt-step-N`` and the
        previous one is tried. A checkpoint of another run in this run's directory is refused outright.
        """
        if resume == "never":
            return None
        explicit = resume != "auto"
        candidates = [Path(resume)] if explicit else complete_checkpoints(self.directory)[::-1]
        if not explicit:
            self._refuse_foreign(candidates)
        rejected: list[tuple[Path, str]] = []
        for checkpoint in candidates:
            try:
                state = verify_checkpoint(checkpoint)
                check_compatible(state, self.identity, checkpoint)
                self._load(checkpoint)
                is_usable()
            except IncompatibleCheckpointError:
                raise  # another setup: an earlier checkpoint of the run would not fit either
            except (CheckpointError, NonFiniteModelError) as err:
                rejected.append((checkpoint, str(err)))
                log.warning("checkpoint %s is not usable (%s); trying the previous one", checkpoint.name, err)
                continue
            if rejected:
                log.warning(
                    "resumed from %s instead of the newer %s, which failed verification",
                    checkpoint, ", ".join(p.name for p, _ in rejected),
                )  # fmt: skip
            self._set_aside(rejected)
            self.last_saved = checkpoint
            return state
        if rejected:
            details = "; ".join(f"{p}: {why}" for p, why in rejected)
            raise CheckpointError(
                f"no intact checkpoint to resume from ({details}). Start afresh with train.resume=never "
                f"train.overwrite=true (the old run is moved aside), or pass train.resume=<checkpoint>"
            )
        return None

    def _refuse_foreign(self, checkpoints: list[Path]) -> None:
        foreign = [(p, run) for p in checkpoints if (run := self._run_of(p)) not in (self.run_id, None)]
        if foreign:
            names = ", ".join(f"{p.name} (run {run})" for p, run in foreign)
            raise CheckpointError(
                f"{self.directory} holds checkpoints of another run: {names}; this run is {self.run_id}. Move them "
                f"away, or start afresh with train.resume=never train.overwrite=true"
            )

    def _load(self, checkpoint: Path) -> None:
        try:
            self.accelerator.load_state(str(checkpoint))
        except Exception as err:  # torch/safetensors raise many types for truncated or foreign files
            raise CheckpointError(f"checkpoint {checkpoint} could not be loaded ({type(err).__name__}: {err})") from err

    def _set_aside(self, rejected: list[tuple[Path, str]]) -> None:
        """Rename rejected checkpoints so later saves and pruning never count them (main process)."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            for checkpoint, _ in rejected:
                if checkpoint.parent == self.directory and checkpoint.is_dir():
                    aside = checkpoint.with_name(f"{CORRUPT_PREFIX}{checkpoint.name}")
                    for n in itertools.count(2):  # the same step may be damaged again after it is re-saved
                        if not aside.exists():
                            break
                        aside = checkpoint.with_name(f"{CORRUPT_PREFIX}{checkpoint.name}-{n}")
                    checkpoint.rename(aside)
        self.accelerator.wait_for_everyone()


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
