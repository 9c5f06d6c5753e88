"""``metrics.jsonl`` and the tracker: what is logged at which step, as strict JSON (issue 12 item 1).

One JSON object per line, written by the main process only. Non-finite numbers are written as ``null`` (bare
``NaN`` is not JSON). A resumed run first drops the records after its checkpoint (those steps are redone) and a
torn last line (a write cut short by a kill).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from memoryformer.reporting import write_text_atomic

log = logging.getLogger(__name__)


def strict_json(record: dict[str, Any]) -> str:
    """``record`` as one line of strict JSON: NaN and ±inf become ``null``."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    return json.dumps(clean, allow_nan=False)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a torn (unparseable) last line is dropped with a warning."""
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                log.warning("dropping the torn last line %d of %s (%s)", number, path, err)
                break
            raise ValueError(f"{path} line {number} is not JSON ({err}); fix or delete the line") from err
    return records


class MetricsLogger:
    """Writes a step's record to ``metrics.jsonl`` and the Accelerate trackers at the configured cadence."""

    def __init__(self, accelerator: Accelerator, path: Path, every: int) -> None:
        self.accelerator, self.path, self.every = accelerator, path, every

    def resume(self, step: int) -> None:
        """Drop records after ``step`` (about to be redone) and a torn last line (main process)."""
        if not self.accelerator.is_main_process or not self.path.is_file():
            return
        records = read_metrics(self.path)
        write_text_atomic(self.path, "".join(strict_json(r) + "\n" for r in records if r["step"] <= step))

    def should_log(self, record: dict[str, Any]) -> bool:
        """Every ``every`` steps, and always with a validation result or a skipped update."""
        return record["step"] % self.every == 0 or "val_loss" in record or record.get("skipped", False)

    def log(self, record: dict[str, Any]) -> None:
        scalars = {k: v for k, v in record.items() if k != "sample" and v is not None}
        self.accelerator.log({k: v for k, v in scalars.items() if not isinstance(v, float) or math.isfinite(v)},
                             step=record["step"])  # fmt: skip
        if self.accelerator.is_main_process:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(strict_json(record) + "\n")
