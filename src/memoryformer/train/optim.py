"""The optimisation recipe of spec §4: AdamW with decay groups, linear warmup then cosine decay."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from memoryformer.layers import MemoryLayer


@dataclass(frozen=True)
class OptimizerSettings:
    """Pythia's AdamW settings; ``table_lr_multiplier`` scales the LR of Memory Layer tables only."""

    lr: float
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    table_lr_multiplier: float = 1.0


def parameter_groups(model: nn.Module, settings: OptimizerSettings) -> list[dict]:
    """AdamW groups: decay on tables, embeddings and dense weights; none on biases and norm parameters.

    Decay follows tensor rank (≥ 2-D decays), which puts every bias and norm scale/shift in the no-decay group;
    Memory Layer tables form their own group so their LR can be scaled (their gradients are sparse, spec §4).
    """
    table_ids = {id(m.tables) for m in model.modules() if isinstance(m, MemoryLayer)}
    tables, decay, no_decay = [], [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if id(param) in table_ids:
            tables.append(param)
        elif param.ndim >= 2:
            decay.append(param)
        else:
            no_decay.append(param)
    groups = [
        {"params": decay, "weight_decay": settings.weight_decay, "lr_scale": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
        {"params": tables, "weight_decay": settings.weight_decay, "lr_scale": settings.table_lr_multiplier},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, settings: OptimizerSettings) -> torch.optim.AdamW:
    """torch's AdamW over :func:`parameter_groups` (also DeepSpeed's client optimizer: no extra JIT build)."""
    groups = parameter_groups(model, settings)
    for group in groups:
        group["lr"] = settings.lr * group["lr_scale"]
    # fused: one kernel for all parameters (CPU and CUDA); the per-tensor loop costs seconds per step at 50k vocab
    return torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas, eps=settings.eps, fused=True)


@torch.no_grad()
def clip_grad_norm(optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
    """Scale the gradients to a global L2 norm of at most ``max_norm``; returns the norm before clipping.

    DeepSpeed ZeRO's arithmetic (``deepspeed/runtime/zero/stage_1_and_2.py``: ``get_grad_norm_direct``,
    ``combine_grad_norm_groups``, ``unscale_and_clip_grads``), so the plain trainer and ZeRO clip identically:
    per-tensor norms accumulated in fp64, squared and summed per optimizer group, rounded to fp32, groups combined
    by L2, then every gradient multiplied by ``1 / max(1, (norm + 1e-6) / max_norm)``. Beyond agreement, fp64
    matters: torch's fp32 norm of mf-nano's gradients is ~4e-5 off (issue 14). A non-finite norm is returned as is.
    """
    grads_by_group = [[p.grad for p in group["params"] if p.grad is not None] for group in optimizer.param_groups]
    group_norms = [
        torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads]).pow(2).sum().float().pow(0.5)
        for grads in grads_by_group
        if grads
    ]
    if not group_norms:
        return torch.zeros(())
    total_norm = torch.linalg.vector_norm(torch.stack(group_norms))
    scale = 1.0 / torch.clamp((total_norm + 1e-6) / max_norm, min=1.0)
    for grads in grads_by_group:
        for grad in grads:
            grad.mul_(scale)
    return total_norm


def cosine_with_warmup(step: int, max_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Pythia's schedule: linear warmup from 0 over ``warmup_steps``, then cosine from ``lr`` to ``min_lr``."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, max_steps: int, warmup_steps: int, lr: float, min_lr: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR (checkpointable state) applying :func:`cosine_with_warmup` relative to each group's base LR."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_with_warmup(step, max_steps, warmup_steps, lr, min_lr) / lr
    )
