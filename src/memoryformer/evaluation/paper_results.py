"""The paper's Table 1 accuracies (spec §6), keyed by our model names.

The Pythia rows are EleutherAI's published zero-shot evals of the deduplicated models (70M at step 93000, the
others final). FLOPs of the same rows live in :data:`memoryformer.flops.PAPER_TABLE1_FLOPS`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from memoryformer.evaluation.tasks import PAPER_TASKS


@dataclass(frozen=True)
class PaperRow:
    """One model's row of the paper's Table 1: accuracy per task and the paper's printed average."""

    name: str
    display_name: str
    layers: int
    hidden: int
    accuracy: dict[str, float]
    average: float


def _row(name: str, display_name: str, layers: int, hidden: int, accuracies: tuple, average: float) -> PaperRow:
    return PaperRow(name, display_name, layers, hidden, dict(zip(PAPER_TASKS, accuracies, strict=True)), average)


# Accuracies in PAPER_TASKS order: PIQA, WinoGrande, WSC, ARC-E, ARC-C, LogiQA.
PAPER_TABLE1: dict[str, PaperRow] = {
    row.name: row
    for row in (
        _row("pythia-70m", "Pythia-70M", 6, 512, (0.585, 0.511, 0.365, 0.380, 0.177, 0.232), 0.375),
        _row("mf-tiny", "MemoryFormer-tiny", 6, 512, (0.602, 0.522, 0.375, 0.437, 0.228, 0.260), 0.404),
        _row("pythia-160m", "Pythia-160M", 12, 768, (0.618, 0.497, 0.365, 0.440, 0.201, 0.210), 0.389),
        _row("mf-small", "MemoryFormer-small", 12, 768, (0.642, 0.523, 0.394, 0.461, 0.247, 0.272), 0.423),
        _row("pythia-410m", "Pythia-410M", 24, 1024, (0.675, 0.534, 0.471, 0.517, 0.202, 0.209), 0.435),
        _row("mf-base", "MemoryFormer-base", 24, 1024, (0.698, 0.546, 0.385, 0.585, 0.259, 0.272), 0.458),
    )
}


def paper_row(model_name: str) -> PaperRow | None:
    """The paper's row for ``model_name``, if it names one of Table 1's models.

    A hub organisation, a revision (``@step93000``) and Pythia's ``-deduped`` suffix are ignored, so the
    baseline ``EleutherAI/pythia-70m-deduped`` at step93000 gets the Pythia-70M row.
    """
    key = re.sub(r"-deduped$", "", model_name.split("@")[0].split("/")[-1].lower())
    return PAPER_TABLE1.get(key)
