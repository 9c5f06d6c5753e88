"""Pretrain a model: ``python scripts/pretrain.py model=mf-tiny train.max_steps=1000`` (see conf/)."""

import hydra
from omegaconf import DictConfig

from memoryformer.config import register_resolvers
from memoryformer.train import pretrain

register_resolvers()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    pretrain(cfg)


if __name__ == "__main__":
    main()
