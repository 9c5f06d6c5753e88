"""``make bench``: does the lookup beat the matmul? Every benchmark in one run, as ratios (issue 8).

    python -m benchmarks.run [--quick] [--sections kernels blocks models decode training data gpu_kernels] [--threads N]
                             [--output-dir benchmarks/results] [--update]

Sections: 1 ``kernels`` (``bench_kernels``: Memory Layer lookups vs nn.Linear), 2 ``blocks`` and 3 ``models``
(``bench_models``: one block, then mf-tiny vs pythia-70m), ``decode`` (``bench_models``: eager vs compiled, fp32
vs bf16 tables, mf-base vs pythia-410m), 4 ``training`` (``bench_training``: mf-nano vs pythia-14m), 5 ``data``
(``bench_data``: corpus preparation), 6 ``gpu_kernels`` (``kernel_report``: the Triton
kernels' compiled code before/after issue 16 and their roofline model; no GPU needed). Torch's thread count is
pinned first (default: every CPU this process may run on) and reported with the machine (CPU, caches, torch build,
the lookup backend ``auto`` resolves to). Writes ``latest.json`` and ``latest.md`` (see :mod:`benchmarks.report`)
atomically into the output directory. A section that fails is reported in both files and makes the exit status 1;
the others still run. ``--update`` re-runs only the named sections into the existing report (e.g. the compiled-code
section after a kernel change, without re-timing the CPU), and the report says which sections came from which run.
``--quick`` shrinks every section to seconds (used by tests/test_benchmarks.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers

from benchmarks.bench_data import run_data_benchmark
from benchmarks.bench_kernels import run_kernel_benchmarks
from benchmarks.bench_models import run_block_benchmark, run_decode_benchmark, run_model_benchmark
from benchmarks.bench_training import run_training_benchmark
from benchmarks.kernel_report import run_kernel_report
from benchmarks.report import evaluate_targets, headline_ratios, render_markdown
from memoryformer.kernels import resolve_backend
from memoryformer.paths import PROJECT_ROOT
from memoryformer.reporting import write_text_atomic

SCHEMA_VERSION = 1
SECTIONS: dict[str, Callable[[bool], dict]] = {
    "kernels": run_kernel_benchmarks,
    "blocks": run_block_benchmark,
    "models": run_model_benchmark,
    "decode": run_decode_benchmark,
    "training": run_training_benchmark,
    "data": run_data_benchmark,
    "gpu_kernels": run_kernel_report,
}
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_PROC_BIND", "OMP_PLACES", "KMP_AFFINITY")


def lscpu() -> dict[str, str]:
    """``lscpu``'s "Key: value" lines (empty when lscpu is missing, e.g. on macOS)."""
    try:
        text = subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=True, env={**os.environ, "LC_ALL": "C"}
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return 0.0


def git_commit() -> str | None:
    """The checked-out commit, with "-dirty" when the work tree differs from it (None outside a git checkout)."""
    try:
        run = {"cwd": PROJECT_ROOT, "capture_output": True, "text": True, "check": True}
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def busy_cpus(seconds: float = 1.0) -> float | None:
    """CPUs kept busy by every process on the machine over the next ``seconds`` (from /proc/stat; None elsewhere).

    Sampled while this process sleeps, so it measures the other processes: unlike the load average, which lags
    by a minute, it tells whether the cores were free when the timings ran.
    """

    def cpu_times() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = cpu_times()
        time.sleep(seconds)
        total1, idle1 = cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    cpus = os.cpu_count() or 1
    return cpus * (1 - (idle1 - idle0) / max(total1 - total0, 1))


def parallel_backend() -> str:
    """The "ATen parallel backend" line of ``torch.__config__.parallel_info()`` (e.g. "OpenMP")."""
    for line in torch.__config__.parallel_info().splitlines():
        if line.startswith("ATen parallel backend"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def machine_info() -> dict[str, Any]:
    """The hardware and software a run's numbers belong to (call after pinning threads)."""
    cpu = lscpu()
    return {
        "cpu_model": cpu.get("Model name", platform.processor() or platform.machine()),
        "cpus": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads_per_core": cpu.get("Thread(s) per core"),
        "l2_cache": cpu.get("L2 cache"),
        "l3_cache": cpu.get("L3 cache"),
        "memory_gib": memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_git": torch.version.git_version,
        "torch_parallel_backend": parallel_backend(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl": torch.backends.mkl.is_available(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "thread_env": {key: os.environ[key] for key in THREAD_ENV if key in os.environ},
        # Resolving compiles the fused CPU kernel on first use: here, before any timing.
        "lookup_backend_auto": resolve_backend("auto", torch.device("cpu")),
        "load_average_start": list(os.getloadavg()),
        "busy_cpus_start": busy_cpus(),
        "git_commit": git_commit(),
    }


def run_benchmarks(quick: bool, sections: Sequence[str], threads: int) -> dict[str, Any]:
    """Pin threads, run the named sections in order and return the full report (JSON-serialisable)."""
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.run", *sys.argv[1:]]),
        "machine": machine_info(),
        "sections": {},
        "section_seconds": {},
        "errors": {},
    }
    for name in sections:
        print(f"[bench] {name} …", file=sys.stderr, flush=True)
        section_started = time.perf_counter()
        try:
            torch.manual_seed(1234)
            report["sections"][name] = SECTIONS[name](quick)
        except Exception as error:  # one broken section must not discard the others' minutes of measurements
            traceback.print_exc()
            report["errors"][name] = f"{type(error).__name__}: {error}"
        report["section_seconds"][name] = time.perf_counter() - section_started
        print(f"[bench] {name} done in {report['section_seconds'][name]:.0f} s", file=sys.stderr, flush=True)
    report["targets"] = evaluate_targets(report["sections"])
    report["headline"] = headline_ratios(report["sections"])
    report["load_average_end"] = list(os.getloadavg())
    report["busy_cpus_end"] = busy_cpus()
    report["wall_seconds"] = time.perf_counter() - started
    return report


def write_report(report: dict[str, Any], output_dir: Path) -> tuple[Path, Path]:
    """``latest.json`` and ``latest.md`` in ``output_dir``, each written atomically."""
    text = json.dumps(report, indent=1, allow_nan=False)  # strict JSON: a NaN or inf is a bug, not a number
    json_path = write_text_atomic(output_dir / "latest.json", text + "\n")
    return json_path, write_text_atomic(output_dir / "latest.md", render_markdown(report))


def merge_update(previous: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``previous`` with ``update``'s sections in place of its own, targets and headline recomputed, and the update
    recorded (sections, time, commit) so the report says which numbers come from which run."""
    if previous.get("schema_version") != update["schema_version"] or previous.get("quick") != update["quick"]:
        raise ValueError(
            "--update needs an existing report of the same schema and mode (quick or full): "
            f"found schema {previous.get('schema_version')}, quick={previous.get('quick')}; run without --update"
        )
    merged = dict(previous)
    merged["sections"] = previous["sections"] | update["sections"]
    merged["section_seconds"] = previous["section_seconds"] | update["section_seconds"]
    names = list(update["section_seconds"])
    merged["errors"] = {k: v for k, v in previous["errors"].items() if k not in names} | update["errors"]
    merged["targets"] = evaluate_targets(merged["sections"])
    merged["headline"] = headline_ratios(merged["sections"])
    record = {"sections": names, "created": update["created"], "git_commit": update["machine"]["git_commit"]}
    # An earlier update's sections that this one re-runs no longer come from it.
    earlier = [u | {"sections": [n for n in u["sections"] if n not in names]} for u in previous.get("updates", [])]
    merged["updates"] = [*(u for u in earlier if u["sections"]), record]
    return merged


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds per section (for tests)")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS), metavar="NAME")
    default_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parser.add_argument("--threads", type=int, default=default_threads, help="torch threads (default: %(default)s)")
    parser.add_argument("--output-dir", type=Path, default=PROJECT_ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--update", action="store_true",
        help="re-run only the named sections into the existing latest.json/md, keeping the others (the report names "
        "the sections re-run, when, and at which commit)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    previous_path = args.output_dir / "latest.json"
    if args.update and not previous_path.is_file():
        parser.error(f"--update: no report at {previous_path} to update; run without --update first")
    report = run_benchmarks(args.quick, args.sections, args.threads)
    if args.update:
        report = merge_update(json.loads(previous_path.read_text()), report)
    json_path, md_path = write_report(report, args.output_dir)
    print(f"[bench] {report['wall_seconds']:.0f} s; wrote {json_path} and {md_path}", file=sys.stderr)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
