"""Corpus preparation: text files → tokenized indexed datasets in GPT-NeoX's on-disk format (spec §4, "Data").

Each document becomes one sequence: its tokens (no special tokens added) followed by the EOD token, exactly what
GPT-NeoX's ``tools/preprocess_data.py --append-eod`` writes. Inputs:

- ``.jsonl`` and ``.jsonl.zst`` (the Pile's own shards): one ``{"text": ..., "meta": ...}`` object per line;
- ``.txt``: the whole file is one document, or, with ``txt_document_start`` (a regex), a new document starts at
  every line that matches it (e.g. WikiText's ``" = Title = "`` article headings).

Documents stream through a bounded pipeline (read → tokenize in worker processes → write), so a corpus larger
than RAM prepares in constant memory. A document goes to the validation split when a hash of its text falls
below ``valid_fraction``: deterministic, independent of file order, and duplicates land on the same side.

Checked input (issue 12, "Checked data"): a line that is not UTF-8, not a JSON object with a string ``text_key``,
or holds an unpaired surrogate escape fails with ``file:line`` and what to do. Tokenizer worker processes die
with the preparing process, even when it is SIGKILLed (``PR_SET_PDEATHSIG`` on Linux, and a parent-pid watchdog
everywhere), instead of living on as orphans.

Long documents: tokenizing a text holds ~100 bytes of encoding state per character (a 50 MB document took 6 GB),
so a document longer than ``piece_chars`` is tokenized in pieces of at most that many characters, each cut at
the start of a whitespace run, and the pieces' ids are concatenated. For byte-level BPE tokenizers such as
GPT-NeoX's (and GPT-2's) that is a pre-token boundary — the pre-tokenizer's regex never joins a non-space
character to the whitespace after it, NFC never composes across it, and its added tokens (runs of spaces) stay
whole — so the ids equal whole-document tokenization exactly. Where a stretch of ``piece_chars / 2`` characters
has no whitespace, the piece is cut mid-word and the ids next to that cut may differ. A tokenizer for which cutting
before a space changes the ids (e.g. one that adds a prefix space) tokenizes whole documents, unbounded.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import io
import itertools
import json
import logging
import multiprocessing
import os
import re
import signal
import sys
import threading
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

logger = logging.getLogger(__name__)
TEXT_SUFFIXES = (".jsonl", ".jsonl.zst", ".txt")
DEFAULT_BATCH_CHARS = 1 << 20  # ~250k tokens per task: IPC is negligible, and both workers get work early
DEFAULT_PIECE_CHARS = 1 << 18  # longer documents go in pieces (module docstring): ~35 MB of tokenizer state each
PARENT_CHECK_SECONDS = 1.0  # how often a tokenizer worker checks that its parent still lives


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


def _open_binary(path: Path) -> io.BufferedIOBase:
    if path.name.endswith(".zst"):
        # The Pile's shards use long-distance matching windows; allow them (zstd's default caps the window).
        reader = zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(open(path, "rb"), closefd=True)  # noqa: SIM115
        return io.BufferedReader(reader)
    return open(path, "rb")


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 file with universal newlines (as ``open(path, encoding="utf-8")`` reads
    it), decoded line by line so that a bad byte is reported with its line."""
    line_number = 0
    with _open_binary(path) as raw_lines:
        for raw in raw_lines:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path}:{line_number + 1}: not valid UTF-8 ({err.reason} at byte {err.start} of the line: "
                    f"{raw[max(0, err.start - 20) : err.end + 20]!r}); corpus files must be UTF-8: convert the file "
                    f"(e.g. `iconv -f latin1 -t utf-8`) or fix or remove that line"
                ) from err
            if "\r" in line:  # \r\n and a lone \r end a line too, read as \n
                *ended, rest = line.replace("\r\n", "\n").replace("\r", "\n").split("\n")
                lines = [part + "\n" for part in ended] + ([rest] if rest else [])
            else:
                lines = [line]
            for line in lines:
                line_number += 1
                yield line_number, line


def read_documents(
    path: str | os.PathLike, txt_document_start: str | None = None, text_key: str = "text"
) -> Iterator[str]:
    """The documents of one corpus file, streamed; a malformed line fails with ``file:line`` and the fix."""
    path = Path(path)
    if path.name.endswith(".txt"):
        yield from _split_txt((line for _, line in _text_lines(path)), txt_document_start)
        return
    for line_number, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            text = json.loads(line)[text_key]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(
                f"{path}:{line_number}: expected a JSON object with a {text_key!r} field ({err}); fix or remove "
                f"that line (or set data.text_key to the field that holds the text)"
            ) from err
        if not isinstance(text, str):
            raise ValueError(
                f"{path}:{line_number}: the {text_key!r} field is a {type(text).__name__}, not a string; fix or "
                f"remove that line (or set data.text_key to the field that holds the text)"
            )
        try:
            text.encode("utf-8")  # JSON escapes can encode unpaired UTF-16 surrogates, which no tokenizer takes
        except UnicodeEncodeError as err:
            raise ValueError(
                f"{path}:{line_number}: the {text_key!r} text holds an unpaired surrogate escape "
                f"({text[err.start : err.end]!r} at character {err.start}), which is not a character; fix or remove "
                f"that line"
            ) from err
        yield text


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
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _init_worker(serialized_tokenizer: str, parent_pid: int) -> None:
    global _worker_tokenizer
    _die_with_parent(parent_pid)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism; no nested thread pools
    _worker_tokenizer = Tokenizer.from_str(serialized_tokenizer)


def _die_with_parent(parent_pid: int) -> None:
    """Make this worker exit when the preparing process ``parent_pid`` dies, however it dies.

    A SIGKILLed parent runs no cleanup and its workers would wait on their task queue for ever, holding their
    memory. On Linux the kernel kills the worker when its parent dies (``PR_SET_PDEATHSIG``; strictly, when the
    thread that forked it ends, which is after the pool's shutdown, since the thread that uses the pool also shuts
    it down). Everywhere, a watchdog thread exits once the worker has been reparented: the fallback on other
    systems, and the cover for a parent that died before ``prctl`` ran.
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    watchdog = threading.Thread(
        target=_exit_when_orphaned, args=(parent_pid, PARENT_CHECK_SECONDS), name="parent-watchdog", daemon=True
    )
    watchdog.start()


def _exit_when_orphaned(parent_pid: int, interval: float) -> None:
    while os.getppid() == parent_pid:
        time.sleep(interval)
    os._exit(1)


def _encode(
    pieces: list[str], ends_document: list[bool], eod: int, dtype: str, tokenizer: Tokenizer | None = None
) -> list[np.ndarray]:
    """Each piece's token ids (no special tokens added), followed by the EOD token where it ends a document."""
    tokenizer = _worker_tokenizer if tokenizer is None else tokenizer
    encodings = tokenizer.encode_batch_fast(pieces, add_special_tokens=False)
    return [
        np.array([*encoding.ids, eod] if end else encoding.ids, dtype=dtype)
        for encoding, end in zip(encodings, ends_document, strict=True)
    ]


def _piece_bounds(text: str, piece_chars: int | None) -> list[int]:
    """Offsets cutting ``text`` into pieces of at most ``piece_chars`` characters (``None``: one piece), each cut
    at the start of a whitespace run where the second half of the piece has one (module docstring)."""
    bounds = [0]
    while piece_chars is not None and len(text) - bounds[-1] > piece_chars:
        start = bounds[-1]
        low, stop = start + piece_chars // 2, start + piece_chars
        cut = stop  # no space or newline in [low, stop): cut mid-word
        for separator in ("\n", " "):
            i = text.rfind(separator, low, stop)
            while i > low and text[i - 1].isspace():  # back to where the whitespace run starts
                i -= 1
            if i > low:
                cut = i
                break
        bounds.append(cut)
    return [*bounds, len(text)]


def _pieces_are_exact(tokenizer: Tokenizer) -> bool:
    """Whether cutting before every whitespace run leaves this tokenizer's ids unchanged (on a probe text)."""
    probe = "Hello world,\n\n  it's 2024:\tnaïve café, 東京!   Done. e\u0301\n"
    cuts = [i for i in range(1, len(probe)) if probe[i].isspace() and not probe[i - 1].isspace()]
    pieces = [probe[a:b] for a, b in itertools.pairwise([0, *cuts, len(probe)])]
    # One text at a time: batch encoding would start the tokenizer's thread pool before the workers fork.
    ids = [i for piece in pieces for i in tokenizer.encode(piece, add_special_tokens=False).ids]
    return ids == tokenizer.encode(probe, add_special_tokens=False).ids


def _batches(
    files: Sequence[Path], txt_document_start: str | None, text_key: str, batch_chars: int, piece_chars: int | None
) -> Iterator[list[tuple[str, str | None]]]:
    """Lists of (piece, document) of about ``batch_chars`` characters: each document in pieces (:func:`_piece_bounds`),
    its last piece paired with the whole document, the others with ``None``."""
    batch: list[tuple[str, str | None]] = []
    size = 0
    for path in files:
        for document in read_documents(path, txt_document_start, text_key):
            bounds = _piece_bounds(document, piece_chars)
            for start, stop in itertools.pairwise(bounds):
                last = stop == len(document)
                batch.append((document if start == 0 and last else document[start:stop], document if last else None))
                size += stop - start
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
    piece_chars: int = DEFAULT_PIECE_CHARS,
) -> Iterator[tuple[str, np.ndarray]]:
    """(text, tokens + EOD) of every document of ``files``, in order, tokenized by ``num_workers`` processes
    (0: in this process) with a bounded read-ahead, and documents longer than ``piece_chars`` in pieces, so memory
    stays bounded however long the corpus or its documents (module docstring)."""
    dtype, eod, backend = token_dtype(len(tokenizer)).str, tokenizer.eos_token_id, tokenizer.backend_tokenizer
    if not _pieces_are_exact(backend):
        logger.warning(
            "this tokenizer's ids change when a text is cut before a space: long documents are tokenized "
            "whole, in memory that grows with their length"
        )
        piece_chars = None
    parts: list[np.ndarray] = []  # ids of the pieces so far of a document cut into pieces

    def documents(batch: list[tuple[str, str | None]], encoded: list[np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
        for (_, document), ids in zip(batch, encoded, strict=True):
            if document is None:
                parts.append(ids)
            elif parts:
                yield document, np.concatenate([*parts, ids])
                parts.clear()
            else:
                yield document, ids

    def task(batch: list[tuple[str, str | None]]) -> tuple[list[str], list[bool], int, str]:
        return [piece for piece, _ in batch], [document is not None for _, document in batch], eod, dtype

    batches = _batches(files, txt_document_start, text_key, batch_chars, piece_chars)
    if num_workers == 0:
        for batch in batches:
            yield from documents(batch, _encode(*task(batch), backend))
        return
    # fork: workers start in milliseconds and re-import nothing; they only run the Rust tokenizer.
    context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
    pool = ProcessPoolExecutor(num_workers, context, initializer=_init_worker, initargs=(backend.to_str(), os.getpid()))
    in_flight: deque[tuple[list[tuple[str, str | None]], Future]] = deque()

    def oldest() -> Iterator[tuple[str, np.ndarray]]:
        batch, future = in_flight.popleft()
        return documents(batch, future.result())

    try:
        for batch in batches:
            in_flight.append((batch, pool.submit(_encode, *task(batch))))
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
    piece_chars: int = DEFAULT_PIECE_CHARS,
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
        piece_chars=piece_chars,
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
