"""Memory Layer lookup latency on CPU, every backend side by side with nn.Linear and a gather-only baseline.

    python benchmarks/bench_kernels.py [--quick] [--json PATH] [--threads N]

For d ∈ {512, 768, 1024} (τ = 8, K = d/8, h = d) and N ∈ {1, 16, 256, 2048} tokens, with fp32 and bf16 tables,
it times the forward and forward+backward of:

- ``reference``, ``embedding_bag``, ``cpu``: the lookup backends of ``memoryformer.kernels`` (spec §1);
- ``gather_only``: ``F.embedding_bag`` on precomputed rows and weights, in the tables' dtype: the cost of the
  gather alone, i.e. the floor a fused hash + gather should approach;
- ``linear``: ``nn.Linear(d, d)`` in fp32, the layer a Memory Layer replaces (measured once per (d, N)).

``table_dtype`` (``run_table_dtype_comparison``, issue 15): the fused forward with bf16 tables against fp32 tables,
the two alone taking turns, warm (tables as the previous call left them in cache) and cold (a 64 MB read between
calls evicts them, as a model whose tables exceed the cache sees at decode). Alone, because in the main grid a
bf16 ``embedding_bag`` neighbour converts the whole table each call and evicts the caches the next row reads.

Calls cycle through a pool of different inputs so that N = 1 does not re-read the same, cache-hot table rows, and
the backends of one configuration take turns call by call, so that load from other processes hits them alike.
``reference`` is skipped above N = 256 (it materialises [N, K, h]). Latencies are per call, warm-up excluded.
Other processes on the machine add noise: compare rows of one run, and re-run before trusting a small difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from memoryformer.kernels import lookup_function
from memoryformer.kernels.cpu import cpu_kernel_available
from memoryformer.layers.hashing import hash_chunks

TAU = 8
INPUT_POOL = 16  # distinct inputs cycled through, so consecutive calls gather different rows
REFERENCE_MAX_TOKENS = 256
FULL = {"widths": (512, 768, 1024), "tokens": (1, 16, 256, 2048), "seconds": 0.4, "max_repeats": 200}
QUICK = {"widths": (64,), "tokens": (1, 16), "seconds": 0.02, "max_repeats": 20}
WARMUP = 2
MIN_REPEATS = 5


def time_side_by_side(
    calls: dict[str, Callable[[int], object]],
    seconds: float,
    max_repeats: int,
    before: Callable[[], object] | None = None,
) -> dict:
    """Seconds per call of each fn(i), i = 0, 1, …, warm-up excluded.

    The calls take turns (round robin) so that load from other processes hits every backend alike; the repeat
    count is scaled so that the whole comparison takes about `seconds`. ``before()``, if given, runs untimed
    before every timed call (e.g. to evict the caches).
    """
    estimate = 0.0
    for fn in calls.values():
        for i in range(WARMUP):
            fn(i)
        start = time.perf_counter()
        fn(WARMUP)
        estimate += time.perf_counter() - start
    repeats = int(min(max_repeats, max(MIN_REPEATS, seconds / max(estimate, 1e-7))))
    times = {name: [] for name in calls}
    for i in range(repeats):
        for name, fn in calls.items():
            if before is not None:
                before()
            start = time.perf_counter()
            fn(i)
            times[name].append(time.perf_counter() - start)
    return times


def copy_bandwidth_gbs(megabytes: int) -> float:
    """This machine's memory bandwidth as a tensor copy achieves it: (read + write) bytes per second, best of 5."""
    src = torch.ones(megabytes << 18)  # megabytes · 2^20 bytes of fp32
    dst = torch.empty_like(src)
    best = min(time_side_by_side({"copy": lambda _: dst.copy_(src)}, seconds=0.0, max_repeats=MIN_REPEATS)["copy"])
    return 2 * src.numel() * src.element_size() / best / 1e9


def lookup_call(backend: str, inputs, tables, bias, backward: bool) -> Callable[[int], object]:
    """fn(i) running one lookup (and its backward) on the i-th pooled input."""
    lookup = lookup_function(backend)
    grad_y = torch.randn(inputs[0].shape[0], tables.shape[1])

    def call(i: int) -> None:
        x = inputs[i % len(inputs)]
        if not backward:
            with torch.no_grad():
                lookup(x, tables, bias, TAU)
            return
        leaves = (x.detach().requires_grad_(), tables, bias)
        lookup(*leaves, TAU).backward(grad_y)
        for leaf in leaves:
            leaf.grad = None

    return call


def gather_only_call(inputs, tables, backward: bool) -> Callable[[int], object]:
    """fn(i): F.embedding_bag on the i-th input's precomputed rows and weights (the hash is not timed)."""
    hashes = [hash_chunks(x, TAU) for x in inputs]
    pool = [(rows, weights.to(tables.dtype)) for rows, weights in hashes]
    grad_y = torch.randn(inputs[0].shape[0], tables.shape[1], dtype=tables.dtype)

    def call(i: int) -> None:
        rows, weights = pool[i % len(pool)]
        if not backward:
            with torch.no_grad():
                F.embedding_bag(rows, tables, per_sample_weights=weights, mode="sum")
            return
        weights = weights.detach().requires_grad_()
        F.embedding_bag(rows, tables, per_sample_weights=weights, mode="sum").backward(grad_y)
        tables.grad = None

    return call


def linear_call(inputs, linear: torch.nn.Linear, backward: bool) -> Callable[[int], object]:
    grad_y = torch.randn(inputs[0].shape[0], linear.out_features)

    def call(i: int) -> None:
        x = inputs[i % len(inputs)]
        if not backward:
            with torch.no_grad():
                linear(x)
            return
        x = x.detach().requires_grad_()
        linear(x).backward(grad_y)
        linear.zero_grad(set_to_none=True)

    return call


def summarise(times: list[float], n: int) -> dict:
    median = statistics.median(times)
    return {
        "median_us": median * 1e6,
        "min_us": min(times) * 1e6,
        "max_us": max(times) * 1e6,
        "repeats": len(times),
        "tokens_per_s": n / median,
    }


EVICT_MEGABYTES = 64  # more than this machine's 32 MB L3: reading it evicts the tables


def run_table_dtype_comparison(quick: bool) -> dict:
    """Fused forward with bf16 vs fp32 tables, N = 1 and the largest N, smallest and largest d, warm and cold.

    Schema::

        {"results": [{"d": int, "n": int, "cache": "warm" | "cold",
                      "float32": <summary>, "bfloat16": <summary>,
                      "ratio": float}]}   # bf16 median / fp32 median

    Empty results when the fused kernel is unavailable.
    """
    sizes = QUICK if quick else FULL
    if not cpu_kernel_available():
        return {"results": []}
    evict = torch.ones((1 if quick else EVICT_MEGABYTES) << 18)
    results = []
    for d in dict.fromkeys((sizes["widths"][0], sizes["widths"][-1])):
        tables = {torch.float32: 0.02 * torch.randn((d // TAU) << TAU, d)}
        tables[torch.bfloat16] = tables[torch.float32].bfloat16()
        bias = torch.zeros(d)
        for n in dict.fromkeys((1, sizes["tokens"][-1])):
            inputs = [torch.randn(n, d) for _ in range(INPUT_POOL)]
            calls = {
                str(dtype).removeprefix("torch."): lookup_call("cpu", inputs, table, bias, backward=False)
                for dtype, table in tables.items()
            }
            for cache in ("warm", "cold"):
                before = evict.sum if cache == "cold" else None
                timings = time_side_by_side(calls, sizes["seconds"] * 2, sizes["max_repeats"], before)
                row = {"d": d, "n": n, "cache": cache, **{k: summarise(v, n) for k, v in timings.items()}}
                row["ratio"] = row["bfloat16"]["median_us"] / row["float32"]["median_us"]
                results.append(row)
    return {"results": results}


def run_kernel_benchmarks(quick: bool) -> dict:
    """Time every backend side by side; returns a JSON-serialisable dict.

    Schema::

        {
          "machine": {"threads": int, "torch": str, "copy_bandwidth_gbs": float,  # (read+write) B/s of a copy
                      "copy_megabytes": int, "cpu_kernel_available": bool},
          "config": {"quick": bool, "tau": int, "widths": [int], "tokens": [int], "input_pool": int},
          "results": [
            {"d": int, "n": int, "table_dtype": "float32" | "bfloat16",
             "backend": "reference" | "embedding_bag" | "cpu" | "gather_only" | "linear",
             "pass": "forward" | "forward_backward",
             "median_us": float, "min_us": float, "max_us": float, "repeats": int, "tokens_per_s": float,
             "ratio_vs_linear": float,       # median / the fp32 nn.Linear(d, d) median, same d, n and pass
             "ratio_vs_gather_only": float,  # median / gather_only's median, same d, n, tables and pass
             "bytes_gathered_per_token": int,  # K · h · bytes per table value (0 for linear)
             "gather_gbs": float}            # n · bytes_gathered_per_token / median, in GB/s (0 for linear)
          ],
          "table_dtype": <run_table_dtype_comparison's dict>
        }

    ``linear`` rows appear under ``table_dtype`` "float32" only: it is always fp32.
    """
    sizes = QUICK if quick else FULL
    copy_megabytes = 32 if quick else 256
    backends = ["reference", "embedding_bag"] + (["cpu"] if cpu_kernel_available() else [])
    results = []
    for d in sizes["widths"]:
        num_chunks = d // TAU
        linear = torch.nn.Linear(d, d)
        tables_fp32 = 0.02 * torch.randn(num_chunks << TAU, d)
        for n in sizes["tokens"]:
            inputs = [torch.randn(n, d) for _ in range(INPUT_POOL)]
            for table_dtype in (torch.float32, torch.bfloat16):
                tables = tables_fp32.to(table_dtype).requires_grad_()
                bias = torch.zeros(d, requires_grad=True)
                bytes_per_token = num_chunks * d * tables.element_size()
                for backward in (False, True):
                    calls = {b: lookup_call(b, inputs, tables, bias, backward) for b in backends}
                    calls["gather_only"] = gather_only_call(inputs, tables, backward)
                    if table_dtype == torch.float32:
                        calls["linear"] = linear_call(inputs, linear, backward)
                    if n > REFERENCE_MAX_TOKENS:
                        del calls["reference"]
                    timings = time_side_by_side(calls, sizes["seconds"] * len(calls), sizes["max_repeats"])
                    for backend, times in timings.items():
                        row = {
                            "d": d,
                            "n": n,
                            "table_dtype": str(table_dtype).removeprefix("torch."),
                            "backend": backend,
                            "pass": "forward_backward" if backward else "forward",
                            **summarise(times, n),
                        }
                        row["bytes_gathered_per_token"] = 0 if backend == "linear" else bytes_per_token
                        row["gather_gbs"] = n * row["bytes_gathered_per_token"] / (row["median_us"] * 1e-6) / 1e9
                        results.append(row)
    add_ratios(results)
    return {
        "table_dtype": run_table_dtype_comparison(quick),
        "machine": {
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "copy_bandwidth_gbs": copy_bandwidth_gbs(copy_megabytes),
            "copy_megabytes": copy_megabytes,
            "cpu_kernel_available": cpu_kernel_available(),
        },
        "config": {
            "quick": quick,
            "tau": TAU,
            "widths": list(sizes["widths"]),
            "tokens": list(sizes["tokens"]),
            "input_pool": INPUT_POOL,
        },
        "results": results,
    }


def add_ratios(results: list[dict]) -> None:
    """Each row's median over the fp32 nn.Linear's and over gather_only's of the same configuration."""
    medians = {(r["d"], r["n"], r["table_dtype"], r["pass"], r["backend"]): r["median_us"] for r in results}
    for r in results:
        linear = medians[(r["d"], r["n"], "float32", r["pass"], "linear")]
        gather = medians[(r["d"], r["n"], r["table_dtype"], r["pass"], "gather_only")]
        r["ratio_vs_linear"] = r["median_us"] / linear
        r["ratio_vs_gather_only"] = r["median_us"] / gather


def markdown_table(report: dict) -> str:
    machine = report["machine"]
    lines = [
        f"threads: {machine['threads']} · torch {machine['torch']} · copy bandwidth "
        f"{machine['copy_bandwidth_gbs']:.1f} GB/s (read+write, {machine['copy_megabytes']} MB tensor)",
        "",
        "| d | N | tables | pass | backend | median µs | min µs | max µs | tokens/s | × Linear | × gather | GB/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['d']} | {r['n']} | {r['table_dtype']} | {r['pass']} | {r['backend']} | {r['median_us']:.1f} "
            f"| {r['min_us']:.1f} | {r['max_us']:.1f} | {r['tokens_per_s']:.3g} | {r['ratio_vs_linear']:.2f} "
            f"| {r['ratio_vs_gather_only']:.2f} | {r['gather_gbs']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (a few seconds)")
    parser.add_argument("--json", help="also write the results as JSON to this path")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads before timing (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run_kernel_benchmarks(args.quick)
    print(markdown_table(report))
    if args.json:
        path = Path(args.json)
        temporary = path.with_suffix(path.suffix + ".tmp")
        temporary.write_text(json.dumps(report, indent=1))
        temporary.replace(path)  # atomic: a reader never sees half a file
