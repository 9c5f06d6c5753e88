"""`make flops`: write Table 1's FLOPs rows, model sizes and Figure 1 (spec §5) into ``output_dir``.

python scripts/flops.py                       # into results/flops
python scripts/flops.py output_dir=/tmp/flops models=[mf-tiny,pythia-70m]
"""

import hydra
from omegaconf import DictConfig

from memoryformer.config import register_resolvers
from memoryformer.flops import write_flops_report

register_resolvers()


@hydra.main(config_path="../conf", config_name="flops", version_base="1.3")
def main(cfg: DictConfig) -> None:
    paths = write_flops_report(
        cfg.output_dir,
        models=cfg.models,
        seq_len=cfg.seq_len,
        figure_seq_lens=cfg.figure.seq_lens,
        figure_hidden_sizes=cfg.figure.hidden_sizes,
        figure_tau=cfg.figure.tau,
    )
    for path in paths.values():
        print(path)


if __name__ == "__main__":
    main()
