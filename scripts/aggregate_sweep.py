"""Tabulate an ablation sweep (spec §6, Tables 3–6) from its run directories: markdown, CSV and a PPL plot.

python scripts/aggregate_sweep.py +sweep=tau_k [model=mf-tiny] [train.max_steps=8000]   # the sweep's overrides
python scripts/aggregate_sweep.py --sweep-dir runs/sweeps/tau_k/mf-nano-200steps         # or the directory

The sweep directory is the one `python scripts/pretrain.py -m +sweep=...` with the same overrides trained into.
Exits with status 1 when a run failed or is incomplete (the table, which flags it, is written anyway).
"""

import argparse
import sys

from memoryformer.config import compose_config
from memoryformer.sweeps import aggregate_sweep, register_sweep_resolvers, without_sweeps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="the sweep's Hydra overrides, e.g. +sweep=tau_k model=mf-tiny")
    parser.add_argument("--sweep-dir", help="the sweep's directory (instead of overrides)")
    parser.add_argument("--output-dir", help="where to write the table and plot (default: the sweep directory)")
    args = parser.parse_args()
    if bool(args.sweep_dir) == bool(args.overrides):
        parser.error("give either the sweep's overrides (e.g. +sweep=tau_k) or --sweep-dir, not both or neither")
    sweep, sweep_dir = None, args.sweep_dir
    if args.overrides:
        register_sweep_resolvers()
        cfg = compose_config(without_sweeps(args.overrides))  # the sweep's directory does not depend on them
        if "sweep" not in cfg:
            parser.error("the overrides select no sweep: add +sweep=<tau_k|lr|expand_bits|gelu>")
        sweep, sweep_dir = cfg.sweep.name, cfg.train.output_dir
    result = aggregate_sweep(sweep_dir, args.output_dir, sweep)
    print(result["paths"]["markdown"].read_text())
    for path in result["paths"].values():
        print(path)
    unfinished = [run.name for run in result["runs"] if run.status != "done"]
    if unfinished:
        print(f"runs not done: {', '.join(unfinished)}", file=sys.stderr)
    return 1 if unfinished else 0


if __name__ == "__main__":
    sys.exit(main())
