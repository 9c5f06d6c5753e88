"""`make data`: tokenize the configured corpus into data/prepared/ (the trainer also does this on first use).

    python scripts/prepare_data.py                                   # the shared sample (conf/data/sample.yaml)
    python scripts/prepare_data.py data.name=mine 'data.train_files=[/corpus/*.jsonl.zst]' data.valid_files=[] \
        data.valid_fraction=0.001                                    # your own corpus, held-out split by document
"""

from __future__ import annotations

import json
import logging

import hydra
from omegaconf import DictConfig

from memoryformer.cli import reports_user_errors
from memoryformer.config import register_resolvers
from memoryformer.data import IndexedDataset, prepare_configured_corpus

register_resolvers()


@hydra.main(config_path="../conf", config_name="prepare_data", version_base="1.3")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO)
    if not cfg.data.get("train_files"):
        raise SystemExit(f"data config {cfg.data.name!r} is pre-tokenized (train_prefix): nothing to prepare")
    directory = prepare_configured_corpus(cfg.data, show_progress=cfg.progress)
    for split in ("train", "valid"):
        print(f"{split}: {IndexedDataset(directory / split)}")
    meta = json.loads((directory / "meta.json").read_text())
    print(json.dumps({"directory": str(directory), "train_stats": meta["train_stats"]}, indent=2))


if __name__ == "__main__":
    main()
