"""Corpus preparation: text files → tokenized indexed datasets in GPT-NeoX's on-disk format (spec §4, "Data").

Each document becomes one sequence: its tokens (no special tokens added) followed by the EOD token, exactly what
GPT-NeoX's ``tools/preprocess_data.py --append-eod`` writes. Inputs:

- ``.jsonl`` and ``.jsonl.zst`` (the Pile's own shards): one ``{"text": ..., "meta": ...}`` object per line;
- ``.txt``: the whole file is one document, or, with ``txt_document_start`` (a regex), a new document starts at
  every line that matches it (e.g. WikiText's ``" = Title = "`` article headings).

Documents stream through a bounded pipeline (read → tokenize in worker processes → write), so a corpus larger
than RAM prepares in constant memory. A document goes to the validation split when a hash of its text falls
below ``valid_fraction``: deterministic, independent of file order, and duplicates land on the same side.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import multiprocessing
import os
import re
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard
from tokenizers import Tokenizer
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from memoryformer.data.indexed_dataset import IndexedDatasetWriter, token_dtype
from memoryformer.data.tokenizer import load_tokenizer

TEXT_SUFFIXES = (".jsonl", ".jsonl.zst", ".txt")
DEFAULT_BATCH_CHARS = 1 << 20  # ~250k tokens per task: IPC is negligible, and both workers get work early


@dataclass
class PrepareStats:
    """What a preparation wrote and how fast (tokens include the EOD tokens)."""

    train_documents: int = 0
    train_tokens: int = 0
    valid_documents: int = 0
    valid_tokens: int = 0
    empty_documents: int = 0  # skipped: no tokens
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return (self.train_tokens + self.valid_tokens) / self.seconds if self.seconds > 0 else 0.0


def expand_sources(patterns: Sequence[str | os.PathLike]) -> list[Path]:
    """Files named by paths or glob patterns, each pattern's matches sorted; a pattern matching nothing fails."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(str(pattern))))
        if not matches:
            raise FileNotFoundError(f"no file matches {pattern!r}; check the corpus paths in the data config")
        for match in map(Path, matches):
            if not match.name.endswith(TEXT_SUFFIXES):
                raise ValueError(f"{match}: unsupported corpus file type; expected one of {TEXT_SUFFIXES}")
            files.append(match)
    return files


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".zst"):
        # The Pile's shards use long-distance matching windows; allow them (zstd's default caps the window).
        reader = zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(open(path, "rb"), closefd=True)  # noqa: SIM115
        return io.TextIOWrapper(reader, encoding="utf-8")
    return open(path, encoding="utf-8")


def read_documents(
    path: str | os.PathLike, txt_document_start: str | None = None, text_key: str = "text"
) -> Iterator[str]:
    """The documents of one corpus file, streamed."""
    path = Path(path)
    with _open_text(path) as lines:
        if path.name.endswith(".txt"):
            yield from _split_txt(lines, txt_document_start)
            return
        for line_number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)[text_key]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(
                    f"{path}:{line_number}: expected a JSON object with a {text_key!r} field ({err})"
                ) from err


def _split_txt(lines: Iterator[str], document_start: str | None) -> Iterator[str]:
    start = re.compile(document_start) if document_start else None
    document: list[str] = []
    for line in lines:
        if start is not None and document and start.match(line.rstrip("\n")):
            yield "".join(document)
            document = []
        document.append(line)
    if document:
        yield "".join(document)


def in_validation_split(text: str, valid_fraction: float) -> bool:
    """Whether a document is held out: the first 8 bytes of its BLAKE2b hash, as a fraction, fall below it."""
    if valid_fraction <= 0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < valid_fraction


# Worker state: one tokenizer per process, built once from its serialized form.
_worker_tokenizer: Tokenizer | None = None


def _init_worker(serialized_tokenizer: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism; no nested thread pools
    _worker_tokenizer = Tokenizer.from_str(serialized_tokenizer)


def _encode(texts: list[str], eod: int, dtype: str, tokenizer: Tokenizer | None = None) -> list[np.ndarray]:
    """Each text's token ids (no special tokens added) followed by the EOD token."""
    tokenizer = _worker_tokenizer if tokenizer is None else tokenizer
    encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    return [np.array([*encoding.ids, eod], dtype=dtype) for encoding in encodings]


def _batches(
    files: Sequence[Path], txt_document_start: str | None, text_key: str, batch_chars: int
) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for path in files:
        for text in read_documents(path, txt_document_start, text_key):
            batch.append(text)
            size += len(text)
            if size >= batch_chars:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def tokenize_documents(
    files: Sequence[Path],
    tokenizer: PreTrainedTokenizerFast,
    *,
    txt_document_start: str | None = None,
    text_key: str = "text",
    num_workers: int = 0,
    batch_chars: int = DEFAULT_BATCH_CHARS,
) -> Iterator[tuple[str, np.ndarray]]:
    """(text, tokens + EOD) of every document of ``files``, in order, tokenized by ``num_workers`` processes
    (0: in this process) with a bounded read-ahead, so memory stays constant however long the corpus."""
    dtype, eod = token_dtype(len(tokenizer)).str, tokenizer.eos_token_id
    batches = _batches(files, txt_document_start, text_key, batch_chars)
    if num_workers == 0:
        for texts in batches:
            yield from zip(texts, _encode(texts, eod, dtype, tokenizer.backend_tokenizer), strict=True)
        return
    # fork: workers start in milliseconds and re-import nothing; they only run the Rust tokenizer.
    context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
    serialized = tokenizer.backend_tokenizer.to_str()
    pool = ProcessPoolExecutor(num_workers, context, initializer=_init_worker, initargs=(serialized,))
    in_flight: deque[tuple[list[str], Future]] = deque()

    def oldest() -> Iterator[tuple[str, np.ndarray]]:
        texts, future = in_flight.popleft()
        return zip(texts, future.result(), strict=True)

    try:
        for texts in batches:
            in_flight.append((texts, pool.submit(_encode, texts, eod, dtype)))
            if len(in_flight) > 2 * num_workers:
                yield from oldest()
        while in_flight:
            yield from oldest()
    finally:
        pool.shutdown(cancel_futures=True)


def prepare_corpus(
    sources: Sequence[str | os.PathLike],
    out_prefix: str | os.PathLike,
    tokenizer: PreTrainedTokenizerFast | str | os.PathLike,
    *,
    valid_prefix: str | os.PathLike | None = None,
    valid_fraction: float = 0.0,
    txt_document_start: str | None = None,
    text_key: str = "text",
    num_workers: int | None = None,
    batch_chars: int = DEFAULT_BATCH_CHARS,
    progress: bool = True,
) -> PrepareStats:
    """Tokenize ``sources`` (paths or globs) into ``out_prefix.bin/.idx`` and, with ``valid_fraction`` > 0, the
    held-out documents into ``valid_prefix.bin/.idx``.

    ``num_workers`` tokenizer processes (default: one per core; 0 tokenizes in this process). Each output pair
    appears atomically when complete; an interrupted run leaves no dataset behind.
    """
    if not 0 <= valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    if valid_fraction > 0 and valid_prefix is None:
        raise ValueError("valid_fraction > 0 holds documents out, so valid_prefix must say where to write them")
    files = expand_sources(sources)
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        tokenizer = load_tokenizer(tokenizer)
    num_workers = (os.cpu_count() or 1) if num_workers is None else num_workers
    dtype = token_dtype(len(tokenizer))
    stats = PrepareStats()
    started = time.perf_counter()
    train = IndexedDatasetWriter(out_prefix, dtype)
    valid = IndexedDatasetWriter(valid_prefix, dtype) if valid_fraction > 0 else None
    documents = tokenize_documents(
        files,
        tokenizer,
        txt_document_start=txt_document_start,
        text_key=text_key,
        num_workers=num_workers,
        batch_chars=batch_chars,
    )
    try:
        with tqdm(desc=f"preparing {Path(out_prefix).name}", unit="tok", unit_scale=True, disable=not progress) as bar:
            for text, tokens in documents:
                if tokens.size == 1:  # only the EOD: an empty document
                    stats.empty_documents += 1
                elif valid is not None and in_validation_split(text, valid_fraction):
                    valid.add_document(tokens)
                else:
                    train.add_document(tokens)
                bar.update(tokens.size)
        stats.train_documents, stats.train_tokens = train.num_documents, train.num_tokens
        if valid is not None:
            stats.valid_documents, stats.valid_tokens = valid.num_documents, valid.num_tokens
            valid.close()
        train.close()
    except BaseException:
        documents.close()  # stop the tokenizer processes
        for writer in (train, valid):
            if writer is not None and not writer.closed:
                writer.abort()
        raise
    stats.seconds = time.perf_counter() - started
    return stats
