"""Pretrain a model: ``python scripts/pretrain.py model=mf-tiny train.max_steps=1000`` (see conf/).

Ablation sweeps (spec §6): ``python scripts/pretrain.py -m +sweep=tau_k`` (conf/sweep/); in a multirun a failed
run is recorded in its run directory and the sweep goes on (memoryformer.sweeps.pretrain_job).

Exit status: 0 finished; 75 stopped by SIGTERM/SIGINT/SIGUSR1 after saving a checkpoint (run the same command to
resume; README "Scaling up"); 1 an error (a bad config fails before any work, naming the key).
"""

import hydra
from omegaconf import DictConfig

from memoryformer.cli import reports_user_errors
from memoryformer.config import register_resolvers
from memoryformer.sweeps import pretrain_job, register_sweep_resolvers

register_resolvers()
register_sweep_resolvers()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    pretrain_job(cfg)


if __name__ == "__main__":
    main()
