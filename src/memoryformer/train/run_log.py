"""The trainer's console and log file (issue 11 item 7): the console shows what a user needs, the run's
``train.log`` keeps everything.

Console: this package's messages (INFO and up) and other libraries' warnings and errors, except the known-harmless
ones in :data:`HARMLESS` (Accelerate's per-checkpoint INFO lines never reach it). Log file: every record at INFO
and up, from every library, Python warnings included. Console lines go through ``tqdm.write`` so the progress bar
stays intact. DeepSpeed's logger prints to stdout on its own (``propagate=False``); its records are routed through
the same two handlers instead.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

LOG_FILE = "train.log"
OUR_LOGGERS = "memoryformer"
# (logger name prefix, message fragment) of warnings that say nothing actionable here: kept in train.log only.
HARMLESS = (
    ("DeepSpeed", "Setting accelerator to CPU"),  # a CPU-only machine is this project's normal case
    # lm-eval on a model object and on the project's local task configs, as eval_at_end runs it:
    ("lm_eval.models.huggingface", "model kwarg is not of type `str`"),
    ("lm_eval.models.huggingface", "HF model type is neither marked as CausalLM"),
    ("lm_eval.models.huggingface", "Passed an already-initialized model through `pretrained`"),
    ("lm_eval.api.task", "is defined, but aggregation is not"),
    ("lm_eval.api.task", "is defined, but higher_is_better is not"),
    ("lm_eval.evaluator", "Overwriting default num_fewshot"),  # zero-shot is the point
)
DEEPSPEED_LOGGER = "DeepSpeed"


def for_console(record: logging.LogRecord) -> bool:
    """Whether ``record`` belongs on the console (it goes to the log file either way)."""
    if record.name == OUR_LOGGERS or record.name.startswith(OUR_LOGGERS + "."):
        return record.levelno >= logging.INFO
    if record.levelno < logging.WARNING:
        return False
    message = record.getMessage()
    return not any(record.name.startswith(name) and fragment in message for name, fragment in HARMLESS)


class ConsoleHandler(logging.Handler):
    """Writes through ``tqdm.write`` (to stderr), so log lines do not break a progress bar."""

    def __init__(self) -> None:
        super().__init__()
        self.addFilter(for_console)
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


class _RouteTo(logging.Filter):
    """A logger filter handing every record to ``handlers`` and stopping the logger's own handlers."""

    def __init__(self, handlers: list[logging.Handler]) -> None:
        super().__init__()
        self.handlers = handlers

    def filter(self, record: logging.LogRecord) -> bool:
        for handler in self.handlers:
            if record.levelno >= handler.level:
                handler.handle(record)
        return False


@contextlib.contextmanager
def run_logging(log_file: Path | None) -> Iterator[None]:
    """Console (and, given ``log_file``, file) logging for one run; the previous setup is restored after.

    Non-main ranks pass ``None``: they show only their warnings and errors, like today.
    """
    root = logging.getLogger()
    handlers: list[logging.Handler] = [ConsoleHandler()]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setLevel(logging.INFO)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(file_handler)
    # Hydra's default job logging would print everything a second time (and keep its own file): set aside.
    previous_handlers, previous_level = root.handlers[:], root.level
    kept = [h for h in previous_handlers if not isinstance(h, logging.StreamHandler) or _is_pytest(h)]
    root.handlers = kept + handlers
    root.setLevel(logging.INFO)
    deepspeed = logging.getLogger(DEEPSPEED_LOGGER)  # created before DeepSpeed's import, which then reuses it
    route = _RouteTo(handlers)
    deepspeed.addFilter(route)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        deepspeed.removeFilter(route)
        root.handlers, root.level = previous_handlers, previous_level
        for handler in handlers:
            handler.close()


def _is_pytest(handler: logging.Handler) -> bool:
    """pytest's capturing handlers (kept, so tests can assert on log records)."""
    return type(handler).__module__.startswith("_pytest")
