"""`make compare`: final validation with intervals and learning curves of any runs (markdown + CSV + PNG).

python scripts/compare.py runs/study/cpu/pythia-14m-seed* runs/study/cpu/mf-nano-seed* [--output-dir DIR]
python scripts/compare.py 'runs/sweeps/lr/mf-nano-200steps/*' --title "peak LR"

Runs are run directories or globs, in the order the table shows them; the seeds of one configuration (same
config apart from the seed and where it is recorded) are grouped automatically. Each row is tested against the
one before it (Welch's t-test). Exits with status 1 when a given run failed or is unfinished (it is listed in
the report, never averaged in).
"""

import argparse
import sys

from memoryformer.sweeps.compare import compare_runs, print_report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories or globs (a comma-separated list also works)")
    parser.add_argument("--output-dir", default="runs/compare", help="where to write comparison.{md,csv,png}")
    parser.add_argument("--title", default="Comparison", help="the report's title")
    args = parser.parse_args()
    patterns = [pattern for arg in args.runs for pattern in arg.split(",") if pattern]
    return print_report(compare_runs(patterns, args.output_dir, args.title), "not averaged")


if __name__ == "__main__":
    sys.exit(main())
