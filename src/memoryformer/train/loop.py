"""The pretraining loop (spec §4's recipe) on Accelerate: one code path from a laptop CPU to DeepSpeed ZeRO.

Launch with plain ``python`` (one process), ``torchrun`` (multi-CPU over gloo, or DDP on GPUs) or
``accelerate launch --config_file conf/accelerate/<setup>.yaml`` (multi-GPU, DeepSpeed, multi-node). Data position,
optimizer, scheduler and RNG are all restored on ``train.resume=auto``; the step number alone fixes which samples
come next (:func:`memoryformer.data.sample_indices`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType, parse_flag_from_env, set_seed
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from memoryformer.data import PackedSamples, build_datasets, load_tokenizer, sample_indices
from memoryformer.flops import model_flops_per_token
from memoryformer.models.registry import build_model_from_model_config, model_config_from_config, recommended_lr
from memoryformer.reporting import write_text_atomic
from memoryformer.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from memoryformer.train.optim import OptimizerSettings, build_optimizer, build_scheduler, clip_grad_norm


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


def learning_rates(cfg: DictConfig) -> tuple[float, float]:
    """(peak, final) LR: ``train.lr`` / ``train.min_lr``, defaulting to the model's (spec §4 tables)."""
    default_lr, default_min_lr = recommended_lr(cfg.model.name)
    lr, min_lr = cfg.train.lr, cfg.train.min_lr
    return (default_lr if lr is None else lr), (default_min_lr if min_lr is None else min_lr)


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


def train_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    grad_clip: float,
) -> tuple[torch.Tensor, float | None]:
    """One optimizer step over ``accelerator.gradient_accumulation_steps`` micro-batches, clipped.

    Returns this rank's mean micro-batch loss and the gradient norm before clipping (None under DeepSpeed, which
    clips inside its engine). The schedule is stepped by the caller.
    """
    step_loss = torch.zeros((), device=accelerator.device)
    grad_norm = None
    for inputs, targets in micro_batches:
        with accelerator.accumulate(model):
            loss = next_token_loss(model, inputs, targets)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                grad_norm = clip_gradients(accelerator, model, optimizer, grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step_loss += loss.detach() / accelerator.gradient_accumulation_steps
    return step_loss, None if grad_norm is None else float(grad_norm)


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


def truncate_metrics(metrics_path: Path, last_step: int) -> None:
    """Drop logged records after ``last_step`` (a resumed run logs those steps again)."""
    if not metrics_path.is_file():
        return
    lines = metrics_path.read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["step"] <= last_step]
    if len(kept) != len(lines):
        write_text_atomic(metrics_path, "".join(line + "\n" for line in kept))


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


def pretrain(cfg: DictConfig) -> Path:
    """Train ``cfg.model`` on ``cfg.data`` with ``cfg.train``; returns the run directory.

    The run directory holds ``checkpoints/``, the final Hugging Face model in ``model/`` (with its tokenizer),
    ``config.yaml``, ``metrics.jsonl`` and, when evaluated, ``eval/``. ``<output_dir>/LATEST`` names its model.
    """
    tc = cfg.train
    run_dir = resolve_run_dir(cfg)
    model_config = model_config_from_config(cfg.model)  # a bad model config fails here, before any data work
    accelerator, geometry = make_accelerator(tc, run_dir)
    configure_deepspeed(accelerator, geometry, tc.grad_clip)
    set_seed(cfg.seed)

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    train_samples, valid_samples = build_datasets(
        cfg.data, tc.seq_len, cfg.seed, show_progress=accelerator.is_main_process
    )
    model = build_model_from_model_config(model_config)
    optimizer, scheduler = build_optimization(model, cfg)
    lr, min_lr = learning_rates(cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    identity = run_identity(cfg, geometry)
    checkpoints_dir = run_dir / "checkpoints"
    start_step = 0
    if tc.resume != "never":
        checkpoint = latest_checkpoint(checkpoints_dir) if tc.resume == "auto" else Path(tc.resume)
        if checkpoint is not None:
            start_step = load_checkpoint(accelerator, checkpoint, identity)["step"]
            accelerator.print(f"resumed from {checkpoint} at step {start_step}")

    params = sum(p.numel() for p in accelerator.unwrap_model(model).parameters())
    flops_per_token = model_flops_per_token(accelerator.unwrap_model(model).config, tc.seq_len)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    if tc.tracker == "wandb":
        tracker_config = {
            **OmegaConf.to_container(cfg, resolve=True),
            "parameters": params,
            "flops_per_token": flops_per_token,
        }
        wandb_kwargs = {"name": tc.run_name, "dir": str(run_dir), "mode": tc.wandb.mode, "group": tc.wandb.group}
        accelerator.init_trackers(tc.wandb.project, config=tracker_config, init_kwargs={"wandb": wandb_kwargs})
    accelerator.print(
        f"{cfg.model.name}: {params:,} parameters, {flops_per_token / 1e6:.1f} MFLOPs/token; "
        f"{geometry.global_batch}×{tc.seq_len} tokens per step = {geometry.world_size} ranks × "
        f"{geometry.accumulation_steps} micro-steps × {tc.micro_batch}; lr {lr:g} → {min_lr:g}"
    )

    device_peak = peak_tflops(tc.peak_tflops)
    metrics_path = run_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        truncate_metrics(metrics_path, start_step)  # steps after the resumed checkpoint are about to be redone
    tokens_per_step = geometry.global_batch * tc.seq_len
    progress = tqdm(total=tc.max_steps, initial=start_step, disable=not accelerator.is_main_process, dynamic_ncols=True)
    model.train()
    tick = time.perf_counter()
    for step in range(start_step, tc.max_steps):
        micro_batches = (
            collate(train_samples, indices, accelerator.device)
            for indices in sample_indices(
                step, geometry.global_batch, tc.micro_batch, accelerator.process_index, geometry.world_size
            )
        )
        step_loss, grad_norm = train_step(accelerator, model, optimizer, micro_batches, tc.grad_clip)
        scheduler.step()
        done = step + 1
        loss_value = accelerator.reduce(step_loss, "mean").item()
        elapsed, tick = time.perf_counter() - tick, time.perf_counter()
        tflops = 3 * flops_per_token * tokens_per_step / elapsed / 1e12  # forward + backward ≈ 3× forward
        record = {
            "step": done,
            "loss": loss_value,
            "lr": scheduler.get_last_lr()[0],
            "tokens": done * tokens_per_step,
            "tokens_per_s": tokens_per_step / elapsed,
            "tflops": tflops,
            "mfu": None if device_peak is None else tflops / (device_peak * geometry.world_size),
            "grad_norm": grad_norm,
        }
        if done % tc.eval_every == 0 or done == tc.max_steps:
            record["val_loss"] = validation_loss(accelerator, model, valid_samples, tc.eval_batches, tc.micro_batch)
            record["val_ppl"] = math.exp(min(record["val_loss"], 50))
            if tc.sample_tokens and accelerator.is_main_process and not zero3_sharded(accelerator):
                text = greedy_sample(accelerator.unwrap_model(model), tokenizer, tc.sample_prompt, tc.sample_tokens)
                progress.write(f"step {done} val_loss {record['val_loss']:.3f} sample: {tc.sample_prompt!r} → {text!r}")
                record["sample"] = text
        progress.set_postfix(loss=f"{loss_value:.3f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        progress.update(1)
        if done % tc.log_every == 0 or "val_loss" in record:
            accelerator.log({k: v for k, v in record.items() if k != "sample" and v is not None}, step=done)
            if accelerator.is_main_process:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
        if done % tc.checkpoint_every == 0 or done == tc.max_steps:
            save_checkpoint(accelerator, checkpoints_dir, done, {**identity, "step": done}, tc.keep_checkpoints)
    progress.close()

    model_dir = run_dir / "model"
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        save_final_model(unwrapped, tokenizer, model_dir, Path(tc.output_dir))
    accelerator.wait_for_everyone()
    if tc.eval_at_end and accelerator.is_main_process:
        from memoryformer.evaluation import evaluate_checkpoint

        results = evaluate_checkpoint(
            unwrapped,
            tokenizer=tokenizer,
            tasks=list(cfg.eval.tasks),
            limit=tc.eval_limit,
            output_dir=run_dir / "eval",
            data_dir=Path(cfg.eval.data_dir),
            model_name=cfg.model.name,
        )
        accelerator.log({f"eval/{k}": v for k, v in results.get("summary", {}).items()}, step=tc.max_steps)
    accelerator.end_training()
    return run_dir


def save_final_model(model: torch.nn.Module, tokenizer: Any, model_dir: Path, output_dir: Path) -> None:
    """Hugging Face format (config, safetensors, tokenizer), published atomically; LATEST points at it."""
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if model_dir.exists():
        shutil.rmtree(model_dir)
    tmp.rename(model_dir)
    write_text_atomic(output_dir / "LATEST", f"{model_dir.resolve()}\n")
