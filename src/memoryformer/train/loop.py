"""One training step and what it needs (spec §4's recipe) on Accelerate: one code path from a laptop CPU to
DeepSpeed ZeRO.

The accelerator and batch geometry, the optimizer and schedule, :func:`train_step` (with its non-finite guard),
validation and the greedy sample. The loop around them is :class:`memoryformer.train.trainer.Trainer`; the
training benchmark (benchmarks/bench_training.py) runs the same :func:`train_step`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType, parse_flag_from_env
from omegaconf import DictConfig, OmegaConf

from memoryformer.data import PackedSamples
from memoryformer.train.optim import OptimizerSettings, build_optimizer, build_scheduler, clip_grad_norm
from memoryformer.train.settings import learning_rates


@dataclass(frozen=True)
class BatchGeometry:
    """How one optimizer step's ``global_batch`` samples split over ranks and accumulation micro-steps."""

    global_batch: int
    micro_batch: int
    world_size: int

    def __post_init__(self) -> None:
        per_step = self.micro_batch * self.world_size
        if self.micro_batch < 1 or self.global_batch % per_step:
            raise ValueError(
                f"train.global_batch={self.global_batch} must be a positive multiple of train.micro_batch × "
                f"world size = {self.micro_batch} × {self.world_size} = {per_step}; change one of them"
            )

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch // (self.micro_batch * self.world_size)


def make_accelerator(train_cfg: DictConfig, run_dir: Path) -> tuple[Accelerator, BatchGeometry]:
    """An Accelerator for this machine and the batch geometry of the processes it actually joined.

    CPU (gloo under torchrun) when there is no GPU; bf16 autocast on GPU. The world size is the Accelerator's,
    checked against the launcher's ``WORLD_SIZE``: ranks that did not join one process group would each train
    their own copy on their own share of the data.
    """
    on_gpu = torch.cuda.is_available()
    precision = train_cfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if on_gpu else "no"
    accelerator = Accelerator(
        # Under torchrun without cpu=True each rank would silently train its own copy; but cpu=True makes Accelerate
        # ignore `accelerate launch --use_deepspeed`, and DeepSpeed finds the CPU by itself.
        cpu=not on_gpu and not parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"),
        mixed_precision=precision,
        log_with="wandb" if train_cfg.tracker == "wandb" else None,
        project_dir=str(run_dir),
    )
    launched = int(os.environ.get("WORLD_SIZE", accelerator.num_processes))
    if accelerator.num_processes != launched:
        raise RuntimeError(
            f"the launcher started WORLD_SIZE={launched} processes but Accelerate joined "
            f"{accelerator.num_processes} ({accelerator.distributed_type}): each rank would train its own copy. "
            f"On CPU launch several processes with torchrun (gloo), not accelerate launch (conf/accelerate/cpu.yaml)"
        )
    geometry = BatchGeometry(train_cfg.global_batch, train_cfg.micro_batch, accelerator.num_processes)
    accelerator.gradient_accumulation_steps = geometry.accumulation_steps
    return accelerator, geometry


def configure_deepspeed(accelerator: Accelerator, geometry: BatchGeometry, grad_clip: float) -> None:
    """Give DeepSpeed the trainer's batch geometry and clipping (we feed batches ourselves, not a prepared loader).

    ``train.global_batch`` alone decides the accumulation steps; a launcher or config file asking for others
    would make DeepSpeed step the optimizer at different micro-steps than the trainer, so it is refused.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    config = plugin.deepspeed_config
    requested = config.get("gradient_accumulation_steps", "auto")
    if requested not in ("auto", geometry.accumulation_steps):
        raise ValueError(
            f"DeepSpeed gradient_accumulation_steps={requested} disagrees with train.global_batch="
            f"{geometry.global_batch} = {geometry.micro_batch} × {geometry.world_size} ranks × "
            f"{geometry.accumulation_steps}; drop --gradient_accumulation_steps (or set it to auto in the config "
            f"file) and size the batch with train.global_batch"
        )
    config["gradient_accumulation_steps"] = geometry.accumulation_steps
    config["train_micro_batch_size_per_gpu"] = geometry.micro_batch
    config["train_batch_size"] = geometry.global_batch
    config["gradient_clipping"] = grad_clip


def collate(samples: PackedSamples, indices: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets [B, seq_len] from windows of seq_len + 1 tokens."""
    batch = torch.stack([samples[i] for i in indices]).to(device)
    return batch[:, :-1], batch[:, 1:]


def next_token_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=inputs).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def build_optimization(
    model: torch.nn.Module, cfg: DictConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its warmup + cosine schedule from ``cfg.train`` (spec §4)."""
    tc = cfg.train
    lr, min_lr = learning_rates(cfg)
    settings = OptimizerSettings(
        lr=lr,
        weight_decay=tc.weight_decay,
        betas=tuple(tc.betas),
        eps=tc.eps,
        table_lr_multiplier=tc.table_lr_multiplier,
    )
    optimizer = build_optimizer(model, settings)
    warmup = math.ceil(tc.warmup_fraction * tc.max_steps)
    return optimizer, build_scheduler(optimizer, tc.max_steps, warmup, lr, min_lr)


class StepOutcome(NamedTuple):
    """What :func:`train_step` did: this rank's mean micro-batch loss, the gradient norm before clipping (None
    when the accelerator reports none), and whether the loss or gradient norm was non-finite on any rank."""

    loss: torch.Tensor
    grad_norm: float | None
    nonfinite: bool


def all_finite(accelerator: Accelerator, loss: torch.Tensor, grad_norm: torch.Tensor | float | None) -> bool:
    """Whether ``loss`` and ``grad_norm`` are finite on every rank (one tiny all-reduce: all ranks agree)."""
    finite = bool(torch.isfinite(loss)) and (grad_norm is None or math.isfinite(float(grad_norm)))
    flag = torch.tensor(0.0 if finite else 1.0, device=accelerator.device)
    return accelerator.reduce(flag, "sum").item() == 0


def updates_inside_backward(accelerator: Accelerator) -> bool:
    """DeepSpeed's engine steps the optimizer inside ``backward``: a non-finite update cannot be skipped there."""
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def train_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    grad_clip: float,
) -> StepOutcome:
    """One optimizer step over ``accelerator.gradient_accumulation_steps`` micro-batches, clipped.

    Non-finite guard (issue 12; torchtitan checks at the same place): when the step's loss or gradient norm is
    not finite on any rank, the optimizer step is skipped and the gradients dropped, as DeepSpeed's loss scaler
    skips an overflowing fp16 step. Under DeepSpeed the engine has already stepped inside ``backward``
    (:func:`updates_inside_backward`): the outcome still says ``nonfinite`` and the caller must stop. The
    schedule is stepped by the caller.
    """
    step_loss = torch.zeros((), device=accelerator.device)
    grad_norm = None
    nonfinite = False
    for inputs, targets in micro_batches:
        with accelerator.accumulate(model):
            loss = next_token_loss(model, inputs, targets)
            accelerator.backward(loss)
            step_loss += loss.detach() / accelerator.gradient_accumulation_steps
            if accelerator.sync_gradients:
                grad_norm = clip_gradients(accelerator, model, optimizer, grad_clip)
                nonfinite = not all_finite(accelerator, step_loss, grad_norm)
            if not nonfinite:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return StepOutcome(step_loss, None if grad_norm is None else float(grad_norm), nonfinite)


def clip_gradients(
    accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float
) -> torch.Tensor | None:
    """Clip with :func:`clip_grad_norm`'s arithmetic; DeepSpeed clips inside its engine with the same arithmetic
    and only reports the norm (None if it has not stepped)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    accelerator.unscale_gradients()  # a no-op unless fp16 loss scaling is on
    return clip_grad_norm(optimizer, grad_clip)


@torch.no_grad()
def validation_loss(
    accelerator: Accelerator, model: torch.nn.Module, samples: PackedSamples, batches: int, micro_batch: int
) -> float:
    """Mean next-token loss over the first ``batches × micro_batch`` validation samples, split over ranks."""
    model.eval()
    total, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    usable = min(batches * micro_batch, len(samples))
    for start in range(accelerator.process_index * micro_batch, usable, micro_batch * accelerator.num_processes):
        inputs, targets = collate(samples, list(range(start, min(start + micro_batch, usable))), accelerator.device)
        total += next_token_loss(model, inputs, targets) * len(inputs)
        count += len(inputs)
    model.train()
    total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
    return (total / count.clamp(min=1)).item()


@torch.no_grad()
def greedy_sample(model: torch.nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
    """A short greedy continuation of ``prompt``: the nanoGPT-style sanity check printed during training."""
    was_training = model.training
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1] :])


# Dense bf16 peak TFLOP/s per device, for MFU when train.peak_tflops is not set (matched in the CUDA device name).
GPU_PEAK_TFLOPS = {"H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}


def peak_tflops(configured: float | None) -> float | None:
    """Peak TFLOP/s of one device: the configured value, else a known GPU's; None (no MFU) on an unknown device."""
    if configured is not None:
        return float(configured)
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return next((peak for key, peak in GPU_PEAK_TFLOPS.items() if key in name), None)
    return None


def zero3_sharded(accelerator: Accelerator) -> bool:
    """Whether parameters are sharded across ranks (ZeRO-3), so one rank alone cannot generate."""
    plugin = accelerator.state.deepspeed_plugin
    return plugin is not None and plugin.zero_stage == 3


def resolve_run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.train.output_dir) / cfg.train.run_name


def run_identity(cfg: DictConfig, geometry: BatchGeometry) -> dict[str, Any]:
    """What a checkpoint must share with the run resuming it."""
    return {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "data": cfg.data.name,
        "seq_len": cfg.train.seq_len,
        "global_batch": geometry.global_batch,
        "seed": cfg.seed,
    }
