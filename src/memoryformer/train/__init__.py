"""Training: the Trainer and its loop, optimizer groups and schedule, verified checkpoints, run-directory safety
(spec §4; issue 12)."""

from memoryformer.train.preemption import PREEMPTED_EXIT_CODE, Preempted
from memoryformer.train.trainer import NonFiniteTrainingError, Trainer, pretrain

__all__ = ["PREEMPTED_EXIT_CODE", "NonFiniteTrainingError", "Preempted", "Trainer", "pretrain"]
