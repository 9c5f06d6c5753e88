"""Where the project's inputs live: the data directories and the project root (the one place that knows them).

Local copies of the inputs (``memoryformer.sources``) are looked up, in this order, under

1. the shared data directory: ``$MEMORYFORMER_DATA`` if set, else ``../shared/data`` beside the checkout;
2. the download cache: ``$MEMORYFORMER_CACHE`` if set, else ``data/cache/`` in the repository (git-ignored),
   which ``make download`` fills in the same layout as the shared directory.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DATA_ENV_VAR = "MEMORYFORMER_DATA"
CACHE_ENV_VAR = "MEMORYFORMER_CACHE"


def _from_env(variable: str, default: Path) -> Path:
    value = os.environ.get(variable)
    return Path(value).expanduser().resolve() if value else default.resolve()


def shared_data_dir() -> Path:
    """The shared data directory (may not exist: inputs resolve through :mod:`memoryformer.sources`)."""
    return _from_env(DATA_ENV_VAR, PROJECT_ROOT.parent / "shared" / "data")


def cache_dir() -> Path:
    """Where ``make download`` and run-time hub fetches put inputs (may not exist yet)."""
    return _from_env(CACHE_ENV_VAR, PROJECT_ROOT / "data" / "cache")


def data_roots() -> list[Path]:
    """The directories holding local copies of the inputs, in the order they are searched."""
    return [shared_data_dir(), cache_dir()]
