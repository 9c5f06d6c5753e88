"""`make eval`: evaluate a checkpoint zero-shot on the paper's six tasks with lm-eval-harness (spec §6).

python scripts/evaluate.py                                   # the latest `make pretrain` run
python scripts/evaluate.py checkpoint=runs/mf-nano-sample/model eval.tasks=[piqa,wsc] eval.limit=20
python scripts/evaluate.py checkpoint=EleutherAI/pythia-70m-deduped revision=step93000 model_name=pythia-70m
"""

import hydra
from omegaconf import DictConfig

from memoryformer.cli import reports_user_errors
from memoryformer.config import register_resolvers
from memoryformer.evaluation import check_eval_inputs, evaluate_checkpoint, latest_checkpoint
from memoryformer.evaluation.tables import table_markdown

register_resolvers()


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    for task, source in check_eval_inputs(cfg.eval).items():  # missing data fails here, before any model loads
        print(f"{task}: {source.record()}")
    results = evaluate_checkpoint(
        cfg.checkpoint or latest_checkpoint(cfg.runs_dir),
        tasks=list(cfg.eval.tasks),
        limit=cfg.eval.limit,
        output_dir=cfg.output_dir,
        data_dir=cfg.eval.data_dir,
        batch_size=cfg.eval.batch_size,
        device=cfg.eval.device,
        revision=cfg.revision,
        model_name=cfg.model_name,
    )
    if results is not None:
        print(table_markdown([results]))


if __name__ == "__main__":
    main()
