"""The trainer (spec §4): recipe, determinism, resume, atomic checkpoints and early errors."""

import itertools
import json
import math
import shutil

import pytest
import torch

from memoryformer.config import compose_config
from memoryformer.train import pretrain
from memoryformer.train.loop import resolve_run_dir
from memoryformer.train.optim import OptimizerSettings, cosine_with_warmup, parameter_groups


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_run_trains_and_saves(tiny_train_overrides):
    cfg = compose_config(tiny_train_overrides)
    run_dir = pretrain(cfg)
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.5
    assert all(math.isfinite(m["val_loss"]) for m in metrics if "val_loss" in m)
    assert (run_dir / "model" / "config.json").is_file() and (run_dir / "model" / "tokenizer.json").is_file()
    assert (run_dir.parent / "LATEST").read_text().strip() == str((run_dir / "model").resolve())


def test_same_seed_same_losses(tiny_train_overrides, tmp_path):
    first = read_metrics(pretrain(compose_config(tiny_train_overrides)))
    second_overrides = [*tiny_train_overrides, f"train.output_dir={tmp_path / 'again'}"]
    second = read_metrics(pretrain(compose_config(second_overrides)))
    assert [m["loss"] for m in first] == [m["loss"] for m in second]


def final_parameters(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model" / "model.safetensors"))


def test_resume_equals_straight_run(tiny_train_overrides, tmp_path):
    """6 steps straight == 3 steps, 'killed' (the later checkpoint and model gone), resumed for 3 more."""
    straight = pretrain(compose_config(tiny_train_overrides))
    resumed_overrides = [*tiny_train_overrides, f"train.output_dir={tmp_path / 'resumed'}"]
    interrupted = pretrain(compose_config(resumed_overrides))
    shutil.rmtree(interrupted / "checkpoints" / "step-00000006")
    shutil.rmtree(interrupted / "model")
    resumed = pretrain(compose_config(resumed_overrides))
    assert resumed == interrupted
    straight_params, resumed_params = final_parameters(straight), final_parameters(resumed)
    assert straight_params.keys() == resumed_params.keys()
    for name, value in straight_params.items():
        torch.testing.assert_close(resumed_params[name], value, rtol=1e-5, atol=1e-6, msg=name)
    resumed_metrics = read_metrics(resumed)
    assert [m["step"] for m in resumed_metrics] == [1, 2, 3, 4, 5, 6]  # redone steps are not logged twice
    assert all(m["grad_norm"] > 0 for m in resumed_metrics)
    assert resumed_metrics[-1]["loss"] == pytest.approx(read_metrics(straight)[-1]["loss"], rel=1e-5)


def test_interrupted_checkpoint_is_ignored_by_resume(tiny_train_overrides, monkeypatch):
    """A save killed midway leaves the previous checkpoint loadable, and resume does not pick the partial one."""
    from accelerate import Accelerator

    from memoryformer.train.checkpoint import latest_checkpoint

    original = Accelerator.save_state
    calls = {"n": 0}

    def dies_on_second_save(self, output_dir=None, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            original(self, output_dir, **kwargs)  # files written, then the process "dies" before publishing
            raise KeyboardInterrupt
        return original(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", dies_on_second_save)
    cfg = compose_config(tiny_train_overrides)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg)
    checkpoints = resolve_run_dir(cfg) / "checkpoints"
    assert latest_checkpoint(checkpoints).name == "step-00000003"
    assert any(p.name.startswith(".tmp-") for p in checkpoints.iterdir())
    monkeypatch.setattr(Accelerator, "save_state", original)
    run_dir = pretrain(cfg)  # resumes from step 3 and finishes
    assert [m["step"] for m in read_metrics(run_dir)][-3:] == [4, 5, 6]
    assert not any(p.name.startswith(".tmp-") for p in checkpoints.iterdir())


def test_wandb_offline_run_is_written(tiny_train_overrides, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = pretrain(compose_config([*tiny_train_overrides, "train.tracker=wandb", "train.wandb.mode=offline"]))
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert any(f.suffix == ".wandb" and f.stat().st_size > 0 for f in runs[0].iterdir())


# --- recipe -------------------------------------------------------------------------------------


def test_schedule_warmup_then_cosine_to_min():
    lrs = [cosine_with_warmup(s, max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.55) and lrs[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))


def test_weight_decay_groups():
    from memoryformer.models import build_model

    model = build_model("mf-nano", num_hidden_layers=1, vocab_size=512, tau=4)
    groups = parameter_groups(model, OptimizerSettings(lr=1e-3, table_lr_multiplier=2.0))
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = [{names[id(p)] for p in g["params"]} for g in groups]
    decay, no_decay, tables = by_group
    assert all(n.endswith("tables") for n in tables) and groups[2]["lr_scale"] == 2.0
    assert all("bias" in n or "norm" in n or n.endswith("scale") for n in no_decay)
    assert any("embed" in n for n in decay) and not any(n.endswith("bias") for n in decay | tables)
    assert set().union(*by_group) == set(names.values())


# --- bad input ------------------------------------------------------------------------------------


def test_unknown_model_and_data_names_list_the_options():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="mf-nano"):
        compose_config(["model=mf-huge"])
    with pytest.raises(MissingConfigException, match="sample"):
        compose_config(["data=pile-v2"])


def test_missing_data_path(tiny_train_overrides):
    cfg = compose_config([*tiny_train_overrides, "data.train_files=[/nonexistent/corpus.jsonl]"])
    with pytest.raises(FileNotFoundError, match="nonexistent"):
        pretrain(cfg)


def test_batch_not_divisible():
    cfg = compose_config(["train.global_batch=12", "train.micro_batch=8"])
    with pytest.raises(ValueError, match=r"global_batch=12 must be a positive multiple of train.micro_batch"):
        pretrain(cfg)


def test_resume_from_another_model_is_refused(tiny_train_overrides):
    from memoryformer.train.checkpoint import CheckpointError

    pretrain(compose_config(tiny_train_overrides))
    with pytest.raises(CheckpointError, match="num_hidden_layers"):
        pretrain(compose_config([*tiny_train_overrides, "model.num_hidden_layers=3"]))


def test_pythia_baseline_trains_with_mfu(tiny_train_overrides):
    """The same trainer trains the GPT-NeoX baselines; MFU is logged against the configured peak."""
    overrides = [o for o in tiny_train_overrides if not o.startswith("model.")]
    overrides = [o.replace("model=mf-nano", "model=pythia-14m") for o in overrides]
    cfg = compose_config([*overrides, "model.num_hidden_layers=1", "train.peak_tflops=0.5", "train.max_steps=4"])
    metrics = read_metrics(pretrain(cfg))
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert all(m["mfu"] == pytest.approx(m["tflops"] / 0.5) for m in metrics)
