"""`make tables`: merge any number of evaluation results into one Table 1 (markdown + CSV).

python scripts/make_tables.py                                         # every results/eval/*/results.json
python scripts/make_tables.py results=[results/eval/mf-tiny,results/eval/pythia-70m] output_dir=/tmp/t
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from memoryformer.config import register_resolvers
from memoryformer.evaluation import make_tables
from memoryformer.evaluation.tables import RESULTS_FILE

register_resolvers()


@hydra.main(config_path="../conf", config_name="tables", version_base="1.3")
def main(cfg: DictConfig) -> None:
    output_dir = Path(cfg.output_dir)
    results = cfg.results if cfg.results is not None else sorted(output_dir.glob(f"*/{RESULTS_FILE}"))
    paths = make_tables(results, output_dir)
    print(paths["markdown"].read_text())


if __name__ == "__main__":
    main()
