"""The trainer's distributed paths for real (spec §4; issue 5): torchrun over gloo, DeepSpeed ZeRO via Accelerate.

W gloo ranks × A accumulation steps must train exactly like one process × A·W accumulation steps over the same
global batch (:func:`memoryformer.data.sample_indices` hands them the same micro-batches), and DeepSpeed ZeRO in
one CPU process must train like the plain trainer, checkpoint with DeepSpeed's own ``save_state`` and resume.
Every launched rank and the in-process reference run on one thread, so all sum in the same order.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from memoryformer.config import compose_config
from memoryformer.train import loop as train_loop
from memoryformer.train import pretrain
from memoryformer.train.checkpoint import checkpoint_name, latest_checkpoint
from memoryformer.train.loop import BatchGeometry, configure_deepspeed, make_accelerator

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "pretrain.py"
# The same Memory Layer kernel in every run, whichever compiles here (the fused CPU kernel sums in another order).
SAME_KERNEL = ["model.lookup_backend=embedding_bag"]
TIMING_KEYS = frozenset({"tokens_per_s", "tflops"})
LAUNCH_TIMEOUT_S = 900  # DeepSpeed's first use JIT-compiles its shared-memory op (1-3 min here)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env() -> dict[str, str]:
    """One thread per rank; DeepSpeed's JIT-compiled ops cached across runs (compiling takes minutes)."""
    cache = Path.home() / ".cache" / "memoryformer" / "torch_extensions"
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(cache)),
    }


def launch_command(launcher: list[str], overrides: list[str], hydra_dir: Path) -> list[str]:
    return [*launcher, str(SCRIPT), *overrides, f"hydra.run.dir={hydra_dir}"]


def launch(launcher: list[str], overrides: list[str], hydra_dir: Path) -> str:
    """Run scripts/pretrain.py under ``launcher``; its output, failing the test (with the output) on error."""
    result = subprocess.run(
        launch_command(launcher, overrides, hydra_dir),
        env=launcher_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"launch failed ({result.returncode}):\n{output[-8000:]}"
    return output


def torchrun(nproc: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
    ]


def reference_run(overrides: list[str]) -> Path:
    """One process accumulating the whole global batch, in this process, on one thread like each launched rank."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return pretrain(compose_config(overrides))
    finally:
        torch.set_num_threads(threads)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_parameters(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model" / "model.safetensors")


def assert_same_metrics(actual: list[dict], expected: list[dict], rel: float, ignore: frozenset = TIMING_KEYS) -> None:
    """Same steps, losses, LRs, validation losses and samples (to the bit when rel=0); throughput may differ."""
    assert [m["step"] for m in actual] == [m["step"] for m in expected]
    for got, want in zip(actual, expected, strict=True):
        assert got.keys() - ignore == want.keys() - ignore
        for key in want.keys() - ignore:
            if isinstance(want[key], float) and rel:
                assert got[key] == pytest.approx(want[key], rel=rel), f"step {want['step']} {key}"
            else:
                assert got[key] == want[key], f"step {want['step']} {key}"


def assert_same_parameters(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], exact: bool = False
) -> None:
    """Equal within fp32 tolerance (or to the bit), tensor by tensor."""
    assert actual.keys() == expected.keys()
    tolerance = {"rtol": 0, "atol": 0} if exact else {}
    for name, tensor in expected.items():
        torch.testing.assert_close(
            actual[name], tensor, **tolerance, msg=lambda message, name=name: f"{name}: {message}"
        )


def stop_after_checkpoint(command: list[str], checkpoint: Path) -> None:
    """Start ``command`` and SIGTERM it once ``checkpoint`` exists, as a job scheduler or Ctrl-C would.

    torchrun runs each rank in a session of its own and passes the signal on to every rank (a SIGKILL of torchrun
    alone would leave the ranks running).
    """
    process = subprocess.Popen(
        command, env=launcher_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        while not checkpoint.is_dir():
            assert process.poll() is None, f"the run ended (code {process.returncode}) before writing {checkpoint}"
            assert time.monotonic() < deadline, f"no {checkpoint} after {LAUNCH_TIMEOUT_S} s"
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)


def test_two_gloo_ranks_train_like_one_process_accumulating(tiny_train_overrides, tmp_path):
    """torchrun × 2 ranks × 1 micro-step of 4 == 1 process × 2 micro-steps of 4: same losses, same parameters."""
    common = [*tiny_train_overrides, *SAME_KERNEL, "train.global_batch=8", "train.micro_batch=4"]
    reference = reference_run([*common, f"train.output_dir={tmp_path / 'one'}"])
    launch(torchrun(2), [*common, f"train.output_dir={tmp_path / 'two'}"], tmp_path / "hydra")
    distributed = tmp_path / "two" / reference.name

    # Both ranks joined one gloo group (not two independent copies): Accelerate saved one RNG state per rank.
    checkpoint = latest_checkpoint(distributed / "checkpoints")
    assert sorted(p.name for p in checkpoint.glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    assert_same_metrics(read_metrics(distributed), read_metrics(reference), rel=1e-6)
    assert_same_parameters(final_parameters(distributed), final_parameters(reference))
    assert (tmp_path / "two" / "LATEST").read_text().strip() == str((distributed / "model").resolve())


@pytest.mark.slow
def test_torchrun_stopped_and_resumed_ends_like_an_uninterrupted_run(tiny_train_overrides, tmp_path):
    """Stop two gloo ranks after a checkpoint; resuming ends on the uninterrupted one-process run's parameters."""
    common = [*tiny_train_overrides, *SAME_KERNEL, "train.global_batch=8", "train.micro_batch=4", "train.max_steps=12"]
    uninterrupted = reference_run([*common, f"train.output_dir={tmp_path / 'one'}"])
    overrides = [*common, f"train.output_dir={tmp_path / 'two'}"]
    checkpoints = tmp_path / "two" / uninterrupted.name / "checkpoints"
    stop_after_checkpoint(launch_command(torchrun(2), overrides, tmp_path / "hydra"), checkpoints / checkpoint_name(3))
    stopped_at = latest_checkpoint(checkpoints)
    assert stopped_at is not None and stopped_at.name != checkpoint_name(12), "the run was not stopped midway"

    output = launch(torchrun(2), overrides, tmp_path / "hydra")
    resumed_step = int(stopped_at.name.removeprefix("step-"))
    assert f"resumed from {stopped_at} at step {resumed_step}" in output, output[-8000:]
    assert_same_parameters(final_parameters(checkpoints.parent), final_parameters(uninterrupted))


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher",
    [
        pytest.param(["--config_file", str(ROOT / "conf" / "accelerate" / "zero2_cpu.yaml")], id="zero2-config-file"),
        pytest.param(["--use_deepspeed", "--zero_stage", "1", "--num_processes", "1"], id="zero1-flags"),
    ],
)
def test_deepspeed_zero_on_one_cpu_process_trains_checkpoints_and_resumes(launcher, tiny_train_overrides, tmp_path):
    """ZeRO through ``accelerate launch`` on CPU: the plain trainer's losses, DeepSpeed checkpoints, exact resume."""
    common = [*tiny_train_overrides, *SAME_KERNEL]
    plain = reference_run([*common, f"train.output_dir={tmp_path / 'plain'}"])
    accelerate = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *launcher,
        "--main_process_port",
        str(free_port()),
    ]
    overrides = [*common, f"train.output_dir={tmp_path / 'zero'}"]
    launch(accelerate, overrides, tmp_path / "hydra")
    run_dir = tmp_path / "zero" / plain.name

    metrics = read_metrics(run_dir)
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.5
    # fp32 ZeRO-1/2 in one process is the plain trainer to the last bit: the same accumulation, the same AdamW
    # (torch's, as DeepSpeed's client optimizer), and the plain trainer clips with DeepSpeed's own arithmetic
    # (train.optim.clip_grad_norm: fp64 norms). With torch's fp32 norm instead, grad_norm was 4e-5 off at step 1,
    # and once the updates differed the hashes magnified it (0.5% by step 6), so nothing looser would catch a
    # real difference in what is clipped, accumulated or scheduled. (No greedy samples under DeepSpeed.)
    assert_same_metrics(metrics, read_metrics(plain), rel=0, ignore=TIMING_KEYS | {"sample"})
    assert_same_parameters(final_parameters(run_dir), final_parameters(plain), exact=True)
    checkpoints = run_dir / "checkpoints"
    assert latest_checkpoint(checkpoints) == checkpoints / checkpoint_name(6)
    for step in (3, 6):  # DeepSpeed's own save_state: the ZeRO-partitioned optimizer state
        zero_state = checkpoints / checkpoint_name(step) / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        assert zero_state.is_file()

    finished = final_parameters(run_dir)
    shutil.rmtree(checkpoints / checkpoint_name(6))  # as if killed after the step-3 checkpoint
    shutil.rmtree(run_dir / "model")
    output = launch(accelerate, overrides, tmp_path / "hydra")
    assert f"resumed from {checkpoints / checkpoint_name(3)} at step 3" in output, output[-8000:]
    assert_same_parameters(final_parameters(run_dir), finished)


@pytest.fixture
def train_cfg(tmp_path):
    return compose_config([f"train.output_dir={tmp_path}", "train.tracker=none"]).train


def test_ranks_that_did_not_join_one_group_are_refused(train_cfg, tmp_path, monkeypatch):
    """Accelerate seeing one process while the launcher started two would mean two independent copies."""

    class AloneAccelerator:  # what Accelerator() without cpu=True reports on each torchrun rank of a CPU machine
        num_processes = 1
        distributed_type = "NO"

        def __init__(self, **kwargs):
            pass

    monkeypatch.setattr(train_loop, "Accelerator", AloneAccelerator)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2 processes but Accelerate joined 1"):
        make_accelerator(train_cfg, tmp_path)


def deepspeed_accelerator(config: dict) -> SimpleNamespace:
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config)))


def test_deepspeed_gets_the_trainers_batch_geometry_and_clipping():
    config = {"gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
    configure_deepspeed(deepspeed_accelerator(config), BatchGeometry(32, 4, 2), grad_clip=0.5)
    assert config == {
        "gradient_accumulation_steps": 4,
        "train_micro_batch_size_per_gpu": 4,
        "train_batch_size": 32,
        "gradient_clipping": 0.5,
    }


def test_deepspeed_accumulation_other_than_the_trainers_is_refused():
    with pytest.raises(ValueError, match="drop --gradient_accumulation_steps"):
        configure_deepspeed(deepspeed_accelerator({"gradient_accumulation_steps": 2}), BatchGeometry(32, 4, 2), 1.0)
