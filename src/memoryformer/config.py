"""Hydra/OmegaConf glue shared by every entry point: resolvers and composing ``conf/`` from Python.

``conf/`` at the project root is the one configuration tree; scripts use it through ``@hydra.main`` and
tests or notebooks through :func:`compose_config`.
"""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

from memoryformer.paths import PROJECT_ROOT, shared_data_dir

CONF_DIR = PROJECT_ROOT / "conf"


def _source_path(name: str) -> str:
    from memoryformer.sources import resolve

    return str(resolve(name).path)


def _sample_files(corpus: str = "auto") -> list[str]:
    from memoryformer.sources import sample_files

    return sample_files(corpus)


def register_resolvers() -> None:
    """``${shared_data:SUBPATH}`` → absolute path under the shared data directory ($MEMORYFORMER_DATA or
    ../shared/data); ``${project_root:SUBPATH}`` → absolute path under the repository; ``${source:NAME}`` → the
    path of a catalogued input (:func:`memoryformer.sources.resolve`: local copy, else the hub, else one clear
    error); ``${sample_files:CORPUS}`` → the text files of the pretraining sample
    (:func:`memoryformer.sources.sample_files`)."""
    if not OmegaConf.has_resolver("shared_data"):
        OmegaConf.register_new_resolver("shared_data", lambda sub="": str(shared_data_dir() / sub))
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda sub="": str(PROJECT_ROOT / sub))
    # Cached per composed config: a run resolves (and, online, fetches) each input once, and logs a choice once.
    if not OmegaConf.has_resolver("source"):
        OmegaConf.register_new_resolver("source", _source_path, use_cache=True)
    if not OmegaConf.has_resolver("sample_files"):
        OmegaConf.register_new_resolver("sample_files", _sample_files, use_cache=True)


# The data config values that may name catalogued inputs (through ${source:...} / ${sample_files:...}).
_DATA_INPUT_KEYS = ("tokenizer", "train_files", "valid_files", "train_prefix", "valid_prefix")


def _root_cause(error: BaseException) -> BaseException:
    """The innermost exception of a chain (OmegaConf re-raises a resolver's error inside its own)."""
    while (inner := error.__cause__ or error.__context__) is not None:
        error = inner
    return error


def check_run_inputs(cfg: DictConfig) -> None:
    """Before any training: every input the run reads resolves — the data config's tokenizer and corpus and,
    with ``train.eval_at_end``, the eval tasks — or one :class:`~memoryformer.sources.MissingInputError` naming
    all the missing ones and every way out (issue 11). Inputs that resolve to the hub are fetched here."""
    from omegaconf.errors import InterpolationResolutionError

    from memoryformer.evaluation.tasks import check_eval_inputs
    from memoryformer.sources import MissingInputError

    missing = []
    for key in _DATA_INPUT_KEYS:
        try:
            OmegaConf.select(cfg.data, key)
        except InterpolationResolutionError as error:
            cause = _root_cause(error)
            if not isinstance(cause, MissingInputError):
                raise
            missing += cause.missing
    if OmegaConf.select(cfg, "train.eval_at_end"):
        try:
            check_eval_inputs(cfg.eval)
        except MissingInputError as error:
            missing += error.missing
    if missing:
        raise MissingInputError.for_inputs(missing)


def compose_config(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """The composed config of ``conf/<config_name>.yaml`` with Hydra command-line style overrides."""
    from hydra import compose, initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))
