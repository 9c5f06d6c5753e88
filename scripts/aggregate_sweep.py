"""Tabulate an ablation sweep (spec §6, Tables 3–6) from its run directories: markdown, CSV, plots.

python scripts/aggregate_sweep.py +sweep=tau_k [seed=1234,1235,1236] [model=mf-tiny]   # the sweep's overrides
python scripts/aggregate_sweep.py --sweep-dir runs/sweeps/tau_k/mf-nano-200steps        # or the directory

The sweep directory is the one `python scripts/pretrain.py -m +sweep=...` with the same overrides trained into.
Per swept value: final validation over the finished seeds (mean ± std, 95% interval), Welch's test against the
previous value, and the paper's number. Exits with status 1 when a seed failed, is incomplete or never started
(the table, which lists it, is written anyway).
"""

import argparse
import sys

from memoryformer.config import compose_config
from memoryformer.sweeps import register_sweep_resolvers, swept_values, without_sweeps
from memoryformer.sweeps.compare import print_report
from memoryformer.sweeps.table import aggregate_sweep


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="the sweep's Hydra overrides, e.g. +sweep=tau_k model=mf-tiny")
    parser.add_argument("--sweep-dir", help="the sweep's directory (instead of overrides)")
    parser.add_argument("--output-dir", help="where to write the table and plot (default: the sweep directory)")
    args = parser.parse_args()
    if bool(args.sweep_dir) == bool(args.overrides):
        parser.error("give either the sweep's overrides (e.g. +sweep=tau_k) or --sweep-dir, not both or neither")
    sweep, sweep_dir, seeds = None, args.sweep_dir, None
    if args.overrides:
        register_sweep_resolvers()
        cfg = compose_config(without_sweeps(args.overrides))  # the sweep's directory does not depend on them
        if "sweep" not in cfg:
            parser.error("the overrides select no sweep: add +sweep=<tau_k|lr|expand_bits|gelu>")
        sweep, sweep_dir = cfg.sweep.name, cfg.train.output_dir
        seeds = swept_values(args.overrides, "seed") or [cfg.seed]
    return print_report(aggregate_sweep(sweep_dir, args.output_dir, sweep, seeds), "seeds not done")


if __name__ == "__main__":
    sys.exit(main())
