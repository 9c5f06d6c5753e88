"""Bucket usage of one block's hash tables (the paper's Figure 4): retrieval counts, statistics and the figure.

python scripts/bucket_usage.py                                     # the newest run's model (runs/LATEST)
python scripts/bucket_usage.py runs/mf-nano-sample                  # a run directory (its model/) or a model dir
python scripts/bucket_usage.py runs/x/model --layer 5 --text notes.txt --max-tokens 65536 --output-dir /tmp/b

Text defaults to the held-out WikiText-2 test split (the `heldout` input: a local copy, or `make download
WHAT=heldout`). Writes bucket_usage_layer<L>.{json,csv,png} and the raw counts (bucket_counts_layer<L>.pt)
into --output-dir (default: <run>/bucket_usage).
"""

import argparse
from pathlib import Path

from memoryformer.cli import reports_user_errors
from memoryformer.data import load_tokenizer
from memoryformer.diagnostics import block_bucket_usage, text_batches, usage_report, write_bucket_usage
from memoryformer.evaluation import latest_checkpoint
from memoryformer.paths import PROJECT_ROOT
from memoryformer.sources import resolve


@reports_user_errors
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "checkpoint", type=Path, nargs="?", help="a model directory or a run directory holding model/ (default: LATEST)"
    )
    parser.add_argument("--layer", type=int, default=0, help="block index (default 0)")
    parser.add_argument("--table", type=int, default=0, help="the table k drawn as bars (default 0)")
    parser.add_argument("--text", type=Path, help="a UTF-8 text file (default: the held-out WikiText-2 test split)")
    parser.add_argument("--max-tokens", type=int, default=32768)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output-dir", type=Path)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    import memoryformer.models  # noqa: F401  (registers MemoryFormer with the Auto classes)

    checkpoint = args.checkpoint or latest_checkpoint(PROJECT_ROOT / "runs")
    model_dir = checkpoint / "model" if (checkpoint / "model" / "config.json").is_file() else checkpoint
    if not (model_dir / "config.json").is_file():
        parser.error(f"{checkpoint} is neither a model directory (config.json) nor a run directory (model/)")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    text = (args.text or resolve("heldout").path).read_text(encoding="utf-8")
    batches = text_batches(load_tokenizer(model_dir), text, args.seq_len, args.max_tokens, args.batch_size)
    usage = block_bucket_usage(model, batches, args.layer)
    output_dir = args.output_dir or model_dir.parent / "bucket_usage"
    paths = write_bucket_usage(usage, output_dir, args.table)
    report = usage_report(usage)
    print(f"block {usage.layer}, {usage.tokens:,} tokens. {report['note']}")
    for name, projection in report["projections"].items():
        summary = projection["summary"]
        print(
            f"  {name:6s} {projection['tables']} tables × {projection['buckets']} buckets: normalised entropy "
            f"mean {summary['mean_normalised_entropy']:.3f} (min {summary['min_normalised_entropy']:.3f}), "
            f"never used {summary['mean_never_used_fraction']:.1%}, max/mean {summary['max_over_mean']:.1f}"
        )
    for path in paths.values():
        print(path)


if __name__ == "__main__":
    main()
