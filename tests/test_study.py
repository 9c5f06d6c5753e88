"""The reproduction study (issue 13): its presets plan the intended runs, it skips finished runs, continues an
interrupted study with the next unfinished run, records and retries failures, refuses a run directory trained with
other settings, and reports with intervals, the command, commit, machine and wall time."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf

from memoryformer.cli import USER_ERRORS
from memoryformer.config import compose_config
from memoryformer.paths import PROJECT_ROOT, shared_data_dir
from memoryformer.sources import MissingInputError
from memoryformer.sweeps import FAILED_FILE
from memoryformer.sweeps.study import (
    StudyError,
    check_study_inputs,
    load_study,
    plan_study,
    read_ledger,
    run_study,
    write_study_report,
)

TINY_STEPS = 6


def tiny_study(tmp_path, recipe, seeds=(1, 2)):
    """The CPU preset's comparisons on a tiny recipe, two seeds, everything under ``tmp_path``."""
    return load_study(
        "cpu",
        [
            f"output_dir={tmp_path / 'runs'}",
            f"report_dir={tmp_path / 'report'}",
            f"seeds=[{','.join(map(str, seeds))}]",
            f"recipe=[{','.join(recipe)}]",
        ],
    )


FINAL_LOSS = {"pythia-14m": 6.0, "mf-nano": 5.5, "mf-nano-e0": 5.8}  # per configuration, + 0.01 × seed


class FakeTrainer:
    """Stands in for ``scripts/pretrain.py``: writes what a finished run leaves (config, metrics, model/) with a
    final validation loss per configuration, and can fail or be interrupted on a chosen call."""

    def __init__(self, interrupt_at=None, fail=()):
        self.calls, self.interrupt_at, self.fail = [], interrupt_at, set(fail)

    def __call__(self, launcher, overrides):
        cfg = compose_config(list(overrides))
        name = cfg.train.run_name
        self.calls.append(name)
        run_dir = os.path.join(cfg.train.output_dir, name)
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(OmegaConf.to_yaml(cfg, resolve=True))
        configuration = name.rsplit("-seed", 1)[0]
        loss = FINAL_LOSS[configuration] + 0.01 * (cfg.seed % 7)
        records = [{"step": s, "tokens": s * 256, "val_loss": loss + (TINY_STEPS - s) * 0.1} for s in (3, 6)]
        if len(self.calls) == self.interrupt_at:  # killed after its first checkpoint: half its metrics, no model
            records = records[:1]
        with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(record | {"val_ppl": math.exp(record["val_loss"])}) + "\n" for record in records)
        if len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        if name in self.fail:
            return 1
        os.makedirs(os.path.join(run_dir, "model"), exist_ok=True)
        return 0


FAKE_RECIPE = ["data=sample", f"train.max_steps={TINY_STEPS}", "train.eval_at_end=false"]


def test_presets_plan_three_configurations_times_three_seeds():
    for preset in ("cpu", "gpu"):
        study = load_study(preset)
        plan = plan_study(study)
        assert len(plan) == 3 * len(study.configurations) and list(study.seeds) == [1234, 1235, 1236]
        assert [run.seed for run in plan[: len(study.configurations)]] == [1234] * len(study.configurations)
        for run in plan:  # the runs compose, and carry their seed in their name and config
            cfg = compose_config(list(run.overrides))
            assert cfg.seed == run.seed and cfg.train.run_name == f"{run.configuration}-seed{run.seed}"
            assert cfg.train.wandb.group == f"study-{preset}-{run.configuration}"  # seeds as runs of one group
    cpu = {run.configuration: compose_config(list(run.overrides)) for run in plan_study(load_study("cpu"))}
    assert cpu["mf-nano"].model.expand_bits is None and cpu["mf-nano-e0"].model.expand_bits == 0
    assert {cfg.train.max_steps for cfg in cpu.values()} == {300}  # the same tokens for every model
    assert {cfg.data.name for cfg in cpu.values()} == {"sample"}
    with pytest.raises(StudyError, match="no study preset"):
        load_study("laptop")
    with pytest.raises(StudyError, match="unknown configurations"):
        load_study("cpu", ["comparisons.headline.configurations=[pythia-14m,mf-huge]"])


def test_interrupted_study_continues_with_the_next_unfinished_run(tmp_path):
    study = tiny_study(tmp_path, FAKE_RECIPE)
    order = [run.name for run in plan_study(study)]
    assert order[:3] == ["pythia-14m-seed1", "mf-nano-seed1", "mf-nano-e0-seed1"]  # seed by seed

    first = FakeTrainer(interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_study(study, launch=first, command="study")
    assert first.calls == order[:3]
    ledger = read_ledger(tmp_path / "runs")
    assert [(r["run"], r["status"]) for r in ledger] == [
        (order[0], "done"),
        (order[1], "done"),
        (order[2], "interrupted"),
    ]
    partial = write_study_report(study, "study")  # a report of what finished so far
    assert partial["finished"] == 2 and "mf-nano-e0-seed1 (incomplete)" in partial["paths"]["markdown"].read_text()

    second = FakeTrainer()
    outcome = run_study(study, launch=second, command="study")
    assert second.calls == order[2:]  # the interrupted run first, then the rest; finished runs skipped
    assert outcome["skipped"] == order[:2] and outcome["trained"] == order[2:]
    attempts = [r for r in read_ledger(tmp_path / "runs") if r["run"] == order[2]]
    assert [(r["status"], r["resumed"]) for r in attempts] == [("interrupted", False), ("done", True)]

    third = FakeTrainer()
    assert run_study(study, launch=third)["skipped"] == order and third.calls == []  # nothing left to do


def test_failed_runs_are_recorded_reported_and_retried(tmp_path):
    study = tiny_study(tmp_path, FAKE_RECIPE)
    outcome = run_study(study, launch=FakeTrainer(fail={"mf-nano-seed2"}), max_runs=5, command="study")
    assert outcome["failed"] == ["mf-nano-seed2"] and outcome["left"] == ["mf-nano-e0-seed2"]
    assert "exited with status 1" in (tmp_path / "runs" / "mf-nano-seed2" / FAILED_FILE).read_text()
    report = write_study_report(study, "make study")
    markdown = report["paths"]["markdown"].read_text()
    assert "mf-nano-seed2 (failed: scripts/pretrain.py exited with status 1" in markdown  # listed, not averaged
    assert "seed 2 (not started)" in markdown
    headline = [row for row in report["rows"] if row["comparison"] == "headline"]
    assert [(row["configuration"], row["seeds_done"]) for row in headline] == [("pythia-14m", 2), ("mf-nano", 1)]
    assert headline[1]["val_loss_mean"] == pytest.approx(5.51)  # seed 1 only: 5.5 + 0.01

    retry = FakeTrainer()
    outcome = run_study(study, launch=retry)
    assert (
        retry.calls == ["mf-nano-seed2", "mf-nano-e0-seed2"]
        and not (tmp_path / "runs" / "mf-nano-seed2" / FAILED_FILE).exists()
    )
    report = write_study_report(study, "make study")
    assert report["finished"] == report["expected"] == 6
    headline = [row for row in report["rows"] if row["comparison"] == "headline"]
    assert headline[1]["val_loss_mean"] == pytest.approx(5.515) and headline[1]["beyond_noise_vs_prev"] is True
    markdown = report["paths"]["markdown"].read_text()
    for fact in ("`make study`", "**Commit(s)**", "**Machine**", "**Wall time**", "Welch", "Table 5"):
        assert fact in markdown
    assert report["paths"]["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "report" / "study.csv").read_text().startswith("comparison,configuration,")


def test_each_run_records_the_commit_it_ran_on(tmp_path, monkeypatch):
    """The checkout can move while a long study runs: the ledger and the report name each run's own commit. A
    study stopped before it reached a configuration still reports (`make study ARGS="--max-runs 2"`)."""
    from memoryformer.sweeps import study as study_module

    commits = iter(f"c{i:011d}" for i in range(100))
    monkeypatch.setattr(study_module, "git_commit", lambda: next(commits))
    study = tiny_study(tmp_path, FAKE_RECIPE, seeds=(1,))
    run_study(study, launch=FakeTrainer(), max_runs=2)
    assert [record["commit"] for record in read_ledger(study.output_dir)] == ["c00000000000", "c00000000001"]
    markdown = write_study_report(study, "make study")["paths"]["markdown"].read_text()
    assert "**Commit(s)**: c00000000000, c00000000001" in markdown
    assert "seed 1 (not started)" in markdown  # mf-nano-e0, which the two runs did not reach, is listed, not averaged


def test_missing_inputs_stop_the_study_before_any_run(tmp_path, monkeypatch):
    """Offline with no local data, `make study` stops with the one message a run would give, before launching
    any of its runs (which would otherwise each fail alike); with the inputs present it passes."""
    study = tiny_study(tmp_path, FAKE_RECIPE, seeds=(1,))
    if shared_data_dir().is_dir():
        check_study_inputs(study)
    for variable, directory in (("MEMORYFORMER_DATA", "data"), ("MEMORYFORMER_CACHE", "cache")):
        (tmp_path / directory).mkdir()
        monkeypatch.setenv(variable, str(tmp_path / directory))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingInputError, match=r"(?s)tokenizer.*ways out") as missing:
        check_study_inputs(study)
    assert isinstance(missing.value, USER_ERRORS)
    assert not (tmp_path / "runs").exists()


def test_a_run_trained_with_other_settings_is_refused_before_anything_trains(tmp_path):
    run_study(tiny_study(tmp_path, FAKE_RECIPE, seeds=(1,)), launch=FakeTrainer())
    changed = tiny_study(tmp_path, [*FAKE_RECIPE[:1], "train.max_steps=12", *FAKE_RECIPE[2:]], seeds=(1,))
    trainer = FakeTrainer()
    with pytest.raises(StudyError, match=r"other settings .*train\.max_steps: 6 → 12"):
        run_study(changed, launch=trainer)
    assert trainer.calls == []


@pytest.mark.slow
def test_study_script_resumes_real_training_after_sigint(tiny_train_overrides, tmp_path):
    """End to end on a tiny recipe: scripts/study.py trains real runs in subprocesses; Ctrl-C during the second run
    stops it after a checkpoint; the rerun skips the first run, resumes the second and trains the rest."""
    recipe = [o for o in tiny_train_overrides if not o.startswith(("model=", "train.output_dir", "train.max_steps"))]
    recipe += ["train.max_steps=12", "train.checkpoint_every=3"]
    preset = tmp_path / "tiny.yaml"
    preset.write_text(
        OmegaConf.to_yaml(
            {
                "name": "tiny",
                "title": "tiny study",
                "seeds": [1, 2],
                "output_dir": str(tmp_path / "runs"),
                "report_dir": str(tmp_path / "report"),
                "recipe": recipe,
                "configurations": {"e2": ["model=mf-nano"], "e0": ["model=mf-nano", "model.expand_bits=0"]},
                "comparisons": {"bits": {"title": "e0 vs e2", "configurations": ["e0", "e2"]}},
            }
        )
    )
    command = [sys.executable, str(PROJECT_ROOT / "scripts" / "study.py"), "--preset", str(preset)]
    env = os.environ | {"WANDB_MODE": "disabled"}
    # As in a terminal: a shell that starts a job in the background (nohup make test &) has it ignore SIGINT, and
    # Python keeps an ignored SIGINT ignored, so the study would never see this Ctrl-C.
    first = subprocess.Popen(
        command,
        cwd=PROJECT_ROOT,
        env=env,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    checkpoint = tmp_path / "runs" / "e0-seed1" / "checkpoints"
    deadline = time.monotonic() + 900
    while not (checkpoint.is_dir() and any(p.name.startswith("step-") for p in checkpoint.iterdir())):
        assert first.poll() is None and time.monotonic() < deadline, "the study ended before its second run"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGINT)  # Ctrl-C: the study and its training process
    assert first.wait(timeout=120) != 0
    assert [(r["run"], r["status"]) for r in read_ledger(tmp_path / "runs")] == [
        ("e2-seed1", "done"),
        ("e0-seed1", "interrupted"),
    ]

    second = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout + second.stderr  # the interrupted run continued from its checkpoint
    ledger = read_ledger(tmp_path / "runs")
    assert [r["run"] for r in ledger] == ["e2-seed1", "e0-seed1", "e0-seed1", "e2-seed2", "e0-seed2"]
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "e0-seed1" / "metrics.jsonl").open()]
    assert [record["step"] for record in metrics] == list(range(1, 13))  # no step lost or logged twice
    rows = list(csv.DictReader((tmp_path / "report" / "study.csv").open()))
    assert [(row["configuration"], row["seeds_done"]) for row in rows] == [("e0", "2"), ("e2", "2")]
