"""What the entry points in ``scripts/`` share: a mistake the user can fix ends in its message, not a traceback.

Every error listed in :data:`USER_ERRORS` already names the problem and the fix (a missing input and the ways to get
it, a bad config key with a valid example, a locked run directory and its holder, a corrupt checkpoint...); a stack
trace below it only hides that. Anything else is a bug and keeps its traceback. ``MEMORYFORMER_DEBUG=1`` (or
Hydra's ``HYDRA_FULL_ERROR=1``) shows the traceback of user errors too.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import TypeVar

from memoryformer.data.indexed_dataset import IndexedDatasetError
from memoryformer.data.pythia_pile import PileDownloadError
from memoryformer.evaluation.harness import CheckpointNotFoundError
from memoryformer.evaluation.tables import InvalidResultsError, ResultsNotFoundError
from memoryformer.locks import LockHeldError
from memoryformer.sources import HubOfflineError, MissingInputError, UnknownDownloadGroupError
from memoryformer.sweeps.study import StudyError
from memoryformer.train.checkpoint import CheckpointError, NonFiniteModelError
from memoryformer.train.run_dir import RunDirectoryError
from memoryformer.train.settings import ConfigError
from memoryformer.train.trainer import NonFiniteTrainingError

USER_ERRORS: tuple[type[BaseException], ...] = (
    MissingInputError,
    HubOfflineError,
    UnknownDownloadGroupError,
    ConfigError,
    LockHeldError,
    RunDirectoryError,
    CheckpointError,
    CheckpointNotFoundError,
    ResultsNotFoundError,
    InvalidResultsError,
    NonFiniteModelError,
    NonFiniteTrainingError,
    IndexedDatasetError,
    PileDownloadError,
    StudyError,
)
ERROR_EXIT_CODE = 1

F = TypeVar("F", bound=Callable)


def reports_user_errors(main: F) -> F:
    """Decorate a script's ``main`` (inside ``@hydra.main``): a user error prints ``error: <message>`` and exits 1."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except USER_ERRORS as error:
            if os.environ.get("MEMORYFORMER_DEBUG") or os.environ.get("HYDRA_FULL_ERROR"):
                raise
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(ERROR_EXIT_CODE) from None

    return wrapper  # type: ignore[return-value]
