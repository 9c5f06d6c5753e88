"""What a training config may say, checked before any work (issue 12 item 7), and the optimisation settings a
resumed run must share with its checkpoint unless told otherwise (issue 12 item 3).

Every problem is collected and reported at once (litgpt's ``validate_args``), each naming the key and a valid
example, so a run never prepares data or builds a model only to crash on a bad value.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from memoryformer.models.registry import model_config_from_config, recommended_lr

# The settings that shape the optimisation trajectory: resuming with other values is refused unless they are
# named in train.allow_changed (then the schedule is rebuilt from the new values).
OPTIMISATION_KEYS = (
    "lr",
    "min_lr",
    "warmup_fraction",
    "max_steps",
    "weight_decay",
    "betas",
    "eps",
    "grad_clip",
    "table_lr_multiplier",
)
RESUME_MODES = ("auto", "never")
TRACKERS = ("wandb", "none")
PRECISIONS = ("auto", "no", "bf16", "fp16")


class ConfigError(ValueError):
    """One or more config values that cannot work; the message lists each with a valid example."""


def learning_rates(cfg: DictConfig) -> tuple[float, float]:
    """(peak, final) LR: ``train.lr`` / ``train.min_lr``, defaulting to the model's (spec §4 tables)."""
    default_lr, default_min_lr = recommended_lr(cfg.model.name)
    lr, min_lr = cfg.train.lr, cfg.train.min_lr
    return (default_lr if lr is None else lr), (default_min_lr if min_lr is None else min_lr)


def optimisation_settings(cfg: DictConfig) -> dict[str, Any]:
    """The resolved :data:`OPTIMISATION_KEYS` of ``cfg`` (the LR pair with the model's defaults filled in)."""
    tc = cfg.train
    lr, min_lr = learning_rates(cfg)
    settings = {key: OmegaConf.to_object(tc[key]) if key == "betas" else tc[key] for key in OPTIMISATION_KEYS}
    return {**settings, "lr": lr, "min_lr": min_lr, "betas": [float(b) for b in settings["betas"]]}


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (checkpoint's value, this run's value)}`` for the optimisation settings that differ."""
    return {k: (saved.get(k), current[k]) for k in OPTIMISATION_KEYS if k in saved and saved[k] != current[k]}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def config_problems(cfg: DictConfig) -> list[str]:
    """Every problem of ``cfg.train`` (and its fit to ``cfg.model``), as 'key=value: why; e.g. key=example'."""
    tc = cfg.train
    problems: list[str] = []

    def need(ok: bool, key: str, why: str, example: str) -> None:
        if not ok:
            problems.append(f"train.{key}={tc[key]!r}: {why}; e.g. train.{key}={example}")

    for key, example in (("max_steps", "300"), ("checkpoint_every", "100"), ("eval_every", "100"),
                         ("log_every", "10"), ("eval_batches", "8"), ("seq_len", "128"), ("micro_batch", "8"),
                         ("global_batch", "16"), ("max_nonfinite_steps", "5")):  # fmt: skip
        need(_int(tc[key]) and tc[key] >= 1, key, "must be a positive integer", example)
    for key, example in (("keep_checkpoints", "2 (0 keeps all)"), ("sample_tokens", "24 (0: no samples)")):
        need(_int(tc[key]) and tc[key] >= 0, key, "must be an integer ≥ 0", example)
    lr_ok = tc.lr is None or (_number(tc.lr) and tc.lr > 0)
    min_lr_ok = tc.min_lr is None or (_number(tc.min_lr) and tc.min_lr >= 0)
    need(lr_ok, "lr", "must be a positive number (or null: the model's)", "3e-3")
    need(min_lr_ok, "min_lr", "must be a number ≥ 0 (or null: the model's)", "3e-5")
    if lr_ok and min_lr_ok:
        lr, min_lr = learning_rates(cfg)
        need(min_lr <= lr, "min_lr", f"must not exceed the peak LR {lr:g} (train.lr)", f"{lr / 100:g}")
    need(_number(tc.warmup_fraction) and 0 <= tc.warmup_fraction < 1, "warmup_fraction", "must be in [0, 1)", "0.01")
    need(_number(tc.weight_decay) and tc.weight_decay >= 0, "weight_decay", "must be a number ≥ 0", "0.1")
    need(_number(tc.eps) and tc.eps > 0, "eps", "must be a positive number", "1e-8")
    need(_number(tc.grad_clip) and tc.grad_clip > 0, "grad_clip", "must be a positive number", "1.0")
    multiplier = tc.table_lr_multiplier
    need(_number(multiplier) and multiplier > 0, "table_lr_multiplier", "must be a positive number", "1.0")
    betas = tc.betas
    need(
        OmegaConf.is_list(betas) and len(betas) == 2 and all(_number(b) and 0 <= b < 1 for b in betas),
        "betas", "must be two numbers in [0, 1)", "[0.9,0.95]",
    )  # fmt: skip
    need(tc.eval_limit is None or (_int(tc.eval_limit) and tc.eval_limit >= 1), "eval_limit",
         "must be a positive number of documents per task, or null for all", "100")  # fmt: skip
    need(tc.tracker in TRACKERS, "tracker", f"must be one of {', '.join(TRACKERS)}", "none")
    need(tc.mixed_precision in PRECISIONS, "mixed_precision", f"must be one of {', '.join(PRECISIONS)}", "auto")
    need(isinstance(tc.overwrite, bool), "overwrite", "must be true or false", "true")
    if tc.overwrite is True and tc.resume != "never":
        problems.append(
            f"train.overwrite=true moves an existing run aside to start afresh, which contradicts "
            f"train.resume={tc.resume!r}; e.g. train.resume=never train.overwrite=true"
        )
    resume = tc.resume
    if resume not in RESUME_MODES and not (Path(str(resume)) / "trainer_state.json").is_file():
        problems.append(
            f"train.resume={resume!r}: must be auto (continue the run's newest checkpoint), never (start afresh), "
            f"or a checkpoint directory holding trainer_state.json; e.g. train.resume=auto or "
            f"train.resume=runs/<run>/checkpoints/step-00000100"
        )
    unknown = sorted(set(OmegaConf.to_object(tc.allow_changed)) - set(OPTIMISATION_KEYS))
    if unknown:
        problems.append(
            f"train.allow_changed names {unknown}, which are not optimisation settings (allowed: "
            f"{', '.join(OPTIMISATION_KEYS)}); e.g. train.allow_changed=[lr,max_steps]"
        )
    max_positions = model_config_from_config(cfg.model).max_position_embeddings
    if _int(tc.seq_len) and tc.seq_len > max_positions:
        problems.append(
            f"train.seq_len={tc.seq_len} exceeds the model's max_position_embeddings={max_positions}; e.g. "
            f"train.seq_len={max_positions} (or raise model.max_position_embeddings)"
        )
    return problems


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every problem of :func:`config_problems` (none: return)."""
    problems = config_problems(cfg)
    if problems:
        raise ConfigError("invalid training config:\n  - " + "\n  - ".join(problems))
