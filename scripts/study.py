"""`make study`: the small-scale reproduction study (issue 13), resumable run by run, and its report.

python scripts/study.py [--preset cpu|gpu|path.yaml] [--set key=value ...] [--max-runs N] [--report-only]
                        [hydra overrides for every run, e.g. train.max_steps=100]

Trains every (configuration, seed) of conf/study/<preset>.yaml that is not finished yet, one scripts/pretrain.py
process after another (an interrupted run resumes from its last checkpoint; finished runs are skipped), then writes
the report (markdown, CSV, learning curves) to the preset's report_dir. Run it again to continue. Exits with
status 1 while runs are unfinished or failed.
"""

import argparse
import shlex
import sys

from memoryformer.cli import reports_user_errors
from memoryformer.sweeps.study import check_study_inputs, load_study, run_study, write_study_report


@reports_user_errors
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", help="conf/study/<preset>.yaml, or a YAML path (default cpu)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a preset key")
    parser.add_argument("--max-runs", type=int, help="train at most N runs now (a study in slices), then report")
    parser.add_argument("--report-only", action="store_true", help="train nothing; report what has finished")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides appended to every run's")
    args = parser.parse_args()
    command = shlex.join(["python", "scripts/study.py", *sys.argv[1:]])
    study = load_study(args.preset, args.set)
    if not args.report_only:
        check_study_inputs(study, args.overrides)
        outcome = run_study(study, args.overrides, args.max_runs, command)
        print({key: len(names) for key, names in outcome.items()})
    report = write_study_report(study, command, args.overrides)
    print(report["paths"]["markdown"].read_text())
    for path in report["paths"].values():
        print(path)
    return 0 if report["finished"] == report["expected"] else 1


if __name__ == "__main__":
    sys.exit(main())
