"""Nothing lost, nothing silent (issue 12): config validation, the non-finite guard, strict metrics, the run lock,
resume rules and verified checkpoints, each failure of the issue's fault campaign as a test."""

import json
import logging
import math
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from memoryformer.config import compose_config
from memoryformer.locks import LockHeldError
from memoryformer.paths import PROJECT_ROOT
from memoryformer.train import NonFiniteTrainingError, pretrain
from memoryformer.train import loop as train_loop
from memoryformer.train.checkpoint import (
    CheckpointError,
    NonFiniteModelError,
    check_finite_parameters,
    checkpoint_name,
    complete_checkpoints,
)
from memoryformer.train.loop import resolve_run_dir
from memoryformer.train.metrics import read_metrics, strict_json
from memoryformer.train.optim import cosine_with_warmup
from memoryformer.train.run_dir import RunDirectoryError, lock_path
from memoryformer.train.settings import ConfigError
from memoryformer.train.trainer import save_final_model


def strict_records(run_dir):
    """metrics.jsonl parsed as strict JSON: a bare NaN/Infinity token fails."""

    def refuse(token):
        raise ValueError(f"non-JSON constant {token}")

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=refuse) for line in lines]


def model_weights(run_dir):
    return load_file(str(run_dir / "model" / "model.safetensors"))


# --- config validation before any work ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lr=0", "train.lr=0: must be a positive number"),
        ("train.checkpoint_every=0", "train.checkpoint_every=0: must be a positive integer"),
        ("train.min_lr=0.1", "train.min_lr=0.1: must not exceed the peak LR"),
        ("train.seq_len=4096", "train.seq_len=4096 exceeds the model's max_position_embeddings=2048"),
        ("train.max_steps=0", "train.max_steps=0: must be a positive integer"),
        ("train.resume=nevr", "train.resume='nevr': must be auto"),
        ("train.allow_changed=[learning_rate]", "train.allow_changed names ['learning_rate']"),
        ("train.overwrite=true", "contradicts train.resume='auto'"),
        ("train.warmup_fraction=1.5", "train.warmup_fraction=1.5: must be in [0, 1)"),
        ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps=0: must be a positive integer"),
    ],
)
def test_bad_config_fails_before_any_work_naming_key_and_example(override, expected, tmp_path):
    cfg = compose_config([f"train.output_dir={tmp_path}", "train.tracker=none", override])
    with pytest.raises(ConfigError) as error:
        pretrain(cfg)
    assert expected in str(error.value) and "e.g. train." in str(error.value)
    assert not any(tmp_path.iterdir()), "nothing may be written before the config is checked"


def test_every_config_problem_is_reported_at_once(tmp_path):
    cfg = compose_config([f"train.output_dir={tmp_path}", "train.lr=0", "train.max_steps=0", "train.eval_every=-1"])
    with pytest.raises(ConfigError) as error:
        pretrain(cfg)
    assert all(key in str(error.value) for key in ("train.lr=0", "train.max_steps=0", "train.eval_every=-1"))


# --- non-finite guard and strict metrics -------------------------------------------------------------------------


def poisoned_loss(monkeypatch, bad_steps, micro_steps_per_step=2):
    """next_token_loss returns NaN on every micro-step of the optimizer steps in ``bad_steps`` (1-based)."""
    original, calls = train_loop.next_token_loss, {"n": 0}

    def loss(model, inputs, targets):
        value = original(model, inputs, targets)
        if not model.training:  # validation
            return value
        calls["n"] += 1
        step = (calls["n"] - 1) // micro_steps_per_step + 1
        return value * float("nan") if step in bad_steps else value

    monkeypatch.setattr(train_loop, "next_token_loss", loss)


def test_nonfinite_steps_are_skipped_then_the_run_stops_naming_the_last_good_checkpoint(
    tiny_train_overrides, monkeypatch
):
    """NaN at step 2 is skipped and training goes on; NaN at steps 5 and 6 (limit 2) stops the run at step 6.

    Nothing non-finite is saved, exported or pointed at; metrics stay strict JSON with null losses.
    """
    poisoned_loss(monkeypatch, bad_steps={2, 5, 6})
    cfg = compose_config([*tiny_train_overrides, "train.max_steps=8", "train.max_nonfinite_steps=2"])
    with pytest.raises(NonFiniteTrainingError, match=r"at step 6.*2 consecutive steps") as error:
        pretrain(cfg)
    run_dir = resolve_run_dir(cfg)
    assert str(run_dir / "checkpoints" / checkpoint_name(3)) in str(error.value)
    assert [p.name for p in complete_checkpoints(run_dir / "checkpoints")] == [checkpoint_name(3)]
    assert not (run_dir / "model").exists() and not (run_dir.parent / "LATEST").exists()
    records = {r["step"]: r for r in strict_records(run_dir)}
    assert list(records) == [1, 2, 3, 4, 5, 6]
    for step in (2, 5, 6):
        assert records[step]["loss"] is None and records[step]["skipped"] is True
    assert math.isfinite(records[3]["loss"]) and "skipped" not in records[3]
    saved = load_file(str(run_dir / "checkpoints" / checkpoint_name(3) / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_under_deepspeed_the_first_nonfinite_step_stops_the_run(tiny_train_overrides, monkeypatch):
    """DeepSpeed's engine steps inside backward, so the update cannot be skipped: stop at once (the branch is
    chosen by updates_inside_backward; real ZeRO runs are in tests/test_distributed.py)."""
    from memoryformer.train import trainer

    poisoned_loss(monkeypatch, bad_steps={2})
    monkeypatch.setattr(trainer, "updates_inside_backward", lambda accelerator: True)
    cfg = compose_config([*tiny_train_overrides, "train.max_steps=3", "train.checkpoint_every=1"])
    with pytest.raises(NonFiniteTrainingError, match=r"at step 2.*DeepSpeed applied the update.*step-00000001"):
        pretrain(cfg)
    assert [p.name for p in complete_checkpoints(resolve_run_dir(cfg) / "checkpoints")] == [checkpoint_name(1)]


def test_metrics_are_strict_json_and_a_torn_last_line_is_dropped(tmp_path, caplog):
    assert strict_json({"step": 1, "loss": float("nan"), "g": float("inf")}) == '{"step": 1, "loss": null, "g": null}'
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    with caplog.at_level(logging.WARNING):
        assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert "torn last line 3" in caplog.text
    path.write_text('{"step": 1}\n{"step": 2, oops\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_metrics(path)


def test_resume_after_a_torn_metrics_line(tiny_train_overrides):
    cfg = compose_config(tiny_train_overrides)
    run_dir = pretrain(cfg)
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 7, "loss"')  # a write cut short by a kill
    pretrain(compose_config([*tiny_train_overrides, "train.max_steps=7", "train.allow_changed=[max_steps]"]))
    assert [r["step"] for r in strict_records(run_dir)] == [1, 2, 3, 4, 5, 6, 7]


def test_nonfinite_models_are_neither_exported_nor_evaluated(tmp_path, shared_data):
    from memoryformer.data import load_tokenizer
    from memoryformer.evaluation import evaluate_checkpoint
    from memoryformer.models import build_model

    model = build_model("mf-nano", num_hidden_layers=1, vocab_size=512, tau=4)
    check_finite_parameters(model)
    with torch.no_grad():
        model.model.embed_tokens.weight[3, 0] = float("nan")
    with pytest.raises(NonFiniteModelError, match="embed_tokens"):
        save_final_model(model, None, tmp_path / "model", tmp_path)
    assert not any(tmp_path.iterdir())  # neither the model nor LATEST
    tokenizer = load_tokenizer(shared_data / "tokenizers" / "gpt-neox-20b")
    with pytest.raises(NonFiniteModelError, match="non-finite parameters"):
        evaluate_checkpoint(model, tasks=["wsc"], limit=1, tokenizer=tokenizer, output_dir=tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


# --- one writer per run directory --------------------------------------------------------------------------------


def test_a_second_run_into_a_locked_run_directory_is_refused_naming_the_holder(tiny_train_overrides):
    cfg = compose_config(tiny_train_overrides)
    run_dir = resolve_run_dir(cfg)
    holder_code = (
        "import sys, time; from memoryformer.locks import exclusive\n"
        f"with exclusive({str(lock_path(run_dir))!r}, blocking=False):\n"
        "    print('locked', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", holder_code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        with pytest.raises(LockHeldError, match=rf"held by pid {holder.pid} on .*choose another train.run_name"):
            pretrain(cfg)
        assert time.monotonic() - started < 10, "refused at once, not after data preparation"
        assert not run_dir.exists()
    finally:
        holder.kill()
        holder.wait()
    assert (pretrain(cfg) / "model").is_dir()  # the lock died with its holder


# --- resume rules -------------------------------------------------------------------------------------------------


def test_resume_never_on_an_existing_run_is_refused_unless_overwrite_moves_it_aside(tiny_train_overrides):
    short = [*tiny_train_overrides, "train.max_steps=3"]
    first = pretrain(compose_config(short))
    first_id = json.loads((first / "run.json").read_text())["run_id"]
    with pytest.raises(RunDirectoryError, match=r"train\.overwrite=true"):
        pretrain(compose_config([*short, "train.resume=never", "train.lr=1e-3"]))
    assert json.loads((first / "run.json").read_text())["run_id"] == first_id  # untouched

    second = pretrain(compose_config([*short, "train.resume=never", "train.overwrite=true", "train.lr=1e-3"]))
    assert second == first
    (aside,) = first.parent.glob(f"{first.name}.old-*")
    assert json.loads((aside / "run.json").read_text())["run_id"] == first_id
    assert (aside / "checkpoints" / checkpoint_name(3)).is_dir()  # the old run is kept whole
    state = json.loads((second / "checkpoints" / checkpoint_name(3) / "trainer_state.json").read_text())
    assert state["run_id"] != first_id and state["optimisation"]["lr"] == 1e-3
    assert (first.parent / "LATEST").read_text().strip() == str((second / "model").resolve())


def test_resume_with_changed_settings_is_refused_with_the_diff_or_rebuilds_the_schedule(tiny_train_overrides):
    base = [*tiny_train_overrides, "train.min_lr=1e-5", "train.warmup_fraction=0"]
    run_dir = pretrain(compose_config([*base, "train.max_steps=3"]))
    changed = [*base, "train.max_steps=6", "train.lr=1e-3"]
    with pytest.raises(ConfigError, match=r"train.lr: 0.003 → 0.001, train.max_steps: 3 → 6") as error:
        pretrain(compose_config(changed))
    assert "train.allow_changed=[lr,max_steps]" in str(error.value)
    with pytest.raises(ConfigError, match=r"allow_changed=\[max_steps\]"):
        pretrain(compose_config([*changed, "train.allow_changed=[lr]"]))

    pretrain(compose_config([*changed, "train.allow_changed=[lr,max_steps]"]))
    records = strict_records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for record in records[3:]:  # the new schedule from the new values, not a hybrid with the old base LR
        assert record["lr"] == pytest.approx(cosine_with_warmup(record["step"], 6, 0, 1e-3, 1e-5), rel=1e-9)
    history = sorted((run_dir / "config_history").iterdir())
    assert len(history) == 2 and "changed: train.lr: 0.003 → 0.001" in history[1].read_text()
    assert "lr: 0.001" in (run_dir / "config.yaml").read_text()


# --- verified checkpoints ------------------------------------------------------------------------------------------


def overwrite_inside(path):
    """Same size, other bytes: what silent disk or copy corruption looks like."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = b"\x7f" * 64
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "corrupt",
    [pytest.param(overwrite_inside, id="overwritten"), pytest.param(truncate, id="truncated", marks=pytest.mark.slow)],
)
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(corrupt, tiny_train_overrides, caplog):
    cfg = compose_config(tiny_train_overrides)
    run_dir = pretrain(cfg)
    finished = model_weights(run_dir)
    newest = run_dir / "checkpoints" / checkpoint_name(6)
    corrupt(newest / "model.safetensors")
    with caplog.at_level(logging.WARNING):
        pretrain(cfg)
    assert f"resumed from {run_dir / 'checkpoints' / checkpoint_name(3)} instead of the newer step-00000006" in (
        caplog.text
    )
    assert (run_dir / "checkpoints" / f".corrupt-{checkpoint_name(6)}").is_dir()
    resumed = model_weights(run_dir)
    for name, tensor in finished.items():  # redone from step 3: bitwise the same run
        assert torch.equal(resumed[name], tensor), name


def test_no_intact_checkpoint_is_a_clear_error(tiny_train_overrides):
    cfg = compose_config([*tiny_train_overrides, "train.max_steps=3"])
    run_dir = pretrain(cfg)
    truncate(run_dir / "checkpoints" / checkpoint_name(3) / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint.*train.resume=never train.overwrite=true"):
        pretrain(cfg)


def test_checkpoints_of_another_run_are_never_resumed(tiny_train_overrides, tmp_path):
    import shutil

    cfg = compose_config([*tiny_train_overrides, "train.max_steps=3"])
    other = pretrain(compose_config([*tiny_train_overrides, "train.max_steps=3", f"train.output_dir={tmp_path / 'o'}"]))
    run_dir = pretrain(cfg)
    shutil.copytree(other / "checkpoints" / checkpoint_name(3), run_dir / "checkpoints" / checkpoint_name(9))
    with pytest.raises(CheckpointError, match=r"holds checkpoints of another run: step-00000009"):
        pretrain(compose_config([*tiny_train_overrides, "train.max_steps=12", "train.allow_changed=[max_steps]"]))


# --- console, log file, Hydra's files --------------------------------------------------------------------------------


def test_console_shows_what_a_user_needs_and_the_log_file_keeps_everything(tmp_path, capsys):
    from memoryformer.train.run_log import run_logging

    records = [
        ("accelerate.checkpointing", logging.INFO, "Model weights saved in step-3", False),
        ("DeepSpeed", logging.WARNING, "Setting accelerator to CPU. If you have GPU or other accelerator", False),
        ("lm_eval.evaluator", logging.WARNING, "Overwriting default num_fewshot of wsc from None to 0", False),
        ("some.library", logging.WARNING, "a warning that matters", True),
        ("memoryformer.train.trainer", logging.INFO, "resumed from step-3", True),
    ]
    with run_logging(tmp_path / "train.log"):
        for name, level, message, _ in records:
            logging.getLogger(name).log(level, message)
    console, log_file = capsys.readouterr().err, (tmp_path / "train.log").read_text()
    for _, _, message, shown in records:
        assert (message in console) == shown, message
        assert message in log_file
    logging.getLogger("memoryformer.train.trainer").warning("after the run")
    assert "after the run" not in (tmp_path / "train.log").read_text()  # handlers removed on exit


def test_a_bad_command_fails_at_once_and_hydra_leaves_no_outputs_folder(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(PROJECT_ROOT / "scripts" / "pretrain.py"),
            "train.lr=0",
            f"train.output_dir={tmp_path / 'runs'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "train.lr=0: must be a positive number" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.startswith("error: ")
    assert list(tmp_path.iterdir()) == [], "no outputs/<date>/<time>/, .hydra/ or log file left behind"
