"""`make eval-tasks`: write the six tasks' YAMLs for lm-eval's own CLI, reading the resolved local eval files.

    python scripts/eval_tasks.py                                  # → eval/tasks/generated/ (git-ignored)
    lm_eval --model hf --model_args pretrained=runs/mf-nano-sample/model,trust_remote_code=True \
        --tasks piqa,winogrande,wsc,arc_easy,arc_challenge,logiqa --include_path eval/tasks/generated

Each YAML includes lm-eval's installed built-in task and replaces only its dataset source, under the built-in's
name (memoryformer.evaluation.tasks.write_task_yamls). Online, the built-ins need no --include_path.
"""

import hydra
from omegaconf import DictConfig

from memoryformer.config import register_resolvers
from memoryformer.evaluation import write_task_yamls

register_resolvers()


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    for path in write_task_yamls(cfg.tasks_dir, list(cfg.eval.tasks), cfg.eval.data_dir):
        print(path)
    print(f"use with: lm_eval ... --include_path {cfg.tasks_dir}")


if __name__ == "__main__":
    main()
