"""The pretraining loop (spec §4's recipe) as a :class:`Trainer` with setup, step, evaluation, checkpoint and finish
parts (torchtitan's ``Trainer``), and its public entry :func:`pretrain`.

Launch with plain ``python`` (one process), ``torchrun`` (multi-CPU over gloo, or DDP on GPUs) or
``accelerate launch --config_file conf/accelerate/<setup>.yaml`` (multi-GPU, DeepSpeed, multi-node). Data position,
optimizer, scheduler and RNG are all restored on ``train.resume=auto``; the step number alone fixes which samples
come next (:func:`memoryformer.data.sample_indices`). Each guard of issue 12 has one home: config validation and
the run lock in :meth:`Trainer.__init__`, resume rules in :meth:`Trainer.restore`, the non-finite guard in
:meth:`Trainer.train_one_step`, stop requests in :meth:`Trainer.should_continue`, finite-only saves in
:class:`~memoryformer.train.checkpoint.Checkpointer`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from memoryformer.config import check_run_inputs
from memoryformer.data import build_datasets, load_tokenizer, sample_indices
from memoryformer.flops import model_flops_per_token
from memoryformer.models.registry import build_model_from_model_config, model_config_from_config
from memoryformer.reporting import write_text_atomic
from memoryformer.train.checkpoint import Checkpointer, check_finite_parameters, checkpoint_name
from memoryformer.train.loop import (
    BatchGeometry,
    build_optimization,
    collate,
    configure_deepspeed,
    greedy_sample,
    make_accelerator,
    peak_tflops,
    resolve_run_dir,
    run_identity,
    train_step,
    updates_inside_backward,
    validation_loss,
    zero3_sharded,
)
from memoryformer.train.metrics import MetricsLogger
from memoryformer.train.preemption import Preempted, StopRequests
from memoryformer.train.run_dir import prepare_run_dir, read_run_id, record_config, run_lock
from memoryformer.train.run_log import LOG_FILE, run_logging
from memoryformer.train.settings import (
    ConfigError,
    changed_settings,
    learning_rates,
    optimisation_settings,
    validate_config,
)

log = logging.getLogger(__name__)

LATEST_FILE = "LATEST"  # <output_dir>/LATEST: the absolute path of the newest finished run's model


def launched_rank() -> int:
    """This process's global rank as the launcher (torchrun, accelerate launch) set it; 0 for a plain process."""
    return int(os.environ.get("RANK", "0"))


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


class NonFiniteTrainingError(RuntimeError):
    """Training diverged: the loss or gradient norm stayed non-finite for ``train.max_nonfinite_steps`` steps."""


class Trainer:
    """One training run: build it (everything checked and locked), :meth:`train` it, :meth:`close` it.

    Use as a context manager so the run lock, trackers and logging are released on every exit path.
    """

    def __init__(self, cfg: DictConfig) -> None:
        validate_config(cfg)  # every bad value reported before any work
        check_run_inputs(cfg)  # likewise every missing input (eval sets too, with train.eval_at_end)
        BatchGeometry(cfg.train.global_batch, cfg.train.micro_batch, launched_world_size())  # likewise
        self.cfg, self.tc = cfg, cfg.train
        self.run_dir = resolve_run_dir(cfg)
        self.step = 0
        self.nonfinite_streak = 0
        self._resources = contextlib.ExitStack()
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    # --- setup ---------------------------------------------------------------------------------------------------

    def _setup(self) -> None:
        cfg, tc = self.cfg, self.tc
        model_config = model_config_from_config(cfg.model)
        # The launcher's rank, before the accelerator exists: the lock comes first (a second run touches nothing),
        # and logging is set up before DeepSpeed's import prints to the console.
        main = launched_rank() == 0
        if main:
            self._resources.enter_context(run_lock(self.run_dir))
            prepare_run_dir(self.run_dir, tc.resume, tc.overwrite)
        self._resources.enter_context(run_logging(self.run_dir / LOG_FILE if main else None))
        accelerator, self.geometry = make_accelerator(tc, self.run_dir)
        self.accelerator = accelerator
        accelerator.wait_for_everyone()  # the main process has prepared the run directory
        configure_deepspeed(accelerator, self.geometry, tc.grad_clip)
        set_seed(cfg.seed)

        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        self.train_samples, self.valid_samples = build_datasets(cfg.data, tc.seq_len, cfg.seed, show_progress=main)
        model = build_model_from_model_config(model_config)
        optimizer, self.scheduler = build_optimization(model, cfg)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        accelerator.register_for_checkpointing(self.scheduler)

        self.settings = optimisation_settings(cfg)
        self.checkpointer = Checkpointer(
            accelerator,
            self.run_dir / "checkpoints",
            tc.checkpoint_every,
            tc.keep_checkpoints,
            read_run_id(self.run_dir),
            run_identity(cfg, self.geometry),
        )
        self.metrics = MetricsLogger(accelerator, self.run_dir / "metrics.jsonl", tc.log_every)
        unwrapped = accelerator.unwrap_model(self.model)
        self.parameters = sum(p.numel() for p in unwrapped.parameters())
        self.flops_per_token = model_flops_per_token(unwrapped.config, tc.seq_len)
        self.tokens_per_step = self.geometry.global_batch * tc.seq_len
        self.device_peak = peak_tflops(tc.peak_tflops)

    def _start_tracker(self) -> None:
        tc = self.tc
        if tc.tracker != "wandb":
            return
        tracker_config = {
            **OmegaConf.to_container(self.cfg, resolve=True),
            "parameters": self.parameters,
            "flops_per_token": self.flops_per_token,
        }
        wandb_kwargs = {
            "name": tc.run_name,
            "dir": str(self.run_dir),
            "mode": tc.wandb.mode,
            "group": tc.wandb.group,
            "settings": {"quiet": True},  # no end-of-run summary block: the trainer prints its own result
        }
        self.accelerator.init_trackers(tc.wandb.project, config=tracker_config, init_kwargs={"wandb": wandb_kwargs})

    # --- resume --------------------------------------------------------------------------------------------------

    def restore(self) -> None:
        """Resume from the newest intact checkpoint (``train.resume``), refusing changed optimisation settings
        unless allowed; record this start's config either way."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        state = self.checkpointer.restore(self.tc.resume, lambda: check_finite_parameters(unwrapped, "the checkpoint"))
        note = ""
        if state is not None:
            self.step = state["step"]
            self.nonfinite_streak = state.get("nonfinite_streak", 0)
            note = self._apply_changed_settings(state, self.checkpointer.last_saved)
            log.info("resumed from %s at step %d", self.checkpointer.last_saved, self.step)
        self.metrics.resume(self.step)
        if self.accelerator.is_main_process:
            record_config(self.run_dir, self.cfg, self.step, note)

    def _apply_changed_settings(self, state: dict[str, Any], checkpoint: Path | None) -> str:
        """Refuse optimisation settings that differ from the checkpoint's unless in ``train.allow_changed``; for
        allowed ones, rebuild the optimizer's hyperparameters and the schedule from this run's values."""
        changed = changed_settings(state.get("optimisation", {}), self.settings)
        if not changed:
            return ""
        diff = ", ".join(f"train.{k}: {old!r} → {new!r}" for k, (old, new) in changed.items())
        refused = sorted(set(changed) - set(self.tc.allow_changed))
        if refused:
            raise ConfigError(
                f"resuming {checkpoint} with changed optimisation settings ({diff}) would mix two runs' "
                f"trajectories. Allow them explicitly with train.allow_changed=[{','.join(refused)}] (the schedule "
                f"is rebuilt from the new values), or start a new run (train.run_name=...)"
            )
        fresh_optimizer, fresh_scheduler = build_optimization(self.accelerator.unwrap_model(self.model), self.cfg)
        for group, fresh in zip(self.optimizer.param_groups, fresh_optimizer.param_groups, strict=True):
            for key in ("weight_decay", "betas", "eps", "lr_scale", "initial_lr"):
                group[key] = fresh[key]
        self.scheduler.base_lrs = list(fresh_scheduler.base_lrs)
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group, base_lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base_lr * factor
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        log.warning("resumed with changed settings (train.allow_changed): %s; the schedule follows them", diff)
        return f"changed: {diff}"

    # --- the loop ------------------------------------------------------------------------------------------------

    def train(self) -> Path:
        """Train to ``train.max_steps`` (or a stop request); finish; return the run directory."""
        tc, accelerator = self.tc, self.accelerator
        self.restore()
        self._start_tracker()
        lr, min_lr = learning_rates(self.cfg)
        log.info(
            "%s: %s parameters, %.1f MFLOPs/token; %d×%d tokens per step = %d ranks × %d micro-steps × %d; "
            "lr %g → %g; run directory %s",
            self.cfg.model.name, f"{self.parameters:,}", self.flops_per_token / 1e6, self.geometry.global_batch,
            tc.seq_len, self.geometry.world_size, self.geometry.accumulation_steps, tc.micro_batch, lr, min_lr,
            self.run_dir,
        )  # fmt: skip
        self.progress = tqdm(total=tc.max_steps, initial=self.step, disable=not accelerator.is_main_process,
                             dynamic_ncols=True)  # fmt: skip
        self.model.train()
        self._tick = time.perf_counter()
        with StopRequests() as stop:
            self.stop = stop
            while self.should_continue():
                self.step += 1
                record = self.train_one_step()
                self.maybe_validate(record)
                if self.metrics.should_log(record):
                    self.metrics.log(record)
                last = self.step == tc.max_steps
                if self.checkpointer.should_save(self.step, last):
                    self.save()
        self.progress.close()
        if self.stop_requested:
            checkpoint = self.checkpointer.last_saved
            if checkpoint is None or checkpoint.name != checkpoint_name(self.step):
                checkpoint = self.save()
            preempted = Preempted(self.stop.signal_name, self.step, checkpoint)
            log.warning("%s", preempted)  # SystemExit prints nothing itself
            raise preempted
        return self.finish()

    def should_continue(self) -> bool:
        """More steps to do and no stop request on any rank (the flag is reduced: all ranks stop together)."""
        flag = torch.tensor(1.0 if self.stop.received is not None else 0.0, device=self.accelerator.device)
        self.stop_requested = self.accelerator.reduce(flag, "sum").item() > 0
        if self.stop_requested:
            log.warning("stop requested (%s): saving at step %d, then exiting", self.stop.signal_name or "another rank",
                        self.step)  # fmt: skip
        return self.step < self.tc.max_steps and not self.stop_requested

    def train_one_step(self) -> dict[str, Any]:
        """Optimizer step ``self.step`` (1-based) with the non-finite guard; its metrics record."""
        tc, accelerator, geometry = self.tc, self.accelerator, self.geometry
        micro_batches = (
            collate(self.train_samples, indices, accelerator.device)
            for indices in sample_indices(
                self.step - 1, geometry.global_batch, tc.micro_batch, accelerator.process_index, geometry.world_size
            )
        )
        outcome = train_step(accelerator, self.model, self.optimizer, micro_batches, tc.grad_clip)
        self.scheduler.step()
        loss_value = accelerator.reduce(outcome.loss, "mean").item()
        elapsed, self._tick = time.perf_counter() - self._tick, time.perf_counter()
        tflops = 3 * self.flops_per_token * self.tokens_per_step / elapsed / 1e12  # forward + backward ≈ 3× forward
        record = {
            "step": self.step,
            "loss": loss_value,
            "lr": self.scheduler.get_last_lr()[0],
            "tokens": self.step * self.tokens_per_step,
            "tokens_per_s": self.tokens_per_step / elapsed,
            "tflops": tflops,
            "mfu": None if self.device_peak is None else tflops / (self.device_peak * geometry.world_size),
            "grad_norm": outcome.grad_norm,
        }
        if outcome.nonfinite:
            record["skipped"] = True
            self._on_nonfinite(record)
        else:
            self.nonfinite_streak = 0
        self.progress.set_postfix(loss=f"{loss_value:.3f}", lr=f"{record['lr']:.2e}",
                                  tok_s=f"{record['tokens_per_s']:.0f}")  # fmt: skip
        self.progress.update(1)
        return record

    def _on_nonfinite(self, record: dict[str, Any]) -> None:
        """Count a skipped update; stop when ``train.max_nonfinite_steps`` follow each other, or at once under
        DeepSpeed (whose engine has already applied it)."""
        self.nonfinite_streak += 1
        limit = self.tc.max_nonfinite_steps
        applied = updates_inside_backward(self.accelerator)
        if applied or self.nonfinite_streak >= limit:
            self.metrics.log(record)
            last_good = self.checkpointer.last_saved
            why = (
                "DeepSpeed applied the update inside its engine, so it could not be skipped"
                if applied
                else f"{self.nonfinite_streak} consecutive steps (train.max_nonfinite_steps={limit}), each skipped"
            )
            raise NonFiniteTrainingError(
                f"training diverged at step {self.step}: non-finite loss ({record['loss']}) or gradient norm "
                f"({record['grad_norm']}); {why}. Nothing was saved after it. The last good checkpoint is "
                f"{last_good or 'none (no checkpoint was saved yet)'}; resume from it with a lower LR "
                f"(train.lr=... train.allow_changed=[lr]) or start afresh"
            )
        log.warning(
            "step %d: non-finite loss (%s) or gradient norm (%s): update skipped (%d/%d in a row)",
            self.step, record["loss"], record["grad_norm"], self.nonfinite_streak, limit,
        )  # fmt: skip

    # --- evaluation ----------------------------------------------------------------------------------------------

    def maybe_validate(self, record: dict[str, Any]) -> None:
        """Validation loss/PPL (and a greedy sample) every ``train.eval_every`` steps and at the last."""
        tc, accelerator = self.tc, self.accelerator
        if self.step % tc.eval_every and self.step != tc.max_steps:
            return
        record["val_loss"] = validation_loss(accelerator, self.model, self.valid_samples, tc.eval_batches,
                                             tc.micro_batch)  # fmt: skip
        record["val_ppl"] = math.exp(min(record["val_loss"], 50))
        self.last_validation = record
        if tc.sample_tokens and accelerator.is_main_process and not zero3_sharded(accelerator):
            text = greedy_sample(accelerator.unwrap_model(self.model), self.tokenizer, tc.sample_prompt,
                                 tc.sample_tokens)  # fmt: skip
            log.info("step %d val_loss %.3f sample: %r → %r", self.step, record["val_loss"], tc.sample_prompt, text)
            record["sample"] = text

    # --- checkpoint ----------------------------------------------------------------------------------------------

    def save(self) -> Path:
        extra = {"optimisation": self.settings, "nonfinite_streak": self.nonfinite_streak}
        return self.checkpointer.save(self.step, self.model, extra)

    # --- finish --------------------------------------------------------------------------------------------------

    def finish(self) -> Path:
        """Export the final model (never a non-finite one), point LATEST at it, score it if asked, report."""
        tc, accelerator = self.tc, self.accelerator
        model_dir = self.run_dir / "model"
        unwrapped = accelerator.unwrap_model(self.model)
        if accelerator.is_main_process:
            save_final_model(unwrapped, self.tokenizer, model_dir, Path(tc.output_dir))
        accelerator.wait_for_everyone()
        results = None
        if tc.eval_at_end and accelerator.is_main_process:
            from memoryformer.evaluation import evaluate_checkpoint

            results = evaluate_checkpoint(
                unwrapped,
                tokenizer=self.tokenizer,
                tasks=list(self.cfg.eval.tasks),
                limit=tc.eval_limit,
                output_dir=self.run_dir / "eval",
                data_dir=Path(self.cfg.eval.data_dir),
                model_name=self.cfg.model.name,
            )
            accelerator.log({f"eval/{k}": v for k, v in results.get("summary", {}).items()}, step=tc.max_steps)
        if accelerator.is_main_process:
            log.info(self.result_summary(model_dir, results))
        return self.run_dir

    def result_summary(self, model_dir: Path, results: dict[str, Any] | None) -> str:
        """The end-of-run report: final validation loss/PPL, the zero-shot table, and where everything is."""
        validation = getattr(self, "last_validation", None)
        lines = [f"\nfinished {self.cfg.model.name} at step {self.step}"]
        if validation is not None:
            lines.append(f"  validation loss {validation['val_loss']:.4f}, perplexity {validation['val_ppl']:.2f}")
        if results is not None:
            from memoryformer.evaluation.tables import table_markdown

            lines += ["", table_markdown([results]).rstrip(), ""]
        lines += [
            f"  model:   {model_dir}",
            f"  metrics: {self.run_dir / 'metrics.jsonl'}",
            f"  log:     {self.run_dir / LOG_FILE}",
        ]
        if results is not None:
            lines.append(f"  tables:  {self.run_dir / 'eval'}/table.md, table.csv")
        return "\n".join(lines)

    def close(self) -> None:
        """Release the trackers, logging and run lock (every exit path; safe to call twice)."""
        progress = getattr(self, "progress", None)
        if progress is not None:
            progress.close()
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None:
            accelerator.end_training()
        self._resources.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def save_final_model(model: torch.nn.Module, tokenizer: Any, model_dir: Path, output_dir: Path) -> None:
    """Hugging Face format (config, safetensors, tokenizer), published atomically; LATEST points at it.

    A model with non-finite parameters is refused before anything is written.
    """
    check_finite_parameters(model, "the final model")
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if model_dir.exists():
        shutil.rmtree(model_dir)
    tmp.rename(model_dir)
    write_text_atomic(output_dir / LATEST_FILE, f"{model_dir.resolve()}\n")


def pretrain(cfg: DictConfig) -> Path:
    """Train ``cfg.model`` on ``cfg.data`` with ``cfg.train``; returns the run directory.

    The run directory holds ``checkpoints/``, the final Hugging Face model in ``model/`` (with its tokenizer),
    ``config.yaml`` (and ``config_history/``), ``metrics.jsonl``, ``train.log`` and, when evaluated, ``eval/``.
    ``<output_dir>/LATEST`` names its model. Raises :class:`~memoryformer.train.preemption.Preempted` (a
    ``SystemExit`` with status 75) after saving on SIGTERM/SIGINT/SIGUSR1.
    """
    with Trainer(cfg) as trainer:
        return trainer.train()
