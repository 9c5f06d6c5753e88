"""Data-pipeline throughput: corpus preparation (tokens/s) on the shared sample, and training-sample reads.

    python benchmarks/bench_data.py [--quick]

Full mode prepares the whole shared training sample (conf/data/sample.yaml's train_files, ~64 MB of text,
16.3M NeoX tokens); quick mode a ~4 MB slice of it. Preparation uses every core (one tokenizer process each).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

from memoryformer.config import compose_config
from memoryformer.data import IndexedDataset, PackedSamples, expand_sources, load_tokenizer, prepare_corpus
from memoryformer.data.prepare import read_documents

QUICK_CHARS = 4 << 20
SEQ_LEN = 2048
SAMPLE_READS = 2000


def _quick_slice(files: list[Path], directory: Path) -> list[Path]:
    """The first ~4 MB of the corpus's documents as one .jsonl file (a book cut at a line boundary)."""
    out, size = directory / "slice.jsonl", 0
    with open(out, "w", encoding="utf-8") as f:
        for path in files:
            for text in read_documents(path):
                text = text[: QUICK_CHARS - size]
                f.write(json.dumps({"text": text}) + "\n")
                size += len(text)
                if size >= QUICK_CHARS:
                    return [out]
    return [out]


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    return sum(
        usage.ru_utime + usage.ru_stime
        for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


def run_data_benchmark(quick: bool) -> dict:
    """Preparation tokens/s and packed-sample reads/s on the shared sample (JSON-serialisable)."""
    data_cfg = compose_config(["data=sample"], config_name="prepare_data").data
    tokenizer = load_tokenizer(data_cfg.tokenizer)
    files = expand_sources(list(data_cfg.train_files))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sources = _quick_slice(files, tmp) if quick else files
        text_bytes = sum(p.stat().st_size for p in sources)
        cpu_before = _cpu_seconds()
        stats = prepare_corpus(sources, tmp / "train", tokenizer, progress=False)
        cpu_seconds = _cpu_seconds() - cpu_before  # the tokenizer processes are reaped by now, so they count
        dataset = IndexedDataset(tmp / "train")
        samples = PackedSamples(dataset, SEQ_LEN, seed=1234)
        reads = min(SAMPLE_READS, len(samples))
        started = time.perf_counter()
        for i in range(reads):
            samples[i]
        read_seconds = time.perf_counter() - started
    return {
        "benchmark": "data_preparation",
        "quick": quick,
        "files": len(sources),
        "source_megabytes": round(text_bytes / 1e6, 2),
        "documents": stats.train_documents,
        "tokens": stats.train_tokens,
        "seconds": round(stats.seconds, 2),
        "tokens_per_second": round(stats.tokens_per_second),
        "megabytes_per_second": round(text_bytes / 1e6 / stats.seconds, 2),
        # On a shared machine wall time depends on the neighbours; CPU time does not.
        "cpu_seconds": round(cpu_seconds, 2),
        "tokens_per_cpu_second": round(stats.train_tokens / cpu_seconds),
        "tokenizer_processes": os.cpu_count(),
        "sample_reads_per_second": round(reads / read_seconds),
        "sample_seq_len": SEQ_LEN,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~4 MB slice instead of the whole sample")
    print(json.dumps(run_data_benchmark(parser.parse_args().quick), indent=2))
