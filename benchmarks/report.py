"""What a benchmark run means: headline ratios, the issue's targets (met or missed, by how much, and why), and
the markdown report. Pure functions of the run's JSON (``benchmarks.run`` builds it), so a report can be re-made
from a saved ``latest.json``:

    python -m benchmarks.report benchmarks/results/latest.json > report.md
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from benchmarks.kernel_report import render_kernel_report
from memoryformer.reporting import markdown_table

# The targets name d = 512 and 1024 (the kernel run's smallest and largest widths) and "N ≥ 256"; a quick
# run has tiny sizes only, so it checks the same targets on its smallest/largest width and its largest N.
LARGE_N = 256


# --- targets ---------------------------------------------------------------------------------------------------


def verdict(measured: float | None, threshold: float, comparison: str) -> dict[str, Any]:
    """Status and relative miss of ``measured`` against ``threshold`` (``<=``: at most, ``>=``: at least).

    ``off_by`` is how far past the threshold the measurement is, as a fraction of the threshold (0 when met):
    0.2 means 20 % too slow for a ``<=`` target, or 20 % short of a ``>=`` one.
    """
    if comparison not in ("<=", ">="):
        raise ValueError(f"comparison must be '<=' or '>=', got {comparison!r}")
    if measured is None:
        return {"status": "not measured", "off_by": None}
    met = measured <= threshold if comparison == "<=" else measured >= threshold
    off_by = 0.0 if met else abs(measured / threshold - 1)
    return {"status": "met" if met else "missed", "off_by": off_by}


def target(name: str, measured: float | None, threshold: float, comparison: str, why: str) -> dict[str, Any]:
    return {
        "target": name,
        "measured": measured,
        "threshold": threshold,
        "comparison": comparison,
        **verdict(measured, threshold, comparison),
        "why": why,
    }


def kernel_targets(kernels: Mapping[str, Any]) -> list[dict]:
    """Fused CPU forward vs nn.Linear at N = 1 (d = 512: ≤ 0.5×, d = 1024: ≤ 0.35×), and within 1.25× of the
    gather-only embedding_bag at N ≥ 256; fp32 tables."""
    rows = {
        (r["d"], r["n"], r["backend"]): r
        for r in kernels["results"]
        if r["table_dtype"] == "float32" and r["pass"] == "forward"
    }
    widths, tokens = kernels["config"]["widths"], kernels["config"]["tokens"]
    copy_gbs = kernels["machine"]["copy_bandwidth_gbs"]
    out = []
    for d, threshold in ((widths[0], 0.5), (widths[-1], 0.35)):  # the d = 512 and d = 1024
        fused, linear, gather = (rows.get((d, 1, b)) for b in ("cpu", "linear", "gather_only"))
        why = "the fused CPU kernel is not available on this machine"
        if fused:
            why = (
                f"fused {fused['median_us']:.1f} µs vs nn.Linear {linear['median_us']:.1f} µs (which streams "
                f"{d * d * 4 / 1e6:.2f} MB of weights); the gather alone takes "
                f"{gather['ratio_vs_linear']:.2f}× Linear. "
                f"The lookup gathers {fused['bytes_gathered_per_token'] / 1e3:.0f} kB per token at "
                f"{fused['gather_gbs']:.1f} GB/s (copy bandwidth {copy_gbs:.1f} GB/s)"
            )
        measured = fused["ratio_vs_linear"] if fused else None
        out.append(target(f"fused lookup forward ≤ {threshold}× nn.Linear, N=1, d={d}", measured, threshold, "<=", why))
    for d in widths:
        for n in [n for n in tokens if n >= LARGE_N] or tokens[-1:]:
            fused, gather = rows.get((d, n, "cpu")), rows.get((d, n, "gather_only"))
            why = "the fused CPU kernel is not available on this machine"
            if fused:
                extra = fused["median_us"] - gather["median_us"]
                why = (
                    f"the hash and score add {extra:.0f} µs to the gather-only {gather['median_us']:.0f} µs"
                    if extra > 0
                    else f"fused {fused['median_us']:.0f} µs is faster than the gather-only embedding_bag "
                    f"({gather['median_us']:.0f} µs), hash included"
                ) + f"; fused gathers at {fused['gather_gbs']:.1f} GB/s"
            measured = fused["ratio_vs_gather_only"] if fused else None
            out.append(target(f"fused lookup forward ≤ 1.25× gather-only, N={n}, d={d}", measured, 1.25, "<=", why))
    return out


def table_dtype_targets(kernels: Mapping[str, Any]) -> list[dict]:
    """Fused forward with bf16 tables ≤ 1.0× its fp32 latency (issue 15), per (d, N), the worse of cache-warm and
    cache-cold (bench_kernels.run_table_dtype_comparison)."""
    by_config: dict[tuple[int, int], dict[str, dict]] = {}
    for r in kernels.get("table_dtype", {}).get("results", []):
        by_config.setdefault((r["d"], r["n"]), {})[r["cache"]] = r
    out = []
    for (d, n), rows in by_config.items():
        worse = max(rows.values(), key=lambda r: r["ratio"])
        why = "; ".join(
            f"{cache}: bf16 {r['bfloat16']['median_us']:.1f} µs vs fp32 {r['float32']['median_us']:.1f} µs "
            f"({r['ratio']:.2f}×)"
            for cache, r in rows.items()
        )
        out.append(
            target(
                f"bf16 tables: fused lookup forward ≤ 1.0× fp32 tables, N={n}, d={d}", worse["ratio"], 1.0, "<=", why
            )
        )
    return out


def block_target(blocks: Mapping[str, Any], copy_bandwidth_gbs: float | None) -> dict:
    """MemoryFormer block decode latency ≤ 0.25× the Pythia block's at the smallest width (d = 512)."""
    decode = [r for r in blocks["results"] if r["phase"] == "decode"]
    row = min(decode, key=lambda r: r["d"])
    mf, pythia = row["memoryformer"], row["pythia"]
    floor = ""
    if copy_bandwidth_gbs:
        # Reading is half of a copy's (read + write) traffic.
        read_us = (mf["weight_bytes_per_token"] + row["kv_cache_bytes"]) / (copy_bandwidth_gbs / 2 * 1e9) * 1e6
        floor = f". Reading the MemoryFormer block's weights and cache at this machine's bandwidth: ~{read_us:.0f} µs"
    modules, operator = row.get("memoryformer_modules"), row.get("memoryformer_operator")
    fused = (
        f" (one fused operator, {operator['median_us']:.0f} µs of it in the operator itself and the rest Python "
        f"around it; its modules take {modules['median_us']:.0f} µs, {modules['median_us'] / mf['median_us']:.1f}× "
        f"longer)"
        if modules and operator
        else ""
    )
    why = (
        f"{mf['model']} block {mf['median_us']:.0f} µs{fused} vs {pythia['model']} block {pythia['median_us']:.0f} "
        f"µs, both with the in-place KV cache. Weights read per token: {mf['weight_bytes_per_token'] / 1e6:.2f} MB vs "
        f"{pythia['weight_bytes_per_token'] / 1e6:.2f} MB ({1 / row['weight_bytes_ratio']:.0f}× fewer), but both "
        f"also append to and attend over the {row['kv_cache_bytes'] / 1e6:.2f} MB KV cache of {row['kv_cache']} "
        f"tokens: that shared part alone (SDPA) takes {row['attention']['median_us']:.0f} µs; beyond it the ratio "
        f"is {row['latency_ratio_beyond_attention']:.2f}{floor}"
    )
    return target(
        f"block decode latency ≤ 0.25× Pythia's, d={row['d']}, KV cache {row['kv_cache']}",
        row["latency_ratio"],
        0.25,
        "<=",
        why,
    )


def model_target(models: Mapping[str, Any]) -> dict:
    """mf-tiny greedy decode tokens/s ≥ pythia-70m's."""
    mf, pythia = models["results"]
    why = (
        f"{mf['model']} {mf['decode']['tokens_per_s']:.1f} vs {pythia['model']} "
        f"{pythia['decode']['tokens_per_s']:.1f} tokens/s. Weights read per token: "
        f"{mf['weight_bytes_per_token'] / 1e6:.0f} MB vs {pythia['weight_bytes_per_token'] / 1e6:.0f} MB, of which "
        f"the shared dense LM head is {mf['lm_head_bytes'] / 1e6:.0f} MB"
    )
    return target(
        f"{mf['model']} greedy decode tokens/s ≥ {pythia['model']}'s",
        models["ratios"]["decode_tokens_per_s"],
        1.0,
        ">=",
        why,
    )


def _decode_rows(decode: Mapping[str, Any], pair: str) -> dict[tuple[str, str, str], dict]:
    return {(r["model"], r["dtype"], r["path"]): r for r in decode["results"] if r["pair"] == pair}


def decode_targets(decode: Mapping[str, Any]) -> list[dict]:
    """Issue 15: mf-tiny ≥ 1.5× pythia-70m decode tokens/s on their best common path (fp32; the path on which the
    baseline is fastest), mf-tiny at ≥ 60% of its bandwidth bound, and mf-base (bf16 tables) decoding at all."""
    out = []
    small = _decode_rows(decode, "small")
    mf_name, pythia_name = (
        next(r["model"] for r in small.values() if r["family"] == f) for f in ("memoryformer", "pythia")
    )
    paths = sorted({path for (_, dtype, path) in small if dtype == "fp32"})
    best = max(paths, key=lambda p: small[(pythia_name, "fp32", p)]["decode"]["tokens_per_s"])
    mf, pythia = small[(mf_name, "fp32", best)], small[(pythia_name, "fp32", best)]
    ratio = mf["decode"]["tokens_per_s"] / pythia["decode"]["tokens_per_s"]
    why = "; ".join(
        f"{path}: {small[(mf_name, 'fp32', path)]['decode']['tokens_per_s']:.1f} vs "
        f"{small[(pythia_name, 'fp32', path)]['decode']['tokens_per_s']:.1f} tokens/s"
        for path in paths
    )
    out.append(target(f"{mf_name} decode tokens/s ≥ 1.5× {pythia_name}'s, fp32, {best} path", ratio, 1.5, ">=", why))
    mf_best = max((r for r in small.values() if r["model"] == mf_name), key=lambda r: r["fraction_of_bound"])
    why = "; ".join(
        f"{r['model']} {r['dtype']} {r['path']}: {r['decode']['tokens_per_s']:.1f} of {r['bound_tokens_per_s']:.0f} "
        f"tokens/s ({r['fraction_of_bound']:.0%}, {r['bytes_per_token'] / 1e6:.0f} MB/token)"
        for r in small.values()
    )
    out.append(
        target(
            f"{mf_name} decode ≥ 60% of its bandwidth bound ({mf_best['dtype']}, {mf_best['path']})",
            mf_best["fraction_of_bound"],
            0.6,
            ">=",
            why + f"; read bandwidth {decode['config']['read_bandwidth_gbs']:.1f} GB/s",
        )
    )
    large = _decode_rows(decode, "large")
    if large:
        mf_base = next(r for r in large.values() if r["family"] == "memoryformer")
        why = "; ".join(
            f"{r['model']} {r['dtype']} {r['path']}: {r['decode']['tokens_per_s']:.2f} tokens/s, "
            f"{r['fraction_of_bound']:.0%} of its bound ({r['bound_tokens_per_s']:.0f})"
            for r in large.values()
        )
        measured = mf_base["decode"]["tokens_per_s"]
    else:
        measured, why = None, decode["skipped"].get("large", "not run")
    out.append(target("mf-base (bf16 tables) decodes on this machine: tokens/s > 0", measured, 0.0, ">=", why))
    return out


def evaluate_targets(sections: Mapping[str, Any]) -> list[dict]:
    """Every target whose section ran (a failed or skipped section contributes none)."""
    out = []
    if "kernels" in sections:
        out += kernel_targets(sections["kernels"]) + table_dtype_targets(sections["kernels"])
    if "blocks" in sections:
        copy_bandwidth = sections["kernels"]["machine"]["copy_bandwidth_gbs"] if "kernels" in sections else None
        out.append(block_target(sections["blocks"], copy_bandwidth))
    if "models" in sections:
        out.append(model_target(sections["models"]))
    if "decode" in sections:
        out += decode_targets(sections["decode"])
    return out


# --- headline ratios ---------------------------------------------------------------------------------------------


def headline_ratios(sections: Mapping[str, Any]) -> dict[str, Any]:
    """The few numbers the README quotes: MemoryFormer / baseline, of latency (lower is better) or of tokens/s
    (higher is better) as each key says."""
    out: dict[str, Any] = {}
    if "kernels" in sections:
        kernels = sections["kernels"]
        tokens = kernels["config"]["tokens"]
        fused = {
            (r["d"], r["n"]): r
            for r in kernels["results"]
            if r["backend"] == "cpu" and r["table_dtype"] == "float32" and r["pass"] == "forward"
        }
        out["lookup_forward_latency_vs_linear"] = {
            f"d={d},N={n}": r["ratio_vs_linear"] for (d, n), r in fused.items() if n in (tokens[0], tokens[-1])
        }
        out["lookup_forward_latency_vs_gather_only"] = {
            f"d={d},N={n}": r["ratio_vs_gather_only"] for (d, n), r in fused.items() if n == tokens[-1]
        }
    if "blocks" in sections:
        out["block_latency"] = {f"{r['phase']},d={r['d']}": r["latency_ratio"] for r in sections["blocks"]["results"]}
    if "models" in sections:
        ratios = sections["models"]["ratios"]
        out["model_decode_tokens_per_s"] = ratios["decode_tokens_per_s"]
        out["model_generate_tokens_per_s"] = ratios["generate_tokens_per_s"]
        out["model_prefill_tokens_per_s"] = ratios["prefill_tokens_per_s"]
    if "decode" in sections:
        out["decode_tokens_per_s"] = decode_ratios(sections["decode"])
    if "training" in sections:
        out["training_tokens_per_s"] = sections["training"]["ratio"]
    return out


def decode_ratios(decode: Mapping[str, Any]) -> dict[str, float]:
    """Decode tokens/s ratios: MemoryFormer / Pythia per (pair, dtype, path), compiled / eager and bf16 / fp32
    per model."""
    out = {}
    rows = {(r["pair"], r["model"], r["dtype"], r["path"]): r["decode"]["tokens_per_s"] for r in decode["results"]}
    by_pair: dict[str, dict[str, str]] = {}
    for r in decode["results"]:
        by_pair.setdefault(r["pair"], {})[r["family"]] = r["model"]
    for (pair, model, dtype, path), value in rows.items():
        models = by_pair[pair]
        if model == models.get("memoryformer"):
            for pythia_dtype in ("fp32", "bf16"):
                baseline = rows.get((pair, models.get("pythia"), pythia_dtype, path))
                if baseline:
                    out[f"{model} {dtype} / {models['pythia']} {pythia_dtype}, {path}"] = value / baseline
        if path == "compiled" and (pair, model, dtype, "eager") in rows:
            out[f"{model} {dtype}: compiled / eager"] = value / rows[(pair, model, dtype, "eager")]
        if dtype == "bf16" and (pair, model, "fp32", path) in rows:
            out[f"{model} {path}: bf16 / fp32"] = value / rows[(pair, model, "fp32", path)]
    return out


# --- markdown ----------------------------------------------------------------------------------------------------


def _spread(summary: Mapping[str, float], scale: float = 1.0, digits: int = 0) -> str:
    """'median (min–max)' of a timing summary in µs, divided by ``scale``."""
    m, lo, hi = (summary[k] / scale for k in ("median_us", "min_us", "max_us"))
    return f"{m:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def _verdict_text(t: Mapping[str, Any]) -> str:
    if t["status"] == "missed":
        return f"**missed** by {t['off_by']:.0%}"
    return t["status"]


def _headline_lines(report: Mapping[str, Any]) -> list[str]:
    h, lines = report["headline"], []

    def joined(ratios: Mapping[str, float]) -> str:
        return ", ".join(f"{key} {value:.2f}×" for key, value in ratios.items())

    if "lookup_forward_latency_vs_linear" in h:
        lines.append(
            f"- Lookup forward latency / nn.Linear's (fused, fp32): {joined(h['lookup_forward_latency_vs_linear'])}"
        )
        lines.append(f"- Lookup forward latency / gather-only: {joined(h['lookup_forward_latency_vs_gather_only'])}")
    if "block_latency" in h:
        lines.append(f"- Block latency / Pythia block's: {joined(h['block_latency'])}")
    if "model_decode_tokens_per_s" in h:
        lines.append(
            f"- Whole model tokens/s / Pythia's: decode {h['model_decode_tokens_per_s']:.2f}×, generate "
            f"{h['model_generate_tokens_per_s']:.2f}×, prefill "
            + ", ".join(f"{n} tokens {v:.2f}×" for n, v in h["model_prefill_tokens_per_s"].items())
        )
    if "decode_tokens_per_s" in h:
        lines.append(f"- Decode tokens/s (generate, issue 15): {joined(h['decode_tokens_per_s'])}")
    if "training_tokens_per_s" in h:
        lines.append(f"- Training tokens/s / Pythia's: {h['training_tokens_per_s']:.2f}×")
    if "data" in report["sections"]:
        lines.append(f"- Data preparation: {report['sections']['data']['tokens_per_second']:,} tokens/s")
    return lines


def _optional(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.2f}"


def _machine_lines(report: Mapping[str, Any]) -> list[str]:
    m = report["machine"]
    env = ", ".join(f"{k}={v}" for k, v in m["thread_env"].items()) or "none set"
    others = max(m["busy_cpus_start"] or 0.0, report["busy_cpus_end"] or 0.0)
    busy = []
    if others + m["threads"] > m["cpus"] + 0.5:
        busy = [
            f"- **Busy machine**: other processes kept {others:.1f} CPUs busy (sampled before and after the run), "
            f"and this run used {m['threads']} threads, on {m['cpus']} CPUs. When threads outnumber free cores, "
            f"OpenMP threads wait for each other at every parallel region and small calls inflate by milliseconds: "
            f"compare within rows only, and re-run on a quiet machine (or with fewer `--threads`) before quoting."
        ]
    return [
        *busy,
        f"- CPU: {m['cpu_model']}, {m['cpus']} logical CPUs (affinity {m['affinity']}), L2 {m['l2_cache']}, "
        f"L3 {m['l3_cache']}, {m['memory_gib']:.0f} GiB RAM",
        f"- torch {m['torch']} ({m['torch_parallel_backend']}, CPU capability {m['cpu_capability']}), "
        f"transformers {m['transformers']}, Python {m['python']}",
        f"- threads pinned to {m['threads']} (inter-op {m['interop_threads']}; thread environment: {env}); "
        f"lookup backend `auto` → `{m['lookup_backend_auto']}`",
        f"- CPUs busy with other processes: {_optional(m['busy_cpus_start'])} before, "
        f"{_optional(report['busy_cpus_end'])} after the run; load average (1 min) "
        f"{m['load_average_start'][0]:.2f} at start, {report['load_average_end'][0]:.2f} at end; "
        f"commit {m['git_commit'] or 'unknown'}",
    ]


def _table_dtype_lines(kernels: Mapping[str, Any]) -> list[str]:
    rows = [
        {
            "d": r["d"],
            "N": r["n"],
            "cache": r["cache"],
            "fp32 µs": f"{r['float32']['median_us']:.1f}",
            "bf16 µs": f"{r['bfloat16']['median_us']:.1f}",
            "bf16 / fp32": f"{r['ratio']:.2f}",
        }
        for r in kernels.get("table_dtype", {}).get("results", [])
    ]
    if not rows:
        return []
    return [
        "",
        "Fused forward, bf16 against fp32 tables, the two alone taking turns (a bf16 `embedding_bag` row above "
        "converts its whole table per call and evicts the cache the next row reads); cold: a 64 MB read between calls.",
        "",
        markdown_table(rows, list(rows[0])),
    ]


def _kernel_section(kernels: Mapping[str, Any]) -> list[str]:
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in kernels["results"]:
        by_key.setdefault((r["d"], r["n"], r["table_dtype"], r["pass"]), {})[r["backend"]] = r
    rows = []
    for (d, n, dtype, pass_), backends in by_key.items():
        fused = backends.get("cpu")
        linear = by_key.get((d, n, "float32", pass_), {}).get("linear")
        row = {"d": d, "N": n, "tables": dtype, "pass": pass_.replace("_", "+")}
        for column, backend in (
            ("nn.Linear µs", linear),
            ("gather-only µs", backends.get("gather_only")),
            ("embedding_bag µs", backends.get("embedding_bag")),
            ("fused µs", fused),
            ("reference µs", backends.get("reference")),
        ):
            row[column] = f"{backend['median_us']:.1f}" if backend else None
        row["fused × Linear"] = f"{fused['ratio_vs_linear']:.2f}" if fused else None
        row["fused × gather"] = f"{fused['ratio_vs_gather_only']:.2f}" if fused else None
        row["fused GB/s"] = f"{fused['gather_gbs']:.1f}" if fused else None
        rows.append(row)
    machine = kernels["machine"]
    return [
        "## 1. Lookup kernels",
        "",
        f"One Memory Layer d → d (τ = 8, K = d/8) against `nn.Linear(d, d)` in fp32. Median µs per call; "
        f"`gather-only` is `F.embedding_bag` on precomputed rows and weights (the floor for a fused hash + gather); "
        f"`fused` is the C++ CPU operator. GB/s = table bytes gathered per second; this machine's copy bandwidth "
        f"is {machine['copy_bandwidth_gbs']:.1f} GB/s (read + write, {machine['copy_megabytes']} MB). "
        f"min/max per row are in the JSON.",
        "",
        markdown_table(rows, list(rows[0])) if rows else "(no results)",
        *_table_dtype_lines(kernels),
    ]


def _block_section(blocks: Mapping[str, Any]) -> list[str]:
    cfg = blocks["config"]
    rows = [
        {
            "d": r["d"],
            "phase": r["phase"],
            "tokens": r["tokens"],
            "KV cache": r["kv_cache"],
            "MemoryFormer ms": f"{r['memoryformer']['model']}: {_spread(r['memoryformer'], 1e3, 2)}",
            "Pythia ms": f"{r['pythia']['model']}: {_spread(r['pythia'], 1e3, 2)}",
            "latency ratio": f"{r['latency_ratio']:.3f}",
            "MemoryFormer modules ms": _spread(r["memoryformer_modules"], 1e3, 2) if r["phase"] == "decode" else "",
            "fused operator ms": _spread(r["memoryformer_operator"], 1e3, 2) if "memoryformer_operator" in r else "",
            "attention ms": _spread(r["attention"], 1e3, 2),
            "ratio beyond attention": f"{r['latency_ratio_beyond_attention']:.3f}",
            "weight MB/token": f"{r['memoryformer']['weight_bytes_per_token'] / 1e6:.2f} vs "
            f"{r['pythia']['weight_bytes_per_token'] / 1e6:.2f}",
            "KV MB": f"{r['kv_cache_bytes'] / 1e6:.2f}",
        }
        for r in blocks["results"]
    ]
    return [
        "## 2. One block",
        "",
        f"A `MemoryFormerBlock` against transformers' `GPTNeoXLayer`, each built from its model's registry config "
        f"({cfg['dtype']}, {cfg['attention']} attention, lookup `{cfg['lookup_backend']}`). Decode: one token "
        f"against a KV cache of {cfg['kv_cache']} (the in-place cache for both; the MemoryFormer block runs as one "
        f"fused operator, `MemoryFormer modules` is its module path with transformers' `DynamicCache`, and "
        f"`fused operator` the operator alone, without the Python around it); "
        f"prefill: {cfg['prefill_tokens']} tokens, causal. Median ms "
        f"(min–max). `attention`: the part both blocks share (KV-cache append and SDPA) timed alone; the last "
        f"ratio takes it off both blocks. Weight MB/token: parameter bytes one token reads (a Memory Layer reads "
        f"only its K rows).",
        "",
        markdown_table(rows, list(rows[0])),
    ]


def _model_section(models: Mapping[str, Any]) -> list[str]:
    cfg = models["config"]
    rows = []
    for r in models["results"]:
        row = {
            "model": r["model"],
            "parameters": f"{r['parameters']:,}",
            "decode tokens/s": f"{r['decode']['tokens_per_s']:.1f}",
            "decode ms/token": _spread(r["decode"], 1e3 * cfg["new_tokens"], 1),
            "generate tokens/s": f"{r['generate']['tokens_per_s']:.1f}",
            "weight MB/token": f"{r['weight_bytes_per_token'] / 1e6:.0f}",
        }
        for p in r["prefill"]:
            row[f"prefill {p['tokens']} tokens/s"] = f"{p['tokens_per_s']:.0f}"
        row["build s"] = f"{r['build_seconds']:.1f}"
        rows.append(row)
    return [
        "## 3. Whole model",
        "",
        f"Greedy decoding of {cfg['new_tokens']} tokens after a {cfg['prompt_tokens']}-token prompt: `decode` times "
        f"the decode steps alone (prompt already in the KV cache), `generate` is `model.generate` end to end "
        f"(prefill included). Prefill: one forward, logits of the last position only. {cfg['dtype']}, "
        f"{cfg['attention']}, lookup `{cfg['lookup_backend']}`.",
        "",
        markdown_table(rows, list(rows[0])),
    ]


def _decode_section(decode: Mapping[str, Any]) -> list[str]:
    cfg = decode["config"]
    rows = [
        {
            "model": r["model"],
            "dtype": r["dtype"],
            "path": r["path"],
            "decode tokens/s": f"{r['decode']['tokens_per_s']:.2f}",
            "ms/token": _spread(r["decode"], 1e3, 1),
            "MB/token": f"{r['bytes_per_token'] / 1e6:.0f}",
            "bound tokens/s": f"{r['bound_tokens_per_s']:.0f}",
            "of bound": f"{r['fraction_of_bound']:.0%}",
        }
        for r in decode["results"]
    ]
    skipped = [f"- {pair} pair skipped: {why}" for pair, why in decode["skipped"].items()]
    return [
        "## 3b. Decode paths and dtypes",
        "",
        f"Greedy `generate` of {cfg['new_tokens']} tokens after a {cfg['prompt_tokens']}-token prompt; decode "
        f"time per step excludes the prefill. `eager`: the in-place KV cache for both families (MemoryFormer's "
        f"blocks then decode fused, `models/kv_cache.py`); `compiled`: static KV cache + "
        f"`torch.compile` of the step (`memoryformer.models.decode`), the same machinery for both families "
        f"(compiled only for the small pair). `bf16`: MemoryFormer's tables in bf16 (dense parts fp32), Pythia cast "
        f"whole. Variants take turns, {cfg['rounds']} rounds, median (min–max); compilation excluded. Bound: GEMV read "
        f"bandwidth {cfg['read_bandwidth_gbs']:.1f} GB/s / bytes a step reads (weights, gathered rows, KV cache).",
        "",
        markdown_table(rows, list(rows[0])) if rows else "(no results)",
        *(["", *skipped] if skipped else []),
    ]


def _training_section(training: Mapping[str, Any]) -> list[str]:
    cfg = training["config"]
    rows = [
        {
            "model": r["model"],
            "parameters": f"{r['parameters']:,}",
            "step s": _spread(r, 1e6, 2),
            "tokens/s": f"{r['tokens_per_s']:.0f}",
        }
        for r in training["results"]
    ]
    return [
        "## 4. Training",
        "",
        f"Optimizer steps with the trainer's defaults (`conf/train/default.yaml`): sequence {cfg['seq_len']}, "
        f"micro-batch {cfg['micro_batch']} × {cfg['accumulation_steps']} accumulation steps = "
        f"{cfg['tokens_per_step']} tokens per step, {cfg['precision']}, AdamW + clipping + schedule; "
        f"{cfg['data']} (throughput does not depend on the tokens). Median step time (min–max).",
        "",
        markdown_table(rows, list(rows[0])),
    ]


def _data_section(data: Mapping[str, Any]) -> list[str]:
    return [
        "## 5. Data preparation",
        "",
        f"Tokenizing {data['source_megabytes']} MB of the shared sample ({data['files']} files, {data['documents']} "
        f"documents) into {data['tokens']:,} tokens with {data['tokenizer_processes']} tokenizer processes: "
        f"**{data['tokens_per_second']:,} tokens/s** ({data['megabytes_per_second']} MB/s, "
        f"{data['tokens_per_cpu_second']:,} tokens per CPU-second). Packed {data['sample_seq_len']}-token sample "
        f"reads: {data['sample_reads_per_second']:,}/s.",
    ]


SECTION_WRITERS = {
    "kernels": _kernel_section,
    "blocks": _block_section,
    "models": _model_section,
    "decode": _decode_section,
    "training": _training_section,
    "data": _data_section,
    "gpu_kernels": render_kernel_report,
}


def render_markdown(report: Mapping[str, Any]) -> str:
    """The human-readable report of one run (``benchmarks.run``'s JSON)."""
    sections = report["sections"]
    lines = [
        "# Benchmarks: does the lookup beat the matmul?",
        "",
        f"`make bench` run of {report['created']}"
        + (" in **quick mode** (tiny sizes: the numbers only check the pipeline)" if report["quick"] else "")
        + f"; {report['wall_seconds']:.0f} s in all "
        + "("
        + ", ".join(f"{k} {v:.0f} s" for k, v in report["section_seconds"].items())
        + ").",
        "",
        *_machine_lines(report),
        *(
            f"- re-run later with `--update`: {', '.join(u['sections'])} on {u['created']} at commit {u['git_commit']}"
            for u in report.get("updates", [])
        ),
        "",
        "Latencies are medians over repeats, warm-up excluded; the implementations compared in a row take turns call "
        "by call, so load from other processes hits them alike, but other processes on this machine still add "
        "noise: re-run before trusting a small difference. Ratios are MemoryFormer / baseline.",
        "",
        "## Headline ratios",
        "",
        *_headline_lines(report),
        "",
        "## Targets",
        "",
    ]
    if report["targets"]:
        rows = [
            {
                "target": t["target"],
                "measured": "" if t["measured"] is None else f"{t['measured']:.3f}",
                "threshold": f"{t['comparison']} {t['threshold']}",
                "verdict": _verdict_text(t),
                "why": t["why"],
            }
            for t in report["targets"]
        ]
        lines.append(markdown_table(rows, list(rows[0])))
    else:
        lines.append("(no section with a target ran)")
    for name, write in SECTION_WRITERS.items():
        if name in sections:
            lines += ["", *write(sections[name])]
    if report["errors"]:
        lines += ["", "## Failed sections", ""]
        lines += [f"- `{name}`: {error}" for name, error in report["errors"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Re-render the markdown report of a saved benchmark JSON.")
    parser.add_argument("json_path", type=Path)
    print(render_markdown(json.loads(parser.parse_args().json_path.read_text())), end="")
