"""Real processes, real signals (issue 12 items 4, 5): stop requests save and exit with status 75, a second
signal exits at once, and a seeded campaign of kills and corruptions never loses saved work nor resumes from
corrupt, non-finite or foreign state. Each launches scripts/pretrain.py, so all are slow."""

import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from memoryformer.config import compose_config
from memoryformer.train import PREEMPTED_EXIT_CODE, pretrain
from memoryformer.train.checkpoint import (
    STATE_FILE,
    checkpoint_name,
    checkpoint_step,
    complete_checkpoints,
    file_hashes,
)
from memoryformer.train.metrics import read_metrics

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pretrain.py"
TIMEOUT_S = 600
# Short, no validation or samples in between: the stops land on training steps.
QUIET = ["train.eval_every=1000", "train.sample_tokens=0", "train.log_every=1"]


def start(overrides: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, str(SCRIPT), *overrides], cwd=cwd, stdout=out, stderr=out)


def wait_until(condition, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert process.poll() is None, f"the run ended (status {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {TIMEOUT_S} s"
        time.sleep(0.02)


def logged_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1], ids=lambda s: s.name)
def test_a_stop_signal_saves_the_current_step_and_exits_75(stop_signal, tiny_train_overrides, tmp_path):
    common = [*tiny_train_overrides, *QUIET, "train.max_steps=12", "train.checkpoint_every=1000"]
    overrides = [*common, f"train.output_dir={tmp_path / 'stopped'}"]
    run_dir = tmp_path / "stopped" / "mf-nano-tiny"
    process = start(overrides, tmp_path, tmp_path / "out.log")
    wait_until(lambda: (run_dir / "metrics.jsonl").is_file() and logged_steps(run_dir), process, "a first step")
    process.send_signal(stop_signal)
    assert process.wait(timeout=TIMEOUT_S) == PREEMPTED_EXIT_CODE, (tmp_path / "out.log").read_text()[-4000:]

    stopped_at = logged_steps(run_dir)[-1]
    assert stopped_at < 12, "the run was not stopped midway"
    output = (tmp_path / "out.log").read_text()
    assert f"stopped by {stop_signal.name} after step {stopped_at}" in output
    assert [p.name for p in complete_checkpoints(run_dir / "checkpoints")] == [checkpoint_name(stopped_at)]
    assert not (run_dir / "model").exists() and not (run_dir.parent / "LATEST").exists()
    assert not (tmp_path / "outputs").exists(), "Hydra left an outputs/ folder in the working directory"

    if stop_signal == signal.SIGTERM:  # resuming ends bitwise like an uninterrupted run
        resumed = pretrain(compose_config(overrides))
        straight = pretrain(compose_config([*common, f"train.output_dir={tmp_path / 'straight'}"]))
        assert_same_weights(weights(resumed / "model"), weights(straight / "model"))
        assert logged_steps(resumed) == list(range(1, 13))


def test_a_second_signal_exits_at_once_without_saving(tiny_train_overrides, tmp_path):
    overrides = [*tiny_train_overrides, *QUIET, "train.max_steps=50", "train.checkpoint_every=1000"]
    overrides.append(f"train.output_dir={tmp_path / 'runs'}")
    run_dir = tmp_path / "runs" / "mf-nano-tiny"
    process = start(overrides, tmp_path, tmp_path / "out.log")
    wait_until(lambda: (run_dir / "metrics.jsonl").is_file() and logged_steps(run_dir), process, "a first step")
    process.send_signal(signal.SIGTERM)
    # Another signal (the same one twice may be coalesced before Python sees it); Python handles pending signals
    # in number order, so whichever it sees second ends the process by its default action.
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=TIMEOUT_S) in (-signal.SIGINT, -signal.SIGTERM)
    assert complete_checkpoints(run_dir / "checkpoints") == []


# --- fault injection ----------------------------------------------------------------------------------------------


def flip_bytes(checkpoint: Path, rng: random.Random) -> None:
    victim = rng.choice(sorted(p for p in checkpoint.iterdir() if p.name != STATE_FILE))
    data = bytearray(victim.read_bytes())
    at = rng.randrange(len(data))
    data[at] ^= 0xFF
    victim.write_bytes(bytes(data))


def truncate_file(checkpoint: Path, rng: random.Random) -> None:
    victim = rng.choice(sorted(p for p in checkpoint.iterdir() if p.name != STATE_FILE))
    victim.write_bytes(victim.read_bytes()[: rng.randrange(victim.stat().st_size)])


def poison_with_nan(checkpoint: Path, rng: random.Random) -> None:
    """Non-finite weights with matching hashes: only the finiteness check can reject it."""
    tensors = weights(checkpoint)
    name = rng.choice(sorted(tensors))
    tensors[name] = tensors[name].clone().view(-1).index_fill(0, torch.tensor([0]), float("nan")).view_as(tensors[name])
    save_file(tensors, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
    state = json.loads((checkpoint / STATE_FILE).read_text())
    state["files"] = file_hashes(checkpoint)
    (checkpoint / STATE_FILE).write_text(json.dumps(state))


def make_foreign(checkpoint: Path, rng: random.Random) -> Path:
    """Another run's checkpoint (a copy with another run id) dropped in as the newest one."""
    state = json.loads((checkpoint / STATE_FILE).read_text())
    foreign = checkpoint.with_name(checkpoint_name(checkpoint_step(checkpoint) + 1000))
    shutil.copytree(checkpoint, foreign)
    (foreign / STATE_FILE).write_text(json.dumps({**state, "run_id": f"someone-else-{rng.random()}"}))
    return foreign


def test_random_kills_and_corruptions_lose_nothing_saved_and_resume_only_intact_state(tiny_train_overrides, tmp_path):
    """Seeded: each trial kills the run at a random step or mid-save, then damages the newest checkpoint (bytes
    flipped, a file truncated, NaN weights with matching hashes) or drops another run's checkpoint beside it."""
    rng = random.Random(12)
    steps = 10
    common = [*tiny_train_overrides, *QUIET, f"train.max_steps={steps}", "train.checkpoint_every=2"]
    common.append("train.keep_checkpoints=3")
    straight = pretrain(compose_config([*common, f"train.output_dir={tmp_path / 'straight'}"]))
    overrides = [*common, f"train.output_dir={tmp_path / 'faulty'}"]
    run_dir = tmp_path / "faulty" / straight.name
    checkpoints = run_dir / "checkpoints"
    # Checkpoints damaged on purpose, by name and trainer-state mtime (a later save may reuse the name).
    damaged: dict[str, int] = {}

    def is_damaged(checkpoint: Path) -> bool:
        state = checkpoint / STATE_FILE
        return state.is_file() and damaged.get(checkpoint.name) == state.stat().st_mtime_ns

    newest_intact, foreign = 0, None
    for trial in range(5):
        log = tmp_path / f"trial{trial}.log"
        damaged_now = {p.name for p in complete_checkpoints(checkpoints) if is_damaged(p)}
        process = start(overrides, tmp_path, log)
        if foreign is not None:  # refused outright, naming it; nothing else touched
            assert process.wait(timeout=TIMEOUT_S) == 1
            assert f"holds checkpoints of another run: {foreign.name}" in log.read_text()
            shutil.rmtree(foreign)
            foreign = None
            continue
        if newest_intact >= steps:
            break
        if rng.random() < 0.4:  # mid-save: while a .tmp- directory is being written
            wait_until(lambda: any(checkpoints.glob(".tmp-*")), process, "a save in progress")
        else:
            target = rng.randint(newest_intact + 1, steps)

            def reached(target=target):
                return (run_dir / "metrics.jsonl").is_file() and max(logged_steps(run_dir), default=0) >= target

            wait_until(reached, process, f"step {target}")
        time.sleep(rng.uniform(0, 0.3))
        process.kill()
        process.wait()
        for resumed in re.findall(r"resumed from (\S+) at step", log.read_text()):
            assert Path(resumed).name not in damaged_now, f"resumed from the damaged {resumed}"
        complete = [p for p in complete_checkpoints(checkpoints) if not is_damaged(p)]
        steps_saved = [checkpoint_step(p) for p in complete]
        assert max(steps_saved, default=0) >= newest_intact, "a saved checkpoint was lost"
        newest_intact = max(steps_saved, default=0)
        if len(complete) >= 2:  # damage the newest: resume must fall back to the one before
            fault = rng.choice([flip_bytes, truncate_file, poison_with_nan, make_foreign])
            if fault is make_foreign:
                foreign = make_foreign(complete[-1], rng)
            else:
                fault(complete[-1], rng)
                damaged[complete[-1].name] = (complete[-1] / STATE_FILE).stat().st_mtime_ns
                newest_intact = steps_saved[-2]

    final = pretrain(compose_config(overrides))
    assert_same_weights(weights(final / "model"), weights(straight / "model"))
    assert logged_steps(final) == list(range(1, steps + 1))
    for corrupt in checkpoints.glob(".corrupt-*"):  # only what was damaged on purpose was set aside
        assert corrupt.name.removeprefix(".corrupt-")[: len("step-00000000")] in damaged
