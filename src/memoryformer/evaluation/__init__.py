"""Zero-shot evaluation with lm-eval-harness on the paper's six tasks, read offline, and Table 1 (spec §6)."""

from memoryformer.evaluation.harness import build_lm, default_model_name, evaluate_checkpoint, latest_checkpoint
from memoryformer.evaluation.paper_results import PAPER_TABLE1, paper_row
from memoryformer.evaluation.tables import make_tables, read_results, write_tables
from memoryformer.evaluation.tasks import PAPER_TASKS, TASKS, load_tasks, task_config

__all__ = [
    "PAPER_TABLE1",
    "PAPER_TASKS",
    "TASKS",
    "build_lm",
    "default_model_name",
    "evaluate_checkpoint",
    "latest_checkpoint",
    "load_tasks",
    "make_tables",
    "paper_row",
    "read_results",
    "task_config",
    "write_tables",
]
