"""`make bench` in quick mode (issue 8): it runs end to end, and its JSON has the documented schema with timings
and ratios that agree with each other. Performance itself is measured, never asserted.

The run is one subprocess of ``python -m benchmarks.run --quick --threads 1`` (the entry point users call; one
thread keeps it fast on a loaded machine). The data section needs the shared sample and runs only when it exists.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from memoryformer.paths import PROJECT_ROOT, shared_data_dir

SUMMARY_KEYS = ("median_us", "min_us", "max_us", "repeats", "tokens_per_s")


def run_quick(output_dir, sections: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "benchmarks.run", "--quick", "--threads", "1", "--output-dir", str(output_dir)]
    return subprocess.run(
        [*command, "--sections", *sections], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    sections = ["kernels", "blocks", "models", "training"]
    if shared_data_dir().is_dir():
        sections.append("data")
    output_dir = tmp_path_factory.mktemp("bench")
    result = run_quick(output_dir, sections)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((output_dir / "latest.json").read_text())
    markdown = (output_dir / "latest.md").read_text()
    return {"report": report, "markdown": markdown, "sections": sections, "output_dir": output_dir}


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


def check_summary(summary: dict, tokens: int) -> None:
    """A timing summary: positive, ordered min ≤ median ≤ max, tokens/s = tokens / median."""
    assert all(key in summary for key in SUMMARY_KEYS), summary
    assert isinstance(summary["repeats"], int) and summary["repeats"] >= 5
    assert 0 < summary["min_us"] <= summary["median_us"] <= summary["max_us"]
    assert close(summary["tokens_per_s"], tokens / (summary["median_us"] * 1e-6))


def test_report_top_level(quick_run):
    report = quick_run["report"]
    assert report["schema_version"] == 1 and report["quick"] is True
    assert isinstance(report["created"], str) and report["wall_seconds"] > 0
    assert report["errors"] == {}
    assert list(report["sections"]) == quick_run["sections"] == list(report["section_seconds"])
    machine = report["machine"]
    assert machine["threads"] == 1  # --threads pins torch
    assert machine["lookup_backend_auto"] in ("cpu", "embedding_bag")
    for key in ("cpu_model", "torch", "torch_parallel_backend", "transformers", "python"):
        assert isinstance(machine[key], str) and machine[key]
    assert isinstance(machine["cpus"], int) and machine["memory_gib"] > 0
    assert len(machine["load_average_start"]) == 3 and len(report["load_average_end"]) == 3
    for busy in (machine["busy_cpus_start"], report["busy_cpus_end"]):
        assert busy is None or 0 <= busy <= machine["cpus"] + 1e-6


def test_kernel_rows_and_ratios(quick_run):
    kernels = quick_run["report"]["sections"]["kernels"]
    assert kernels["machine"]["copy_bandwidth_gbs"] > 0
    rows = kernels["results"]
    medians = {(r["d"], r["n"], r["table_dtype"], r["pass"], r["backend"]): r["median_us"] for r in rows}
    assert {r["backend"] for r in rows} >= {"reference", "embedding_bag", "gather_only", "linear"}
    for r in rows:
        check_summary(r, r["n"])
        linear = medians[(r["d"], r["n"], "float32", r["pass"], "linear")]
        gather = medians[(r["d"], r["n"], r["table_dtype"], r["pass"], "gather_only")]
        assert close(r["ratio_vs_linear"], r["median_us"] / linear)
        assert close(r["ratio_vs_gather_only"], r["median_us"] / gather)


def test_block_rows_and_ratios(quick_run):
    blocks = quick_run["report"]["sections"]["blocks"]
    assert {r["phase"] for r in blocks["results"]} == {"decode", "prefill"}
    for r in blocks["results"]:
        mf, pythia = r["memoryformer"], r["pythia"]
        check_summary(mf, r["tokens"])
        check_summary(pythia, r["tokens"])
        check_summary(r["attention"], r["tokens"])
        assert close(r["latency_ratio"], mf["median_us"] / pythia["median_us"])
        attention = r["attention"]["median_us"]
        beyond = (mf["median_us"] - attention) / (pythia["median_us"] - attention)
        assert close(r["latency_ratio_beyond_attention"], beyond)
        assert close(r["weight_bytes_ratio"], mf["weight_bytes_per_token"] / pythia["weight_bytes_per_token"])
        # The point of the method: a token reads K table rows, far fewer bytes than the dense weights.
        assert r["weight_bytes_ratio"] < 0.25
        expected_kv = 2 * r["kv_cache"] * r["d"] * 4 if r["phase"] == "decode" else 0
        assert r["kv_cache_bytes"] == expected_kv


def test_model_rows_and_ratios(quick_run):
    models = quick_run["report"]["sections"]["models"]
    cfg = models["config"]
    mf, pythia = models["results"]
    assert (mf["family"], pythia["family"]) == ("memoryformer", "pythia")
    for r in (mf, pythia):
        assert r["parameters"] > 0 and r["build_seconds"] >= 0
        assert 0 < r["lm_head_bytes"] < r["weight_bytes_per_token"]
        check_summary(r["decode"], cfg["new_tokens"])
        check_summary(r["generate"], cfg["new_tokens"])
        assert [p["tokens"] for p in r["prefill"]] == cfg["prefill_tokens"]
        for p in r["prefill"]:
            check_summary(p, p["tokens"])
    assert mf["lm_head_bytes"] == pythia["lm_head_bytes"]  # the same dense head: the shared cost
    assert mf["weight_bytes_per_token"] < pythia["weight_bytes_per_token"]
    ratios = models["ratios"]
    assert close(ratios["decode_tokens_per_s"], mf["decode"]["tokens_per_s"] / pythia["decode"]["tokens_per_s"])
    for a, b in zip(mf["prefill"], pythia["prefill"], strict=True):
        assert close(ratios["prefill_tokens_per_s"][str(a["tokens"])], a["tokens_per_s"] / b["tokens_per_s"])


def test_training_rows_and_ratio(quick_run):
    training = quick_run["report"]["sections"]["training"]
    cfg = training["config"]
    assert cfg["tokens_per_step"] == cfg["global_batch"] * cfg["seq_len"]
    assert cfg["global_batch"] == cfg["micro_batch"] * cfg["accumulation_steps"]
    mf, pythia = training["results"]
    assert (mf["model"], pythia["model"]) == ("mf-nano", "pythia-14m")
    for r in training["results"]:
        check_summary(r, cfg["tokens_per_step"])
    assert close(training["ratio"], mf["tokens_per_s"] / pythia["tokens_per_s"])


def test_data_section(quick_run):
    if "data" not in quick_run["sections"]:
        pytest.skip(f"shared data not found at {shared_data_dir()}")
    data = quick_run["report"]["sections"]["data"]
    assert data["tokens"] > 0 and data["tokens_per_second"] > 0 and data["quick"] is True


def test_targets_agree_with_the_sections(quick_run):
    report = quick_run["report"]
    targets = report["targets"]
    kernel_widths = report["sections"]["kernels"]["config"]["widths"]
    table_dtype_configs = {(r["d"], r["n"]) for r in report["sections"]["kernels"]["table_dtype"]["results"]}
    # two N=1 targets, one large-N per width, bf16 vs fp32 per (d, N), block, model
    assert len(targets) == 2 + len(kernel_widths) + len(table_dtype_configs) + 2
    for t in targets:
        assert t["comparison"] in ("<=", ">=") and t["measured"] is not None
        met = t["measured"] <= t["threshold"] if t["comparison"] == "<=" else t["measured"] >= t["threshold"]
        assert t["status"] == ("met" if met else "missed")
        assert close(t["off_by"], 0.0 if met else abs(t["measured"] / t["threshold"] - 1))
        assert t["why"]
    block_decode = next(r for r in report["sections"]["blocks"]["results"] if r["phase"] == "decode")
    assert close(targets[-2]["measured"], block_decode["latency_ratio"])
    assert close(targets[-1]["measured"], report["sections"]["models"]["ratios"]["decode_tokens_per_s"])
    assert report["headline"]["training_tokens_per_s"] == report["sections"]["training"]["ratio"]


def test_markdown_report(quick_run):
    markdown = quick_run["markdown"]
    for heading in ("## Headline ratios", "## Targets", "## 1. Lookup kernels", "## 2. One block"):
        assert heading in markdown
    assert "quick mode" in markdown
    assert markdown.count("| fused lookup forward") == 2 + len(
        quick_run["report"]["sections"]["kernels"]["config"]["widths"]
    )


def test_update_reruns_only_the_named_sections(quick_run, tmp_path):
    """``--update --sections training`` replaces that section of an existing report, keeps the others bit for bit,
    and says in both files what was re-run, when and at which commit; without a report to update it stops at once."""
    import shutil

    from benchmarks.run import merge_update

    output_dir = tmp_path / "results"
    shutil.copytree(quick_run["output_dir"], output_dir)
    before = quick_run["report"]
    result = run_quick(output_dir, ["training", "--update"])
    assert result.returncode == 0, result.stderr[-3000:]
    after = json.loads((output_dir / "latest.json").read_text())
    assert list(after["sections"]) == list(before["sections"])
    assert all(after["sections"][name] == before["sections"][name] for name in before["sections"] if name != "training")
    assert after["sections"]["training"] != before["sections"]["training"]  # re-timed
    assert after["created"] == before["created"] and len(after["updates"]) == 1
    update = after["updates"][0]
    assert update["sections"] == ["training"] and update["created"] >= before["created"] and update["git_commit"]
    assert after["headline"]["training_tokens_per_s"] == after["sections"]["training"]["ratio"]
    assert f"re-run later with `--update`: training on {update['created']}" in (output_dir / "latest.md").read_text()

    rerun = {"sections": {"training": after["sections"]["training"]}, "section_seconds": {"training": 1.0}}
    again = merge_update(after, after | rerun)
    assert [u["sections"] for u in again["updates"]] == [["training"]]  # the re-run replaces the earlier record

    missing = run_quick(tmp_path / "empty", ["training", "--update"])
    assert missing.returncode == 2 and "no report at" in missing.stderr
    with pytest.raises(ValueError, match="same schema and mode"):
        merge_update(before | {"quick": False}, after)


def test_decode_section_rows_targets_and_ratios():
    """Issue 15's decode section in quick mode (eager only): every model × dtype × path row, bounds, targets."""
    from benchmarks.bench_models import run_decode_benchmark
    from benchmarks.report import decode_ratios, decode_targets

    decode = run_decode_benchmark(quick=True)
    rows = {(r["pair"], r["model"], r["dtype"], r["path"]): r for r in decode["results"]}
    assert set(rows) == {
        ("small", "mf-tiny", "fp32", "eager"),
        ("small", "mf-tiny", "bf16", "eager"),
        ("small", "pythia-70m", "fp32", "eager"),
        ("small", "pythia-70m", "bf16", "eager"),
        ("large", "mf-base", "bf16", "eager"),
        ("large", "pythia-410m", "fp32", "eager"),
        ("large", "pythia-410m", "bf16", "eager"),
    }
    bandwidth = decode["config"]["read_bandwidth_gbs"]
    for r in rows.values():
        assert set(SUMMARY_KEYS) <= set(r["decode"]) and r["decode"]["repeats"] == decode["config"]["rounds"]
        assert 0 < r["decode"]["min_us"] <= r["decode"]["median_us"] <= r["decode"]["max_us"]
        assert close(r["bound_tokens_per_s"], bandwidth * 1e9 / r["bytes_per_token"])
        assert close(r["fraction_of_bound"], r["decode"]["tokens_per_s"] / r["bound_tokens_per_s"])
    # bf16 tables halve the gathered bytes of a MemoryFormer; a Pythia model is cast whole
    assert (
        rows[("small", "mf-tiny", "bf16", "eager")]["bytes_per_token"]
        < rows[("small", "mf-tiny", "fp32", "eager")]["bytes_per_token"]
    )
    ratios = decode_ratios(decode)
    tokens_per_s = {key: r["decode"]["tokens_per_s"] for key, r in rows.items()}
    assert close(
        ratios["mf-base bf16 / pythia-410m fp32, eager"],
        tokens_per_s[("large", "mf-base", "bf16", "eager")] / tokens_per_s[("large", "pythia-410m", "fp32", "eager")],
    )
    targets = decode_targets(decode)
    assert len(targets) == 3 and all(t["why"] for t in targets)
    fp32 = [tokens_per_s[("small", m, "fp32", "eager")] for m in ("mf-tiny", "pythia-70m")]
    assert close(targets[0]["measured"], fp32[0] / fp32[1])
    assert targets[2]["measured"] == tokens_per_s[("large", "mf-base", "bf16", "eager")]
