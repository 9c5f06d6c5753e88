"""Training: the loop, optimizer groups and schedule, checkpointing (spec §4)."""

from memoryformer.train.loop import pretrain

__all__ = ["pretrain"]
