"""`make download [WHAT=eval,tokenizer,sample,heldout,pile]`: ready a data directory for an offline machine.

    python scripts/download.py                          # eval, tokenizer and sample into data/cache/
    python scripts/download.py --what pile --root /datasets/memoryformer

Everything lands in the layout the local lookup reads (memoryformer.sources): copy the directory to the offline
machine's data/cache/ or point MEMORYFORMER_CACHE (or MEMORYFORMER_DATA) at it. Resumable: run it again after an
interruption and it continues; every file is checked against the hub's published size and sha256.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from memoryformer.cli import reports_user_errors
from memoryformer.paths import cache_dir
from memoryformer.sources import GROUPS, download

DEFAULT_GROUPS = ("eval", "tokenizer", "sample")


@reports_user_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--what",
        default=",".join(DEFAULT_GROUPS),
        help=f"comma-separated groups from {','.join(GROUPS)} (default: {','.join(DEFAULT_GROUPS)}; "
        "pile needs hundreds of GB)",
    )
    parser.add_argument("--root", type=Path, default=None, help=f"target directory (default: {cache_dir()})")
    parser.add_argument("--revision", default=None, help="hub revision instead of the catalogue's (e.g. for pile)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in download([g.strip() for g in args.what.split(",") if g.strip()], args.root, args.revision):
        print(f"ready: {path}")


if __name__ == "__main__":
    main()
