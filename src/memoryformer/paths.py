"""Where the project's inputs live: the shared data directory and the project root.

Real data is read in place, never copied into the repository: ``$MEMORYFORMER_DATA`` if set, else
``../shared/data`` beside the repository checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DATA_ENV_VAR = "MEMORYFORMER_DATA"


def shared_data_dir() -> Path:
    """The shared data directory (may not exist; callers that need it use :func:`require_shared_data`)."""
    env = os.environ.get(DATA_ENV_VAR)
    return Path(env).expanduser().resolve() if env else (PROJECT_ROOT.parent / "shared" / "data").resolve()


def require_shared_data(relative: str = "") -> Path:
    """A path under the shared data directory, or a clear error saying how to point at it."""
    path = shared_data_dir() / relative
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist. The shared data directory is {shared_data_dir()}; "
            f"set {DATA_ENV_VAR}=/path/to/shared/data (see ../shared/data/SOURCES.md) or override the "
            f"config value that names this path"
        )
    return path
