"""`make tables`: merge any number of evaluation results into one Table 1 (markdown + CSV).

python scripts/make_tables.py                                   # every runs/*/eval and runs/eval/* results.json
python scripts/make_tables.py results=[runs/mf-tiny-pile/eval,runs/eval/pythia-70m] output_dir=/tmp/t
"""

import hydra
from omegaconf import DictConfig

from memoryformer.cli import reports_user_errors
from memoryformer.config import register_resolvers
from memoryformer.evaluation import find_results, make_tables

register_resolvers()


@hydra.main(config_path="../conf", config_name="tables", version_base="1.3")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    results = cfg.results if cfg.results is not None else find_results(cfg.runs_dir)
    paths = make_tables(results, cfg.output_dir)
    print(paths["markdown"].read_text())


if __name__ == "__main__":
    main()
