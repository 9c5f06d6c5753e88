"""From a ``conf/data/*.yaml`` node to (train, validation) samples, preparing text corpora on first use.

Two kinds of data config:

- **text corpus** (``train_files``): tokenized on first use into ``prepared_dir/<name>-<key>/{train,valid}.bin/.idx``
  where ``key`` hashes the file list (paths, sizes, mtimes), the split settings and the tokenizer, so any change
  re-prepares and an unchanged corpus is reused. Validation is ``valid_files`` when given, else the documents
  that :func:`~memoryformer.data.prepare.in_validation_split` holds out with ``valid_fraction``.
- **pre-tokenized** (``train_prefix``, e.g. Pythia's deduped Pile): read in place. Validation is ``valid_prefix``
  when given, else the last ``valid_fraction`` of documents (GPT-NeoX also splits by contiguous document ranges).
  With ``order: pythia`` the pair holds Pythia's training samples in training order and sample i is sequence i
  (:func:`~memoryformer.data.pythia_pile.pythia_order_datasets`).

Concurrency: every process may call :func:`build_datasets` at once (e.g. each data-parallel rank). Preparation
runs under an exclusive file lock (``fcntl.flock`` on ``prepared_dir/<name>-<key>.lock``): the first process
prepares, the others block on the lock and then read the finished result. The corpus is written into a temporary
directory that is renamed into place when complete, so a killed run never leaves a dataset that looks valid.
``flock`` is reliable on local disks; on network file systems, prepare once (``make data``) before a multi-node run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from memoryformer.data.indexed_dataset import IndexedDataset
from memoryformer.data.prepare import expand_sources, prepare_corpus
from memoryformer.data.samples import PackedSamples
from memoryformer.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from memoryformer.locks import exclusive

if TYPE_CHECKING:
    from memoryformer.data.pythia_pile import PythiaOrderSamples

logger = logging.getLogger(__name__)
PREPARED_FORMAT = 1  # bump when prepare_corpus's output for the same input changes
META_FILE = "meta.json"


def _as_dict(data_cfg: Mapping | DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(data_cfg, resolve=True) if isinstance(data_cfg, DictConfig) else dict(data_cfg)


def _file_list(patterns: list[str] | None) -> list[Path]:
    return expand_sources(patterns) if patterns else []


def corpus_key(cfg: Mapping[str, Any], tokenizer_hash: str) -> str:
    """Hash of everything that decides a prepared corpus: its files (path, size, mtime), split and tokenizer."""

    def describe(files: list[Path]) -> list[tuple[str, int, int]]:
        return [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]

    identity = {
        "format": PREPARED_FORMAT,
        "train_files": describe(_file_list(cfg["train_files"])),
        "valid_files": describe(_file_list(cfg.get("valid_files"))),
        "valid_fraction": float(cfg.get("valid_fraction") or 0.0),
        "txt_document_start": cfg.get("txt_document_start"),
        "text_key": cfg.get("text_key", "text"),
        "tokenizer": tokenizer_hash,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def prepare_configured_corpus(data_cfg: Mapping | DictConfig, show_progress: bool = True) -> Path:
    """The directory holding ``train`` and ``valid`` indexed datasets of a text-corpus config, prepared if missing."""
    cfg = _as_dict(data_cfg)
    if not cfg.get("train_files"):
        raise ValueError(f"data config {cfg.get('name')!r} has no train_files to prepare")
    valid_fraction = float(cfg.get("valid_fraction") or 0.0)
    if not cfg.get("valid_files") and valid_fraction <= 0:
        raise ValueError(
            f"data config {cfg.get('name')!r} has no validation data: set valid_files, or valid_fraction > 0 to hold "
            f"out a fraction of the training documents"
        )
    tokenizer = load_tokenizer(cfg["tokenizer"])
    key = corpus_key(cfg, tokenizer_fingerprint(tokenizer))
    prepared_dir = Path(cfg["prepared_dir"]).expanduser()
    final = prepared_dir / f"{cfg['name']}-{key}"
    if (final / META_FILE).is_file():
        return final
    with exclusive(prepared_dir / f"{cfg['name']}-{key}.lock"):
        if (final / META_FILE).is_file():  # another process prepared it while this one waited
            return final
        logger.info("preparing data config %r into %s (first use)", cfg["name"], final)
        for stale in prepared_dir.glob(f".{final.name}.tmp-*"):  # left by a killed run; the lock says none is live
            shutil.rmtree(stale, ignore_errors=True)
        tmp = prepared_dir / f".{final.name}.tmp-{os.getpid()}"
        try:
            common = dict(
                tokenizer=tokenizer,
                txt_document_start=cfg.get("txt_document_start"),
                text_key=cfg.get("text_key", "text"),
                num_workers=cfg.get("num_workers"),
                progress=show_progress,
            )
            held_out = not cfg.get("valid_files")
            train_stats = prepare_corpus(
                cfg["train_files"],
                tmp / "train",
                valid_prefix=tmp / "valid" if held_out else None,
                valid_fraction=valid_fraction if held_out else 0.0,
                **common,
            )
            valid_stats = None if held_out else prepare_corpus(cfg["valid_files"], tmp / "valid", **common)
            meta = {
                "name": cfg["name"],
                "key": key,
                "tokenizer": str(cfg["tokenizer"]),
                "train_files": [str(f) for f in _file_list(cfg["train_files"])],
                "valid_files": [str(f) for f in _file_list(cfg.get("valid_files"))],
                "valid_fraction": valid_fraction if held_out else 0.0,
                "train_stats": vars(train_stats),
                "valid_stats": vars(valid_stats) if valid_stats else None,
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
            shutil.rmtree(final, ignore_errors=True)  # a leftover without meta.json is incomplete by definition
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _checked_vocab_size(cfg: Mapping[str, Any]) -> int | None:
    """The vocabulary every token id must lie in (data/README.md, "Checked data"); ``None`` skips the check:
    ``data.check_token_ids=false``, or a config without a tokenizer."""
    if not cfg.get("tokenizer") or not cfg.get("check_token_ids", True):
        return None
    return len(load_tokenizer(cfg["tokenizer"]))


def _open_prefix(prefix: str | None, name: str, key: str, vocab_size: int | None) -> IndexedDataset:
    try:
        return IndexedDataset(prefix, vocab_size)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"data config {name!r}: {err}. Download Pythia's pre-tokenized deduplicated Pile "
            f"(EleutherAI/pythia_deduped_pile_idxmaps) with `make download WHAT=pile` (see data/README.md) and "
            f"set the config value data.{key} to its path prefix (without .bin/.idx)"
        ) from err


VALIDATION_SEED = 0


def validation_samples(
    dataset: IndexedDataset, seq_len: int, shuffle: bool, documents: range | None = None
) -> PackedSamples:
    """Validation windows in an order that does not depend on the run's seed: runs that differ only in their seed
    (issue 13's seeds axis) are scored on the same windows, so the spread of their losses is the training's."""
    return PackedSamples(dataset, seq_len, VALIDATION_SEED, documents=documents, shuffle=shuffle)


def build_datasets(
    data_cfg: Mapping | DictConfig, seq_len: int, seed: int, show_progress: bool = True
) -> tuple[PackedSamples | PythiaOrderSamples, PackedSamples | PythiaOrderSamples]:
    """(train, validation) samples of a ``conf/data/*.yaml`` node; safe to call from every rank at once."""
    cfg = _as_dict(data_cfg)
    order = cfg.get("order", "packed")
    if order == "pythia":
        from memoryformer.data.pythia_pile import pythia_order_datasets  # lazily: see memoryformer.data.__getattr__

        return pythia_order_datasets(cfg, seq_len, seed)
    if order != "packed":
        raise ValueError(f"data config {cfg.get('name')!r}: order must be packed or pythia, got {order!r}")
    shuffle = bool(cfg.get("shuffle", True))
    vocab_size = _checked_vocab_size(cfg)
    if cfg.get("train_files"):
        directory = prepare_configured_corpus(cfg, show_progress)
        train, valid = IndexedDataset(directory / "train", vocab_size), IndexedDataset(directory / "valid", vocab_size)
        return PackedSamples(train, seq_len, seed, shuffle=shuffle), validation_samples(valid, seq_len, shuffle)
    if not cfg.get("train_prefix"):
        raise ValueError(f"data config {cfg.get('name')!r} needs train_files (text) or train_prefix (pre-tokenized)")
    train = _open_prefix(cfg["train_prefix"], cfg.get("name"), "train_prefix", vocab_size)
    if cfg.get("valid_prefix"):
        valid = _open_prefix(cfg["valid_prefix"], cfg.get("name"), "valid_prefix", vocab_size)
        return PackedSamples(train, seq_len, seed, shuffle=shuffle), validation_samples(valid, seq_len, shuffle)
    valid_fraction = float(cfg.get("valid_fraction") or 0.0)
    if not 0 < valid_fraction < 1:
        raise ValueError(
            f"data config {cfg.get('name')!r}: set valid_prefix, or valid_fraction in (0, 1) to hold out the last "
            f"documents of train_prefix"
        )
    num_valid = max(1, round(train.num_documents * valid_fraction))
    split = train.num_documents - num_valid
    return (
        PackedSamples(train, seq_len, seed, documents=range(split), shuffle=shuffle),
        validation_samples(train, seq_len, shuffle, documents=range(split, train.num_documents)),
    )
