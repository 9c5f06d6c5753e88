"""Ablation sweeps (spec §6, Tables 3–6): configs expand to the intended runs (every value × every seed), a real
multirun of 2 values × 2 seeds trains, fails one value without stopping, and aggregates into a table with intervals,
a plot with error bars and learning curves with bands."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from memoryformer.config import compose_config, register_resolvers
from memoryformer.models import model_config_from_config
from memoryformer.paths import PROJECT_ROOT
from memoryformer.sweeps import (
    FAILED_FILE,
    fitted_heads,
    fitted_width,
    name_seeded_run,
    pretrain_job,
    register_sweep_resolvers,
    swept_values,
)
from memoryformer.sweeps.table import PAPER_ABLATIONS, _lookup

register_resolvers()
register_sweep_resolvers()


def job_facts(cfg):
    """What one job of a sweep would train: the Hydra task of the expansion test (no training)."""
    config = model_config_from_config(cfg.model)
    return {
        "value": OmegaConf.select(cfg, cfg.sweep.parameter),
        "seed": cfg.seed,
        "run_dir": str(Path(cfg.train.output_dir) / cfg.train.run_name),
        "job_dir": HydraConfig.get().runtime.output_dir,
        "group": cfg.train.wandb.group,
        "lr": cfg.train.lr,
        "eval_at_end": cfg.train.eval_at_end,
        "shape": (config.hidden_size, config.tau, config.num_chunks, config.num_attention_heads),
        "expand_bits": config.expand_bits,
        "activation": config.memory_block_activation,
    }


def expand(hydra_sweep_runner, tmp_path, sweep, *overrides):
    sweep_dir = tmp_path / sweep
    runner = hydra_sweep_runner(
        calling_file=__file__,
        calling_module=None,
        task_function=job_facts,
        config_path="../conf",
        config_name="config",
        overrides=[f"+sweep={sweep}", f"train.output_dir={sweep_dir}", "hydra.job.chdir=false", *overrides],
        temp_dir=sweep_dir,
    )
    with runner:
        return [job.return_value for batch in runner.returns for job in batch]


@pytest.mark.parametrize(
    ("sweep", "model", "values", "field", "expected"),
    [
        # (d, τ, K, heads): a τ that does not divide d rounds d down to K·τ with suitable heads, as the paper's 510
        ("tau_k", "mf-nano", [4, 8, 10], "shape", [(128, 4, 32, 4), (128, 8, 16, 4), (120, 10, 12, 3)]),
        ("tau_k", "mf-tiny", [4, 8, 10], "shape", [(512, 4, 128, 8), (512, 8, 64, 8), (510, 10, 51, 10)]),
        ("lr", "mf-nano", [1e-3, 2e-3, 3e-3, 4e-3], "lr", [1e-3, 2e-3, 3e-3, 4e-3]),
        ("expand_bits", "mf-nano", [0, 1, 2, 3], "expand_bits", [0, 1, 2, 3]),
        ("gelu", "mf-nano", [None, "gelu"], "activation", [None, "gelu"]),
    ],
)
def test_sweep_config_expands_to_the_paper_runs(hydra_sweep_runner, tmp_path, sweep, model, values, field, expected):
    jobs = expand(hydra_sweep_runner, tmp_path, sweep, f"model={model}", "train.max_steps=123", "seed=7,8")
    assert sorted({job["seed"] for job in jobs}) == [7, 8] and len(jobs) == 2 * len(values)  # every value × seed
    by_value = {}
    for job in jobs:
        by_value.setdefault(repr(job["value"]), []).append(job)
    assert [by_value[repr(v)][0]["value"] for v in values] == values  # the swept key the aggregator reads
    assert [by_value[repr(v)][0][field] for v in values] == expected  # what the model / trainer is given
    sweep_dir = tmp_path / sweep
    assert len({job["run_dir"] for job in jobs}) == len(jobs)  # one run directory per (value, seed) ...
    assert all(Path(job["run_dir"]).parent == sweep_dir for job in jobs)  # ... all in the sweep's directory
    assert all(Path(job["run_dir"]).name.endswith(f"-seed{job['seed']}") for job in jobs)  # named with the seed
    assert all(job["job_dir"] == job["run_dir"] for job in jobs)  # Hydra's job files land in the run directory
    for seeds_of_one_value in by_value.values():  # one W&B group per value: its seeds are the group's runs
        groups = {job["group"] for job in seeds_of_one_value}
        assert len(groups) == 1 and groups.pop().startswith(f"{sweep}-{model}-123steps-")
    assert len({job["group"] for job in jobs}) == len(values)
    assert {job["eval_at_end"] for job in jobs} == {sweep == "gelu"}  # Table 6 compares zero-shot accuracy


def test_tiny_sweep_geometry_reproduces_the_paper_memory_columns():
    """On mf-tiny, the swept configs give exactly the memory the paper prints (Table 3 layer Q, Table 5 block)."""
    from memoryformer.layers import block_table_bytes, table_bytes

    for tau, paper_mb in PAPER_ABLATIONS["tau_k"].memory_mb.items():
        d = fitted_width("mf-tiny", tau)
        ours = table_bytes(d, d, tau) / 1e6
        # τ=10: the paper's 53.5 MB is 51·2^10·512·2 bytes (output width 512); d = 510 gives 53.3 (see the table legend)
        assert round(ours, 1) == (53.3 if tau == 10 else paper_mb)
    for e, paper_mb in PAPER_ABLATIONS["expand_bits"].memory_mb.items():
        assert round(block_table_bytes(512, 8, e) / 1e6, 1) == paper_mb


def test_fitted_width_and_heads():
    assert [fitted_width("mf-tiny", tau) for tau in (4, 8, 10, 7)] == [512, 512, 510, 511]
    assert fitted_heads("mf-tiny", 512) == 8  # the model's own heads when they suit
    assert fitted_heads("mf-tiny", 510) == 10  # 8 does not divide 510; 10 heads of 51 dims rotate 12 of them
    assert fitted_heads("mf-nano", 120) == 3  # 4 heads of 30 dims would rotate 7 (odd); 3 and 5 tie, fewer wins
    with pytest.raises(ValueError, match="exceeds the width"):
        fitted_width("mf-nano", 200)


def test_a_multirun_names_each_run_with_its_seed_and_groups_its_seeds():
    plain = compose_config(["seed=7"])  # `pretrain.py -m seed=7,8`: the default name would be shared by every seed
    name_seeded_run(plain)
    assert (plain.train.run_name, plain.train.wandb.group) == ("mf-nano-sample-seed7", "mf-nano-sample")
    swept = compose_config(["+sweep=lr", "seed=7", "train.lr=1e-3"])  # sweeps already name runs with the seed
    name_seeded_run(swept)
    assert swept.train.run_name == "lr0.001-seed7" and swept.train.wandb.group.endswith("-lr0.001")


def test_swept_values_reads_the_seeds_of_a_command_line_sweep():
    assert swept_values(["+sweep=lr", "seed=1234,1235,1236", "model=mf-nano"], "seed") == [1234, 1235, 1236]
    assert swept_values(["seed=5"], "seed") is None  # one seed is not a sweep


def test_paper_lookup_matches_swept_numbers():
    lr = PAPER_ABLATIONS["lr"].val_ppl
    assert _lookup(lr, 0.003) == 18.82 and _lookup(lr, 5e-3) is None
    assert _lookup(PAPER_ABLATIONS["gelu"].avg_acc, None) == 0.404
    assert _lookup(PAPER_ABLATIONS["expand_bits"].val_ppl, 3) == 18.54


def test_single_run_failure_still_raises(tmp_path):
    cfg = compose_config(["model.tau=10", f"train.output_dir={tmp_path}"])  # mf-nano's d = 128: not divisible by 10
    with pytest.raises(ValueError, match="not divisible by tau=10"):
        pretrain_job(cfg)
    assert not list(tmp_path.rglob(FAILED_FILE))  # recording failures is for sweeps


def run_script(script, *args):
    return subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "scripts" / script), *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_multirun_of_two_values_and_two_seeds_trains_survives_a_bad_value_and_aggregates(
    tiny_train_overrides, tmp_path
):
    """The real mechanism: Hydra multirun of scripts/pretrain.py over τ × seed, then scripts/aggregate_sweep.py.

    τ = 4 and 8 train with seeds 1 and 2; τ = 10 with d forced to 128 is an invalid model: both its seeds fail
    clearly, the sweep goes on, and the table lists them instead of averaging them.
    """
    replaced = ("train.tracker", "train.eval_every", "train.checkpoint_every", "train.sample_tokens")
    overrides = [o for o in tiny_train_overrides if not o.startswith(replaced)]
    # Validations at steps 3 and 6 (a two-point learning curve), one checkpoint per run. W&B is exercised (mode
    # disabled in tests): each run opens and finishes its own tracker run.
    overrides += ["train.eval_every=3", "train.checkpoint_every=6", "train.sample_tokens=0", "train.tracker=wandb"]
    overrides += ["+sweep=tau_k", "model.tau=4,8,10", "model.hidden_size=128", "seed=1,2"]
    sweep = run_script("pretrain.py", "-m", *overrides)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    sweep_dir = tmp_path / "runs"  # train.output_dir of the tiny overrides

    finals = {}
    for tau in (4, 8):
        for seed in (1, 2):
            run_dir = sweep_dir / f"tau{tau}-seed{seed}"
            metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            assert metrics[-1]["step"] == 6 and metrics[-1]["val_ppl"] > 1
            assert metrics[-1]["loss"] < metrics[0]["loss"]  # it really trained
            assert (run_dir / "model" / "config.json").is_file() and not (run_dir / FAILED_FILE).exists()
            assert OmegaConf.load(run_dir / "config.yaml").seed == seed
            finals[tau, seed] = metrics[-1]["val_loss"]
    assert finals[4, 1] != finals[4, 2]  # the seed changes init and data order, so the result
    for seed in (1, 2):
        failure = json.loads((sweep_dir / f"tau10-seed{seed}" / FAILED_FILE).read_text())
        assert "not divisible by tau=10" in failure["error"] and "Traceback" in failure["traceback"]
        assert (failure["sweep"], failure["value"], failure["seed"]) == ("tau_k", 10, seed)

    aggregate = run_script("aggregate_sweep.py", *overrides)
    assert aggregate.returncode == 1, aggregate.stderr[-3000:]  # failed seeds are reported ...
    assert "seeds not done: tau10-seed1 (failed: ValueError" in aggregate.stderr, aggregate.stderr[-3000:]
    table = (sweep_dir / "table3_tau_k.md").read_text()  # ... and the table is written anyway, listing them
    assert "tau10-seed1 (failed" in table and "tau10-seed2 (failed" in table
    rows = list(csv.DictReader((sweep_dir / "table3_tau_k.csv").open()))
    assert [(row["value"], row["seeds_done"], row["seeds"], row["K"]) for row in rows] == [
        ("4", "2", "1 2", "32"),
        ("8", "2", "1 2", "16"),
        ("10", "0", "", ""),
    ]
    assert float(rows[0]["val_loss_mean"]) == pytest.approx((finals[4, 1] + finals[4, 2]) / 2)
    assert float(rows[0]["val_loss_std"]) == pytest.approx(abs(finals[4, 1] - finals[4, 2]) / 2**0.5)
    assert float(rows[0]["val_loss_ci_low"]) < float(rows[0]["val_loss_mean"]) < float(rows[0]["val_loss_ci_high"])
    assert rows[1]["p_vs_prev"] != "" and rows[1]["beyond_noise_vs_prev"] in ("True", "False")  # τ=8 vs τ=4
    assert rows[2]["val_loss_mean"] == "" and "tau10-seed2 (failed" in rows[2]["unfinished"]  # none averaged
    assert [row["paper_val_ppl"] for row in rows] == ["19.01", "18.82", "18.67"]
    assert float(rows[0]["q_table_MB"]) == pytest.approx(32 * 16 * 128 * 2 / 1e6)
    for name in ("table3_tau_k.png", "table3_tau_k_curves.png"):
        assert (sweep_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
