"""Seed statistics (issue 13): estimates and Welch's test with known values, and the tables built from synthetic run
directories — mean, std, interval, the beyond-noise mark, unfinished and missing seeds listed, never averaged."""

import csv
import functools
import json
import math

import pytest
from omegaconf import OmegaConf

from memoryformer.config import compose_config
from memoryformer.statistics import estimate, t_quantile, welch_test
from memoryformer.sweeps import FAILED_FILE, configuration_name, register_sweep_resolvers
from memoryformer.sweeps.compare import compare_runs
from memoryformer.sweeps.runs import group_seeds, read_run, trained_configuration
from memoryformer.sweeps.table import aggregate_sweep

register_sweep_resolvers()


def test_t_quantiles_match_the_textbook_table():
    assert t_quantile(0.975, 1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile(0.975, 2) == pytest.approx(4.303, abs=1e-3)
    assert t_quantile(0.975, 4) == pytest.approx(2.776, abs=1e-3)
    assert t_quantile(0.975, 1e6) == pytest.approx(1.960, abs=1e-3)
    with pytest.raises(ValueError, match="df > 0"):
        t_quantile(0.975, 0)


def test_estimate_of_three_seeds():
    est = estimate([1.0, 2.0, 3.0])
    assert (est.n, est.mean, est.std) == (3, 2.0, 1.0)
    assert est.sem == pytest.approx(1 / math.sqrt(3))
    assert est.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)  # t(0.975, 2) · s/√n
    low, high = est.interval
    assert low == pytest.approx(2 - 2.484138, abs=1e-6) and high == pytest.approx(2 + 2.484138, abs=1e-6)


def test_one_seed_has_a_mean_but_no_spread_and_no_test():
    one = estimate([5.0])
    assert one.mean == 5.0 and one.std is None and one.interval is None
    assert welch_test(one, estimate([1.0, 2.0])) is None  # never a silent "significant"
    with pytest.raises(ValueError, match="at least one value"):
        estimate([])
    with pytest.raises(ValueError, match="failed seed"):
        estimate([1.0, math.nan])


def test_welch_test_by_hand():
    a, b = estimate([1.0, 2.0, 3.0]), estimate([10.0, 12.0, 14.0, 16.0, 18.0])  # variances 1 and 10
    difference = welch_test(a, b)
    va, vb = 1 / 3, 10 / 5
    assert difference.delta == 12.0
    assert difference.se == pytest.approx(math.sqrt(va + vb))
    assert difference.df == pytest.approx((va + vb) ** 2 / (va**2 / 2 + vb**2 / 4))  # Welch–Satterthwaite: 5.158
    assert difference.df == pytest.approx(5.15789, abs=1e-4)
    assert difference.beyond_noise and difference.p_value < 1e-3
    # The mark is exactly "|Δ| > t(0.975, ν) · se": shrink the gap until it no longer holds.
    threshold = t_quantile(0.975, difference.df) * difference.se
    near = welch_test(a, estimate([v - 12 + threshold * 0.99 for v in (10.0, 12.0, 14.0, 16.0, 18.0)]))
    assert not near.beyond_noise and near.p_value == pytest.approx(0.05, abs=0.002)
    far = welch_test(a, estimate([v - 12 + threshold * 1.01 for v in (10.0, 12.0, 14.0, 16.0, 18.0)]))
    assert far.beyond_noise


# --- synthetic run directories -----------------------------------------------------------------------------------

STEPS = 20


@functools.cache
def composed(overrides):
    return compose_config([*overrides, f"train.max_steps={STEPS}", "train.eval_at_end=false"])


def fake_run(directory, overrides, seed, losses=None, status="done"):
    """A run directory as the trainer writes it: config.yaml, metrics.jsonl with validations at steps 10 and 20,
    model/ when done. ``losses`` are the validation losses at those steps."""
    cfg = composed(tuple(overrides)).copy()  # composing is slow: once per configuration, then set the seed
    cfg.seed = seed
    run_dir = directory / cfg.train.run_name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tokens_per_step = cfg.train.global_batch * cfg.train.seq_len
    records = [
        {
            "step": step,
            "loss": loss + 0.1,
            "tokens": step * tokens_per_step,
            "val_loss": loss,
            "val_ppl": math.exp(loss),
        }
        for step, loss in zip((10, 20), losses or (), strict=False)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    if status == "done":
        (run_dir / "model").mkdir()
    elif status == "failed":
        (run_dir / FAILED_FILE).write_text(json.dumps({"error": "RuntimeError: diverged", "seed": seed}))
    return run_dir


def expand_bits_sweep(tmp_path):
    """e=0: 3 finished seeds (final 6.0, 6.1, 6.2); e=2: seeds 1234, 1235 finished (5.0, 5.2), 1236 failed;
    e=3: one finished seed (5.1); seed 1236 of e=3 never started. Final losses are the second value."""
    sweep_dir = tmp_path / "sweep"
    common = ["+sweep=expand_bits", f"train.output_dir={sweep_dir}"]
    for seed, final in zip((1234, 1235, 1236), (6.0, 6.1, 6.2), strict=True):
        fake_run(sweep_dir, [*common, "model.expand_bits=0"], seed, (7.0, final))
    for seed, final in zip((1234, 1235), (5.0, 5.2), strict=True):
        fake_run(sweep_dir, [*common, "model.expand_bits=2"], seed, (6.5, final))
    fake_run(sweep_dir, [*common, "model.expand_bits=2"], 1236, (9.0,), status="failed")
    fake_run(sweep_dir, [*common, "model.expand_bits=3"], 1234, (6.0, 5.1))
    fake_run(sweep_dir, [*common, "model.expand_bits=3"], 1235, (6.0,), status="incomplete")
    return sweep_dir


def test_run_names_and_configurations():
    assert configuration_name("e2-seed1234") == "e2" and configuration_name("mf-nano-sample") == "mf-nano-sample"
    a = compose_config(["seed=1", "train.run_name=x-seed1", "train.output_dir=/a"])
    b = compose_config(["seed=2", "train.run_name=x-seed2", "train.output_dir=/b", "train.eval_every=7"])
    c = compose_config(["seed=2", "train.lr=1e-3"])
    as_dict = lambda cfg: OmegaConf.to_container(cfg, resolve=True)  # noqa: E731
    assert trained_configuration(as_dict(a)) == trained_configuration(as_dict(b))  # bookkeeping only
    assert trained_configuration(as_dict(a)) != trained_configuration(as_dict(c))  # a real difference


def test_sweep_table_reports_seeds_intervals_the_mark_and_unfinished_seeds(tmp_path):
    sweep_dir = expand_bits_sweep(tmp_path)
    result = aggregate_sweep(sweep_dir, seeds=[1234, 1235, 1236])
    rows = {row["value"]: row for row in result["rows"]}
    assert list(rows) == [0, 2, 3]  # ordered by swept value

    e0, e2, e3 = rows[0], rows[2], rows[3]
    assert e0["seeds_done"] == 3 and e0["seeds"] == "1234 1235 1236" and e0["unfinished"] is None
    assert e0["val_loss_mean"] == pytest.approx(6.1) and e0["val_loss_std"] == pytest.approx(0.1)
    half = 4.302653 * 0.1 / math.sqrt(3)
    assert (e0["val_loss_ci_low"], e0["val_loss_ci_high"]) == pytest.approx((6.1 - half, 6.1 + half), rel=1e-6)
    assert e0["val_ppl"] == pytest.approx(math.exp(6.1)) and e0["val_ppl_ci_high"] == pytest.approx(
        math.exp(6.1 + half)
    )
    assert e0["delta_vs_prev"] is None and e0["beyond_noise_vs_prev"] is None  # the first value has no previous

    # e=2: the failed seed is listed, not averaged (mean of 5.0 and 5.2 only); clearly below e=0.
    assert e2["seeds_done"] == 2 and e2["val_loss_mean"] == pytest.approx(5.1)
    assert "e2-seed1236 (failed: RuntimeError: diverged)" in e2["unfinished"]
    assert e2["delta_vs_prev"] == pytest.approx(-1.0) and e2["beyond_noise_vs_prev"] is True
    assert e2["p_vs_prev"] == pytest.approx(welch_test(estimate([6.0, 6.1, 6.2]), estimate([5.0, 5.2])).p_value)

    # e=3: one finished seed: a mean, no interval, no test; its incomplete and never-started seeds are listed.
    assert e3["seeds_done"] == 1 and e3["val_loss_mean"] == pytest.approx(5.1) and e3["val_loss_std"] is None
    assert e3["delta_vs_prev"] == pytest.approx(0.0) and e3["beyond_noise_vs_prev"] is None
    assert e3["unfinished"] == "e3-seed1235 (incomplete); seed 1236 (not started)"
    assert e3["paper_val_ppl"] == 18.54 and e3["memory_block_tables_MB"] > e2["memory_block_tables_MB"]

    table = result["paths"]["markdown"].read_text()
    assert "| 2 | 20 | 2 ⚠ | 5.100 ± 0.141 |" in table
    assert "-1.000 (p = " in table and "**yes**" in table and "| n/a |" in table
    assert "e2-seed1236 (failed: RuntimeError: diverged)" in table and "seed 1236 (not started)" in table
    assert "Welch" in table
    csv_rows = list(csv.DictReader(result["paths"]["csv"].open()))
    assert [row["seeds_done"] for row in csv_rows] == ["3", "2", "1"]
    assert float(csv_rows[1]["val_loss_mean"]) == pytest.approx(5.1)
    for key in ("plot", "curves"):
        assert result["paths"][key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_curves_average_finished_seeds_only(tmp_path):
    configurations = aggregate_sweep(expand_bits_sweep(tmp_path))["configurations"]
    e2 = next(c for c in configurations if c.label == "e2")
    points = e2.curve()
    assert [step for step, _, _ in points] == [10, 20]
    assert points[0][2].values == (6.5, 6.5) and points[1][2].mean == pytest.approx(5.1)  # not the failed 9.0


def test_compare_groups_seeds_from_globs_and_lists_unfinished(tmp_path):
    runs = tmp_path / "runs"
    for seed, final in zip((1, 2, 3), (5.0, 5.1, 5.2), strict=True):
        fake_run(runs, [f"train.output_dir={runs}", f"train.run_name=mf-seed{seed}"], seed, (6.0, final))
    pythia = [f"train.output_dir={runs}", "model=pythia-14m"]
    for seed, final in zip((1, 2), (5.3, 5.5), strict=True):
        fake_run(runs, [*pythia, f"train.run_name=py-seed{seed}"], seed, (6.0, final))
    fake_run(runs, [*pythia, "train.run_name=py-seed3"], 3, (6.0,), status="incomplete")

    result = compare_runs([str(runs / "py-seed*"), str(runs / "mf-seed*")], tmp_path / "out", "mf vs pythia")
    rows = result["rows"]
    assert [row["configuration"] for row in rows] == ["py", "mf"]  # the order given, seeds grouped
    assert rows[0]["seeds_done"] == 2 and rows[0]["unfinished"] == "py-seed3 (incomplete)"
    assert rows[1]["val_loss_mean"] == pytest.approx(5.1) and rows[1]["delta_vs_prev"] == pytest.approx(-0.3)
    assert rows[1]["beyond_noise_vs_prev"] is False  # 5.3/5.5 vs 5.0–5.2: within the combined uncertainty
    assert rows[0]["flops_per_token"] > rows[1]["flops_per_token"] > 0  # pythia-14m's FFN vs mf-nano's lookups
    assert rows[1]["training_flops"] == 3 * rows[1]["flops_per_token"] * rows[1]["tokens"]
    markdown = result["paths"]["markdown"].read_text()
    assert markdown.startswith("# mf vs pythia") and "py-seed3 (incomplete)" in markdown
    assert result["paths"]["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError, match="names no run directory"):
        compare_runs([str(runs / "nothing-*")], tmp_path / "out")


def test_zero_shot_accuracy_gets_intervals_and_the_mark_where_scored(tmp_path):
    runs = tmp_path / "runs"
    accuracies = {"none": (0.40, 0.41, 0.42), "gelu": (0.30, 0.31, 0.32)}
    for activation, values in accuracies.items():
        for seed, acc in zip((1, 2, 3), values, strict=True):
            overrides = [f"train.output_dir={runs}", f"train.run_name={activation}-seed{seed}"]
            if activation == "gelu":
                overrides.append("model.memory_block_activation=gelu")
            run_dir = fake_run(runs, overrides, seed, (6.0, 5.0 + seed / 100))
            results = {"model_info": {"limit": 100}, "results": {}, "summary": {"avg/acc": acc}}
            (run_dir / "eval").mkdir()
            (run_dir / "eval" / "results.json").write_text(json.dumps(results))
    result = compare_runs([str(runs / "none-*"), str(runs / "gelu-*")], tmp_path / "out")
    none, gelu = result["rows"]
    assert none["avg_acc_mean"] == pytest.approx(0.41) and none["avg_acc_std"] == pytest.approx(0.01)
    assert gelu["avg_acc_delta_vs_prev"] == pytest.approx(-0.10) and gelu["avg_acc_beyond_noise_vs_prev"] is True
    assert gelu["delta_vs_prev"] == pytest.approx(0.0) and gelu["beyond_noise_vs_prev"] is False  # same losses
    assert gelu["eval_limit"] == 100
    assert "| 0.410 ± 0.010 |" in result["paths"]["markdown"].read_text()


def test_a_diverged_run_is_a_failed_seed(tmp_path):
    run_dir = fake_run(tmp_path, [f"train.output_dir={tmp_path}", "train.run_name=x-seed1"], 1, (6.0, math.nan))
    run = read_run(run_dir)
    assert run.status == "failed" and run.error == "diverged: final val_loss nan"


def test_runs_failed_before_their_config_join_their_configuration(tmp_path):
    sweep_dir = expand_bits_sweep(tmp_path)
    (sweep_dir / "e2-seed1236" / "config.yaml").unlink()  # failed before the trainer wrote its config
    (sweep_dir / "e2-seed1236" / FAILED_FILE).write_text(json.dumps({"error": "E", "seed": 1236, "value": 2}))
    groups = group_seeds([read_run(path) for path in sorted(sweep_dir.iterdir())])
    assert [(group.label, len(group.runs)) for group in groups] == [("e0", 3), ("e2", 3), ("e3", 2)]
