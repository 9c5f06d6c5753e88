"""Stop requests: SIGTERM, SIGINT and SIGUSR1 finish the current step, save, and exit with status 75 (issue 12
item 4).

Job schedulers send SIGTERM before killing a job (Kubernetes, SLURM at the time limit), and SLURM sends SIGUSR1
ahead of it with ``--signal=USR1@120`` (``--signal=B:USR1@120`` signals only the batch shell). The handler only
records the request; the trainer polls it once per step, agreed over all ranks, so every rank stops after the
same step and the checkpoint is complete. A second signal ends the process at once (its default action).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): "try again later"; resubmitting resumes the run


class Preempted(SystemExit):
    """Raised by the trainer after saving on a stop request; uncaught, the process exits with status 75.

    A ``SystemExit`` so that no ``except Exception`` (e.g. a sweep's per-run failure handler) swallows it.
    """

    def __init__(self, signal_name: str, step: int, checkpoint: Path) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint

    def __str__(self) -> str:
        return (
            f"stopped by {self.signal_name} after step {self.step}, saved to {self.checkpoint}; run the same "
            f"command again to resume (exit status {PREEMPTED_EXIT_CODE})"
        )


class StopRequests:
    """Context manager installing the stop handlers (main thread only) and restoring the previous ones."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:  # the second one: the default action, now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        else:
            log.warning("not in the main thread: SIGTERM/SIGINT/SIGUSR1 will not save before stopping")
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
