"""One lock helper for the project: an exclusive ``fcntl`` lock on a file that names its holder (style.md §3.5).

The lock is ``flock`` on an open file, so the kernel releases it when the holder exits, however it exits (no stale
locks after SIGKILL). While held, the file records who holds it (PID, host, start time, command), so a refused
caller can say whom it waits for. ``filelock`` is not used: it truncates the file on every attempt, erasing that
record before the refused caller can read it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path


class LockHeldError(RuntimeError):
    """A non-blocking :func:`exclusive` found the lock held by another process (or another open of the file)."""

    def __init__(self, path: Path, holder: str, hint: str) -> None:
        super().__init__(f"{path} is held by {holder}; {hint}")
        self.path, self.holder = path, holder


def describe_holder(record: str) -> str:
    """'pid 123 on host-a since 2026-11-30 10:00:00 UTC (python scripts/pretrain.py ...)' from a lock file's text."""
    try:
        holder = json.loads(record)
        return f"pid {holder['pid']} on {holder['host']} since {holder['since']} ({holder['command']})"
    except (ValueError, KeyError, TypeError):
        return "another process (it left no record)"


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, blocking: bool = True, hint: str = "wait for it to finish") -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block.

    ``blocking=False`` raises :class:`LockHeldError` at once, naming the holder and ending with ``hint``, instead
    of waiting. The lock file is left in place on release (removing it would race with a process about to lock it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            raise LockHeldError(path, describe_holder(os.pread(fd, 65536, 0).decode(errors="replace")), hint) from None
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "command": " ".join(sys.argv)[:500],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
