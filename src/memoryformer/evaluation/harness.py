"""Zero-shot evaluation of a checkpoint with lm-eval-harness (spec §6): the model adapter and ``make eval``.

The scores are lm-eval's own: the model is wrapped in its ``HFLM`` class and run through ``simple_evaluate`` on
the tasks of :mod:`memoryformer.evaluation.tasks` (local files, or lm-eval's built-ins reading the hub). A
checkpoint is a directory in Hugging Face format (our MemoryFormer or Pythia-architecture runs, any GPT-NeoX
model), a hub id with a revision (online only), or a model object in memory (the trainer's ``eval_at_end``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memoryformer.evaluation.tables import RESULTS_FILE, summary_metrics, write_tables
from memoryformer.evaluation.tasks import PAPER_TASKS, load_tasks, resolve_tasks
from memoryformer.paths import PROJECT_ROOT
from memoryformer.reporting import write_text_atomic
from memoryformer.sources import resolve

if TYPE_CHECKING:
    from lm_eval.models.huggingface import HFLM
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

RUNS_DIR = PROJECT_ROOT / "runs"
RESULTS_DIR = RUNS_DIR / "eval"  # results of models that are not a run of ours (hub ids, other directories)
LATEST_FILE = "LATEST"  # <runs_dir>/LATEST: the absolute path of the newest run's saved model, one line
RUN_CONFIG = "config.yaml"  # written by the trainer beside a run's model/: its model.name names the model
# lm-eval probes "auto" batch sizes by running its longest request at up to max_batch_size (64) and halving on
# out-of-memory errors. A CPU never raises one (it swaps, or the process is killed), and 64 sequences × 50k-way
# logits are gigabytes, so on CPU "auto" means this fixed size instead.
CPU_BATCH_SIZE = 8
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class CheckpointNotFoundError(FileNotFoundError):
    """No model where the user pointed (or no run yet); the message says what to pass instead."""


def latest_checkpoint(runs_dir: str | os.PathLike) -> Path:
    """The model directory of the newest ``make pretrain`` run, as recorded in ``<runs_dir>/LATEST``."""
    latest = Path(runs_dir) / LATEST_FILE
    if not latest.is_file():
        raise CheckpointNotFoundError(
            f"no trained model yet: {latest} does not exist; run `make pretrain` first or pass "
            f"CKPT=<model directory or hub id>"
        )
    path = Path(latest.read_text(encoding="utf-8").strip())
    if not path.is_dir():
        raise CheckpointNotFoundError(
            f"{latest} names {path}, which does not exist; run `make pretrain` again or pass CKPT="
        )
    return path


def resolve_checkpoint(checkpoint: str | os.PathLike) -> str:
    """A local model directory (as an absolute path) or a hub id, or a clear error saying what is wrong."""
    path = Path(checkpoint).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise CheckpointNotFoundError(
                f"{path} is not a Hugging Face model directory (no config.json); pass the `model/` directory a "
                f"run saved (runs/<run>/model) or any directory written by save_pretrained"
            )
        return str(path.resolve())
    if not _HUB_ID.match(str(checkpoint)):
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist; pass an existing model directory or a hub id")
    from huggingface_hub import is_offline_mode

    if is_offline_mode():
        raise CheckpointNotFoundError(
            f"checkpoint {checkpoint!r} is not a local directory, and as a Hugging Face hub id it cannot be "
            f"fetched because HF_HUB_OFFLINE is set; unset it (online) or pass a local model directory"
        )
    return str(checkpoint)


def run_of(checkpoint: str | os.PathLike) -> Path | None:
    """The run directory of a run's saved model (``runs/<run>/model``, as the trainer writes it), else None."""
    path = Path(checkpoint).expanduser()
    return path.resolve().parent if path.is_dir() and path.resolve().name == "model" else None


def default_model_name(checkpoint: str | os.PathLike | PreTrainedModel, revision: str | None = None) -> str:
    """The row name of a checkpoint: a run's ``model.name`` (as the trainer's end-of-run eval names it), the
    directory's name, the hub model's name (with ``@revision``), or the config's model type."""
    from omegaconf import OmegaConf

    if not isinstance(checkpoint, (str, os.PathLike)):
        name_or_path = str(getattr(checkpoint, "name_or_path", "") or "")
        return Path(name_or_path).name or checkpoint.config.model_type
    run = run_of(checkpoint)
    if run is not None:
        has_config = (run / RUN_CONFIG).is_file()
        return str((has_config and OmegaConf.select(OmegaConf.load(run / RUN_CONFIG), "model.name")) or run.name)
    path = Path(checkpoint)
    if path.exists():
        return path.resolve().name
    return path.name + (f"@{revision}" if revision else "")


def default_output_dir(checkpoint: str | os.PathLike | PreTrainedModel, model_name: str) -> Path:
    """A run's own ``eval/`` (where its end-of-run eval is), else ``runs/eval/<model_name>``: never tracked files."""
    run = run_of(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else None
    return run / "eval" if run is not None else RESULTS_DIR / model_name


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_lm(
    model: str | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None = None,
    batch_size: int | str = "auto",
    device: str | None = None,
    revision: str | None = None,
) -> HFLM:
    """lm-eval's ``HFLM`` around a model directory, a hub id or a model object (the adapter).

    A model object is evaluated where it is (device is ignored). A local directory without tokenizer files, or a
    model object without a tokenizer, gets the GPT-NeoX-20B tokenizer (the catalogue's ``tokenizer`` input); a
    hub model gets its own. ``batch_size="auto"`` becomes :data:`CPU_BATCH_SIZE` on CPU.
    """
    from lm_eval.models.huggingface import HFLM

    import memoryformer.models  # noqa: F401  (registers MemoryFormer with AutoConfig / AutoModelForCausalLM)
    from memoryformer.data.tokenizer import load_tokenizer

    is_object = not isinstance(model, str)
    local_dir = None if is_object or not Path(model).is_dir() else Path(model)
    if tokenizer is None and (is_object or local_dir is not None):
        has_own = local_dir is not None and any((local_dir / name).is_file() for name in _TOKENIZER_FILES)
        tokenizer = load_tokenizer(local_dir if has_own else resolve("tokenizer").path)
    device = str(model.device) if is_object else (device or _default_device())
    if batch_size == "auto" and device.startswith("cpu"):
        batch_size = CPU_BATCH_SIZE
    kwargs: dict[str, Any] = {"pretrained": model, "tokenizer": tokenizer, "batch_size": batch_size}
    if not is_object:
        kwargs |= {"device": device, "revision": revision or "main"}
    return HFLM(**kwargs)


def model_info(lm: HFLM, name: str, checkpoint: str | None, revision: str | None, limit: int | None) -> dict:
    """What the tables need about the evaluated model: its shape and FLOPs per block at s = 2048 (spec §5).

    (lm-eval's own ``config`` section of the results already records the parameter count and dtype.)
    """
    from memoryformer.flops import PAPER_SEQ_LEN, block_flops

    config = lm.model.config
    flops = block_flops(config, PAPER_SEQ_LEN)
    return {
        "name": name,
        "checkpoint": checkpoint,
        "revision": revision,
        "model_type": config.model_type,
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "flops_seq_len": PAPER_SEQ_LEN,
        "flops_without_attention": flops.without_attention,
        "flops_total": flops.total,
        "limit": limit,
    }


def evaluate_checkpoint(
    checkpoint: str | os.PathLike | PreTrainedModel,
    tasks: Sequence[str] = PAPER_TASKS,
    limit: int | None = None,
    output_dir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    batch_size: int | str = "auto",
    device: str | None = None,
    revision: str | None = None,
    model_name: str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> dict[str, Any] | None:
    """Evaluate ``checkpoint`` zero-shot on ``tasks``; write results JSON, markdown and CSV; return the results.

    ``checkpoint`` is a model directory, a hub id (with ``revision``, online only) or a model object (evaluated
    in place; its train/eval mode is restored afterwards). ``limit`` evaluates only the first documents of each
    task (smoke tests; the numbers are then not comparable). ``output_dir`` defaults to
    :func:`default_output_dir`; ``data_dir`` is looked in first for the tasks' files, then the catalogue's local
    copies, then the hub (:func:`~memoryformer.evaluation.tasks.resolve_tasks`). The results are lm-eval's dict
    plus ``model_info`` (see :func:`model_info`), ``data_sources`` (where each task's data came from) and
    ``summary`` (flat ``<task>/acc`` numbers for trackers). Under a multi-process launcher only rank 0 writes and
    gets results.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    from memoryformer.train.checkpoint import check_finite_parameters

    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive number of documents per task or None, got {limit!r}")
    # Fail early: the tasks and their files are checked before any model is loaded.
    sources = resolve_tasks(list(tasks), data_dir)
    task_objects = load_tasks(list(tasks), sources=sources)
    is_object = not isinstance(checkpoint, (str, os.PathLike))
    source = None if is_object else resolve_checkpoint(checkpoint)
    model_name = model_name or default_model_name(checkpoint, revision)
    output_dir = Path(output_dir) if output_dir is not None else default_output_dir(checkpoint, model_name)

    was_training = is_object and checkpoint.training  # HFLM switches the model to eval mode
    try:
        lm = build_lm(checkpoint if is_object else source, tokenizer, batch_size, device, revision)
        check_finite_parameters(lm.model, f"model {model_name}")  # never score a diverged model (issue 12)
        results = simple_evaluate(
            model=lm,
            tasks=list(task_objects.values()),
            task_manager=TaskManager(include_defaults=False),
            num_fewshot=0,
            limit=limit,
            log_samples=False,
        )
    finally:
        if is_object:
            checkpoint.train(was_training)
    if results is None:  # not rank 0
        return None
    results["model_info"] = model_info(lm, model_name, source, revision, limit)
    results["data_sources"] = {task: resolved.record() for task, resolved in sources.items()}
    results["summary"] = summary_metrics(results)
    text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
    write_text_atomic(output_dir / RESULTS_FILE, text + "\n")
    write_tables([results], output_dir)
    return json.loads(text)  # what was written: JSON types only, identical to the file
