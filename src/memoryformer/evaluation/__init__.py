"""Zero-shot evaluation with lm-eval-harness on the paper's six tasks (local files or hub), and Table 1 (spec §6)."""

from memoryformer.evaluation.harness import build_lm, default_model_name, evaluate_checkpoint, latest_checkpoint
from memoryformer.evaluation.paper_results import PAPER_TABLE1, paper_row
from memoryformer.evaluation.tables import find_results, make_tables, read_results, write_tables
from memoryformer.evaluation.tasks import (
    PAPER_TASKS,
    TASKS,
    check_eval_inputs,
    load_tasks,
    resolve_tasks,
    task_config,
    write_task_yamls,
)

__all__ = [
    "PAPER_TABLE1",
    "PAPER_TASKS",
    "TASKS",
    "build_lm",
    "check_eval_inputs",
    "default_model_name",
    "evaluate_checkpoint",
    "find_results",
    "latest_checkpoint",
    "load_tasks",
    "make_tables",
    "paper_row",
    "read_results",
    "resolve_tasks",
    "task_config",
    "write_tables",
    "write_task_yamls",
]
