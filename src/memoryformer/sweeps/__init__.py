"""Multi-run experiments: ablation sweeps (spec §6, Tables 3–6), seed statistics over them, comparisons of any
runs and the small-scale reproduction study (issue 13).

- :mod:`~memoryformer.sweeps.resolvers` — the ``${sweep_width:...}``/``${sweep_heads:...}`` resolvers of Table 3.
- :mod:`~memoryformer.sweeps.job` — the Hydra task: in a multirun a failed run is recorded and the sweep goes on.
- :mod:`~memoryformer.sweeps.runs` — reading run directories; grouping the seeds of one configuration.
- :mod:`~memoryformer.sweeps.compare` — statistics rows, learning curves and the report of any set of runs.
- :mod:`~memoryformer.sweeps.table` — a sweep's table beside the paper's (``make sweep``).
- :mod:`~memoryformer.sweeps.study` — the fixed, resumable reproduction study (``make study``).

Only the first two are imported here: they are what ``scripts/pretrain.py`` needs at start-up; the rest pull in
plotting and scipy, and are imported from their modules.
"""

from memoryformer.sweeps.job import (
    FAILED_FILE,
    configuration_name,
    name_seeded_run,
    pretrain_job,
    seed_run_name,
    swept_values,
    without_sweeps,
)
from memoryformer.sweeps.resolvers import fitted_heads, fitted_width, register_sweep_resolvers

__all__ = [
    "FAILED_FILE",
    "configuration_name",
    "fitted_heads",
    "fitted_width",
    "name_seeded_run",
    "pretrain_job",
    "register_sweep_resolvers",
    "seed_run_name",
    "swept_values",
    "without_sweeps",
]
