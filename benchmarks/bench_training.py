"""Training throughput: tokens/s of mf-nano against pythia-14m with the trainer's default settings.

    python -m benchmarks.bench_training [--quick]

Settings come from ``conf/train/default.yaml`` (sequence 128, micro-batch 8, global batch 16, so two accumulation
micro-steps per optimizer step; fp32 on CPU; AdamW with the model's recommended LR, weight decay groups, gradient
clipping at 1.0, warmup + cosine schedule). One timed call is one optimizer step, built from the trainer's own
pieces (``collate``, ``sample_indices``, ``build_optimization``, ``train_step``). The
batches are random tokens, not the corpus: throughput does not depend on which tokens they are, and the benchmark
then needs no prepared data. The models take turns step by step (:func:`benchmarks.bench_kernels.time_side_by_side`,
warm-up steps excluded).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
from accelerate import Accelerator
from omegaconf import DictConfig

from benchmarks.bench_kernels import summarise, time_side_by_side
from memoryformer.config import compose_config
from memoryformer.data import sample_indices
from memoryformer.models import build_model_from_config
from memoryformer.train.loop import BatchGeometry, build_optimization, collate, train_step

MODEL_PAIR = ("mf-nano", "pythia-14m")
STEPS = 5  # timed optimizer steps per model (after warm-up)
# Quick mode: one layer, a 512-token vocabulary and small batches (seconds, for the tests).
QUICK_OVERRIDES = (
    "model.num_hidden_layers=1",
    "model.vocab_size=512",
    "train.seq_len=32",
    "train.micro_batch=4",
    "train.global_batch=8",
)


def training_step_call(cfg: DictConfig) -> tuple[Callable[[int], object], int]:
    """(fn(step), parameter count): fn runs optimizer step ``step`` of ``cfg.model`` with the trainer's own
    :func:`~memoryformer.train.loop.train_step` on one CPU process, then steps the schedule."""
    tc = cfg.train
    geometry = BatchGeometry(tc.global_batch, tc.micro_batch, world_size=1)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=geometry.accumulation_steps)
    model = build_model_from_config(cfg.model).train()
    optimizer, scheduler = build_optimization(model, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    # Enough random windows of seq_len + 1 tokens for every step time_side_by_side may run (warm-up included).
    windows = torch.randint(
        accelerator.unwrap_model(model).config.vocab_size, ((STEPS + 3) * tc.global_batch, tc.seq_len + 1)
    )

    def step(i: int) -> None:
        micro_batches = (
            collate(windows, indices, accelerator.device)
            for indices in sample_indices(i, geometry.global_batch, geometry.micro_batch, 0, 1)
        )
        train_step(accelerator, model, optimizer, micro_batches, tc.grad_clip)
        scheduler.step()

    return step, sum(p.numel() for p in model.parameters())


def run_training_benchmark(quick: bool) -> dict:
    """Optimizer steps per second and tokens/s of mf-nano vs pythia-14m (JSON-serialisable).

    Schema::

        {
          "config": {"quick": bool, "seq_len": int, "micro_batch": int, "global_batch": int,
                     "accumulation_steps": int, "tokens_per_step": int, "precision": "float32",
                     "data": "random tokens", "overrides": [str]},
          "results": [{"model": str, "parameters": int, <summary of one optimizer step; tokens_per_s>}],
          "ratio": float   # memoryformer tokens/s / pythia tokens/s
        }
    """
    overrides = list(QUICK_OVERRIDES) if quick else []
    configs = {name: compose_config([f"model={name}", *overrides]) for name in MODEL_PAIR}
    tc = configs[MODEL_PAIR[0]].train
    if tc.mixed_precision not in ("auto", "no"):  # auto is fp32 on CPU (memoryformer.train.loop.make_accelerator)
        raise ValueError(f"train.mixed_precision={tc.mixed_precision!r}: this benchmark measures the fp32 CPU default")
    geometry = BatchGeometry(tc.global_batch, tc.micro_batch, world_size=1)
    tokens_per_step = tc.global_batch * tc.seq_len
    calls, parameters = {}, {}
    for name, cfg in configs.items():
        calls[name], parameters[name] = training_step_call(cfg)
    timings = time_side_by_side(calls, seconds=0.0, max_repeats=STEPS)
    results = [
        {"model": name, "parameters": parameters[name], **summarise(timings[name], tokens_per_step)}
        for name in MODEL_PAIR
    ]
    return {
        "config": {
            "quick": quick,
            "seq_len": tc.seq_len,
            "micro_batch": tc.micro_batch,
            "global_batch": tc.global_batch,
            "accumulation_steps": geometry.accumulation_steps,
            "tokens_per_step": tokens_per_step,
            "precision": "float32",
            "data": "random tokens",
            "overrides": overrides,
        },
        "results": results,
        "ratio": results[0]["tokens_per_s"] / results[1]["tokens_per_s"],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one-layer models and small batches (seconds)")
    print(json.dumps(run_training_benchmark(parser.parse_args().quick), indent=1))
