"""Gradient clipping (issue 14): DeepSpeed ZeRO's arithmetic in the plain trainer, checked against float64."""

import pytest
import torch

from memoryformer.train.optim import clip_grad_norm


def optimizer_with_grads(scale: float) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    """Two groups (as the trainer's decay / no-decay groups), one parameter without a gradient."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (3_000_000, 1000, 7)]
    for param in params[:2]:
        param.grad = torch.randn(param.shape, generator=generator) * scale
    optimizer = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}], lr=1e-3)
    return optimizer, [p.grad.clone() for p in params[:2]]


def float64_norm(grads: list[torch.Tensor]) -> float:
    return sum(g.double().pow(2).sum() for g in grads).sqrt().item()


def test_norm_is_accumulated_in_float64_and_gradients_are_scaled_to_the_limit():
    optimizer, grads = optimizer_with_grads(scale=1e-3)
    exact = float64_norm(grads)
    norm = clip_grad_norm(optimizer, max_norm=0.5)
    # fp32 rounding of the fp64 sum only; torch's fp32 accumulation is ~1e-5 off over millions of elements
    assert norm.item() == pytest.approx(exact, rel=2e-7)
    clipped = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    assert float64_norm(clipped) == pytest.approx(0.5, rel=1e-6)
    for before, after in zip(grads, clipped, strict=True):
        torch.testing.assert_close(after, before * (0.5 / exact), rtol=1e-6, atol=0)


def test_gradients_under_the_limit_are_left_as_they_are():
    optimizer, grads = optimizer_with_grads(scale=1e-5)
    norm = clip_grad_norm(optimizer, max_norm=1.0)
    assert norm.item() < 1.0
    clipped = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    for before, after in zip(grads, clipped, strict=True):
        assert torch.equal(after, before)


def test_non_finite_gradients_report_a_non_finite_norm():
    optimizer, _ = optimizer_with_grads(scale=1.0)
    optimizer.param_groups[1]["params"][0].grad[3] = float("nan")
    assert not torch.isfinite(clip_grad_norm(optimizer, max_norm=1.0))
