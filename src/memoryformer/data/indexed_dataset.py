"""The Megatron / GPT-NeoX memory-mapped indexed dataset: a ``.bin`` token file and its ``.idx`` index (spec §4).

This is the on-disk format of Pythia's pre-tokenized Pile. Layout of ``prefix.idx`` (little endian)::

    magic      9 bytes   b"MMIDIDX\\x00\\x00"
    version    uint64    1
    dtype      uint8     code of the token dtype (DTYPE_CODES; Pythia's files use 8 = uint16)
    len        uint64    number of sequences
    doc_count  uint64    length of the document index (= documents + 1)
    sizes      int32[len]        tokens per sequence
    pointers   int64[len]        byte offset of each sequence in ``prefix.bin``
    doc_idx    int64[doc_count]  sequence index where each document starts, then ``len``

``prefix.bin`` is the sequences' tokens back to back. GPT-NeoX's preprocessing writes one sequence per document
(its text's tokens followed by the EOD token), so sequences and documents coincide and ``doc_idx = 0, 1, …, len``.

Token-id check (issue 12, "Checked data"): ``IndexedDataset(prefix, vocab_size=V)`` refuses a dtype that cannot
hold ids ``0 … V−1`` (e.g. code 3 = int16 where the data is uint16) and any id outside ``[0, V)``, naming the file,
the id, its token position and document, and the fix — instead of a bare ``IndexError`` mid-training when a bad
window is drawn. The smallest and largest id come from one streamed pass over ``prefix.bin`` in bounded memory
(:data:`SCAN_CHUNK_BYTES` at a time), cached in ``prefix.token-ids.json`` (or, where that directory is read-only, in
``$XDG_CACHE_HOME/memoryformer/token-ids/``) keyed by both files' size and mtime, so only the first open of a
dataset pays for it. :class:`IndexedDatasetWriter` records the range while writing, so prepared data is never
scanned. Concurrent openers (e.g. every data-parallel rank) take an ``flock`` on ``prefix.idx``: one scans, the
others wait and read its result.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import struct
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from memoryformer.reporting import write_text_atomic

logger = logging.getLogger(__name__)

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# Megatron-LM / GPT-NeoX `megatron/data/indexed_dataset.py` (also Pythia's `utils/mmap_dataset.py`).
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float32),
    7: np.dtype(np.float64),
    8: np.dtype(np.uint16),
}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, len, doc_count: 34 bytes
_CHECK_CHUNK = 1 << 22  # index entries validated per step, so a 100M-document index is checked in bounded memory
SCAN_CHUNK_BYTES = 1 << 24  # token-id scan: bytes of prefix.bin read per step (the scan's whole memory)
TOKEN_IDS_SUFFIX = ".token-ids.json"
_TOKEN_IDS_FORMAT = 1


class IndexedDatasetError(ValueError):
    """A ``.bin``/``.idx`` pair that is not a valid indexed dataset (corrupt, truncated or inconsistent)."""


@dataclass
class TokenIdRange:
    """The smallest and largest token id of a dataset and the token position where each first occurs
    (``None``/-1 for a dataset without tokens)."""

    min_id: int | None = None
    min_position: int = -1
    max_id: int | None = None
    max_position: int = -1

    def update(self, tokens: np.ndarray, offset: int, low: int, high: int) -> None:
        """Fold in ``tokens`` (non-empty, starting at token position ``offset``, with minimum ``low`` and maximum
        ``high`` already computed by the caller, who needs them too)."""
        if self.min_id is None or low < self.min_id:
            self.min_id, self.min_position = int(low), offset + int(np.argmin(tokens))
        if self.max_id is None or high > self.max_id:
            self.max_id, self.max_position = int(high), offset + int(np.argmax(tokens))


def _files_key(bin_path: Path, idx_path: Path) -> dict[str, object]:
    """What a cached token-id range is valid for: both files' size and mtime."""
    bin_stat, idx_stat = bin_path.stat(), idx_path.stat()
    return {
        "format": _TOKEN_IDS_FORMAT,
        "bin": [bin_stat.st_size, bin_stat.st_mtime_ns],
        "idx": [idx_stat.st_size, idx_stat.st_mtime_ns],
    }


def token_ids_cache_paths(prefix: Path) -> list[Path]:
    """Where a dataset's token-id range is cached: beside it, else (read-only directory) in the user's cache."""
    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "memoryformer" / "token-ids"
    digest = hashlib.sha256(str(prefix.resolve()).encode()).hexdigest()[:16]
    return [prefix.with_name(prefix.name + TOKEN_IDS_SUFFIX), user_cache / f"{prefix.name}-{digest}.json"]


def _write_token_ids_cache(prefix: Path, key: dict[str, object], ids: TokenIdRange) -> Path | None:
    """Cache ``ids`` in the first writable place; ``None`` (and a warning) when there is none."""
    paths = token_ids_cache_paths(prefix)
    for path in paths:
        try:
            return write_text_atomic(path, json.dumps({**key, **asdict(ids)}))
        except OSError:
            continue  # read-only: try the next place
    logger.warning("cannot cache the token-id check of %s in %s: every open will scan it again", prefix, paths)
    return None


def _dtype_hint(num_bytes: int, num_tokens: int, dtype: np.dtype) -> str:
    """Why bytes and tokens disagree, when they fit another token width: a wrong dtype code in the index."""
    if num_tokens <= 0 or num_bytes % num_tokens or num_bytes // num_tokens not in (1, 2, 4, 8):
        return ""
    width = num_bytes // num_tokens
    if width == dtype.itemsize:
        return ""
    codes = [f"{code} ({known})" for code, known in DTYPE_CODES.items() if known.itemsize == width]
    return (
        f"; the sizes fit {width}-byte tokens, but the index declares dtype code {dtype_code(dtype)} ({dtype}, "
        f"{dtype.itemsize} bytes): the dtype code (byte 17 of the .idx) is probably wrong, {width}-byte codes are "
        f"{', '.join(codes)}"
    )


def dtype_code(dtype: np.dtype | type) -> int:
    """The format's code of a token dtype."""
    dtype = np.dtype(dtype)
    for code, known in DTYPE_CODES.items():
        if known == dtype:
            return code
    raise ValueError(
        f"dtype {dtype} has no code in the indexed format; use one of {sorted(map(str, DTYPE_CODES.values()))}"
    )


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest token dtype for a vocabulary: uint16 (as Pythia) when the ids fit, else int32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


def split_prefix(path: str | os.PathLike) -> Path:
    """``foo``, ``foo.bin`` and ``foo.idx`` all name the dataset ``foo``."""
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".bin", ".idx") else path


def dataset_files(prefix: Path) -> tuple[Path, Path]:
    """(``prefix.bin``, ``prefix.idx``); appended, not substituted: Pythia's prefix has a dot (``pile_0.87_…``)."""
    return prefix.with_name(prefix.name + ".bin"), prefix.with_name(prefix.name + ".idx")


class IndexedDataset:
    """Memory-mapped reader of ``prefix.bin`` + ``prefix.idx``, byte-compatible with GPT-NeoX/Pythia's files.

    ``len(ds)`` is the number of sequences (= documents for files written by GPT-NeoX's preprocessing or by
    :class:`IndexedDatasetWriter`), ``ds[i]`` the tokens of sequence ``i`` (a read-only numpy view), ``ds.tokens``
    every token back to back. Opening validates the whole index against the token file and raises
    :class:`IndexedDatasetError` naming the problem on a corrupt or truncated pair; with ``vocab_size`` it also
    checks every token id against the vocabulary (:meth:`check_token_ids`, cached: see the module docstring).
    """

    def __init__(self, prefix: str | os.PathLike, vocab_size: int | None = None) -> None:
        self.prefix = split_prefix(prefix)
        self.bin_path, self.idx_path = dataset_files(self.prefix)
        for path in (self.idx_path, self.bin_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist: an indexed dataset needs both {self.prefix}.bin/.idx")
        self._read_index()
        bin_bytes = self.bin_path.stat().st_size
        if bin_bytes % self.dtype.itemsize:
            hint = _dtype_hint(bin_bytes, int(self.sizes.sum(dtype=np.int64)), self.dtype)
            raise IndexedDatasetError(
                f"{self.bin_path} has {bin_bytes} bytes, not a whole number of {self.dtype} tokens: "
                f"truncated or corrupt{hint}"
            )
        # np.memmap refuses empty files; an empty dataset is still a valid one.
        self.tokens = (
            np.memmap(self.bin_path, dtype=self.dtype, mode="r") if bin_bytes else np.zeros(0, dtype=self.dtype)
        )
        self._validate(bin_bytes)
        if vocab_size is not None:
            self.check_token_ids(vocab_size)

    def _read_index(self) -> None:
        idx_bytes = self.idx_path.stat().st_size
        with open(self.idx_path, "rb") as f:
            header = f.read(_HEADER.size)
        if len(header) < _HEADER.size:
            raise IndexedDatasetError(f"{self.idx_path} is truncated: {len(header)} bytes, shorter than the header")
        magic, version, code, num_sequences, doc_count = _HEADER.unpack(header)
        if magic != INDEX_MAGIC:
            raise IndexedDatasetError(
                f"{self.idx_path} is not a Megatron/GPT-NeoX mmap index: magic {magic!r}, expected {INDEX_MAGIC!r}"
            )
        if version != INDEX_VERSION:
            raise IndexedDatasetError(f"{self.idx_path} has index version {version}; only {INDEX_VERSION} exists")
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{self.idx_path} has unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
        expected = _HEADER.size + num_sequences * (4 + 8) + doc_count * 8
        if idx_bytes != expected:
            raise IndexedDatasetError(
                f"{self.idx_path} has {idx_bytes} bytes but its header ({num_sequences} sequences, {doc_count} "
                f"document-index entries) implies {expected}: the file is truncated or corrupt"
            )
        self.dtype = DTYPE_CODES[code]
        index = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        offset = _HEADER.size
        self.sizes = index[offset : offset + 4 * num_sequences].view(np.int32)
        offset += 4 * num_sequences
        self.pointers = index[offset : offset + 8 * num_sequences].view(np.int64)
        offset += 8 * num_sequences
        self.doc_idx = index[offset : offset + 8 * doc_count].view(np.int64)

    def _validate(self, bin_bytes: int) -> None:
        """Sequences must tile the token file exactly, in order, and the document index must be monotone."""
        itemsize, expected_pointer = self.dtype.itemsize, 0
        for start in range(0, len(self.sizes), _CHECK_CHUNK):
            sizes = self.sizes[start : start + _CHECK_CHUNK].astype(np.int64)
            if (sizes < 0).any():
                raise IndexedDatasetError(f"{self.idx_path} has negative sequence sizes: corrupt")
            ends = expected_pointer + np.cumsum(sizes) * itemsize
            starts = np.concatenate(([expected_pointer], ends[:-1]))
            bad = np.flatnonzero(self.pointers[start : start + _CHECK_CHUNK] != starts)
            if bad.size:
                i = start + int(bad[0])
                hint = _dtype_hint(int(self.pointers[i]), int(starts[bad[0]]) // itemsize, self.dtype)
                raise IndexedDatasetError(
                    f"{self.idx_path}: sequence {i} starts at byte {self.pointers[i]}, expected {starts[bad[0]]} "
                    f"(sequences must be contiguous): corrupt index{hint}"
                )
            expected_pointer = int(ends[-1])
        if expected_pointer != bin_bytes:
            hint = _dtype_hint(bin_bytes, expected_pointer // itemsize, self.dtype)
            raise IndexedDatasetError(
                f"{self.bin_path} has {bin_bytes} bytes but {self.idx_path} describes {expected_pointer}: "
                f"the token file is truncated or does not belong to this index{hint}"
            )
        doc_idx = self.doc_idx
        chunks = (doc_idx[start : start + _CHECK_CHUNK + 1] for start in range(0, len(doc_idx), _CHECK_CHUNK))
        monotone = all((chunk[1:] >= chunk[:-1]).all() for chunk in chunks)
        if len(doc_idx) == 0 or doc_idx[0] != 0 or doc_idx[-1] != len(self.sizes) or not monotone:
            raise IndexedDatasetError(
                f"{self.idx_path}: the document index must rise from 0 to the number of sequences "
                f"({len(self.sizes)}): corrupt index"
            )

    def check_token_ids(self, vocab_size: int) -> TokenIdRange:
        """Raise :class:`IndexedDatasetError` unless the dtype holds ids ``0 … vocab_size−1`` and every token id
        lies in ``[0, vocab_size)``; returns the ids' range. The scan behind it runs once per dataset (cached)."""
        code, fitting = dtype_code(self.dtype), token_dtype(vocab_size)
        fix_code = self._set_dtype_command(dtype_code(fitting))
        integer = self.dtype.kind in "iu"
        ids = self.token_id_range() if integer else TokenIdRange()
        negative = ids.min_id is not None and ids.min_id < 0
        if not integer or np.iinfo(self.dtype).max < vocab_size - 1:
            evidence = ""
            if negative and self.dtype.itemsize == fitting.itemsize:  # e.g. int16 data that is really uint16
                reread = np.array(ids.min_id, self.dtype).view(fitting)
                evidence = (
                    f" (token id {ids.min_id} at token position {ids.min_position}, document "
                    f"{self.document_at(ids.min_position)}, is {reread} as {fitting})"
                )
            raise IndexedDatasetError(
                f"{self.idx_path} declares dtype code {code} ({self.dtype}), which cannot hold the tokenizer's ids "
                f"0 … {vocab_size - 1}{evidence}: the dtype code is wrong or the data comes from another tokenizer. "
                f"If the tokens were written as {fitting} (GPT-NeoX's choice for this vocabulary), fix the index with "
                f"{fix_code}; otherwise set data.tokenizer to the tokenizer that produced the data, or prepare the "
                f"data again"
            )
        bad = [(ids.min_id, ids.min_position)] if negative else []
        bad += [(ids.max_id, ids.max_position)] if ids.max_id is not None and ids.max_id >= vocab_size else []
        if bad:
            token_id, position = bad[0]
            raise IndexedDatasetError(
                f"{self.bin_path}: token id {token_id} at token position {position} (document "
                f"{self.document_at(position)}) is outside the tokenizer's vocabulary [0, {vocab_size}) "
                f"(ids in this file: {ids.min_id} … {ids.max_id}; dtype code {code} = {self.dtype}). Training on it "
                f"would fail with an IndexError (or learn from garbage) once such a window is drawn. The data was "
                f"tokenized with another tokenizer (set data.tokenizer to it), is corrupt (prepare it again), or a "
                f"signed dtype code makes large ids negative (fix the index with {fix_code})"
            )
        return ids

    def _set_dtype_command(self, code: int) -> str:
        return f"`python -c \"f = open('{self.idx_path}', 'r+b'); f.seek(17); f.write(bytes([{code}]))\"`"

    def token_id_range(self) -> TokenIdRange:
        """The smallest and largest token id and where each first occurs: cached, else one streamed scan."""
        with open(self.idx_path, "rb") as lock:
            # One process scans; concurrent openers wait and read its result. NFS refuses an exclusive lock on a
            # file opened read-only: there, concurrent openers each scan.
            with contextlib.suppress(OSError):
                fcntl.flock(lock, fcntl.LOCK_EX)
            key = _files_key(self.bin_path, self.idx_path)
            for path in token_ids_cache_paths(self.prefix):
                try:
                    cached = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue  # absent or torn: look further, else scan
                if {k: cached.get(k) for k in key} == key:
                    return TokenIdRange(**{k: v for k, v in cached.items() if k not in key})
            ids = self._scan_token_ids()
            _write_token_ids_cache(self.prefix, key, ids)
            return ids

    def _scan_token_ids(self) -> TokenIdRange:
        """One pass over ``prefix.bin`` through a fixed buffer (file reads, not the memory map, so resident memory
        stays at :data:`SCAN_CHUNK_BYTES` however large the file)."""
        ids, offset = TokenIdRange(), 0
        total, started = self.bin_path.stat().st_size, time.perf_counter()
        logger.info(
            "checking the token ids of %s (%.1f GB) against the vocabulary: a one-time scan, cached in %s; "
            "data.check_token_ids=false skips it",
            self.bin_path,
            total / 1e9,
            token_ids_cache_paths(self.prefix)[0].name,
        )
        buffer = bytearray(SCAN_CHUNK_BYTES - SCAN_CHUNK_BYTES % self.dtype.itemsize)
        with (
            open(self.bin_path, "rb") as f,
            tqdm(total=total, unit="B", unit_scale=True, desc="token-id check", disable=total < 1 << 30) as bar,
        ):
            while num_bytes := f.readinto(buffer):  # a buffered read fills the buffer unless at the end of file
                tokens = np.frombuffer(buffer, dtype=self.dtype, count=num_bytes // self.dtype.itemsize)
                ids.update(tokens, offset, tokens.min(), tokens.max())
                offset += len(tokens)
                bar.update(num_bytes)
        seconds = time.perf_counter() - started
        logger.info(
            "token ids of %s: %s … %s (%.0f MB/s)",
            self.bin_path,
            ids.min_id,
            ids.max_id,
            total / 1e6 / max(seconds, 1e-9),
        )
        return ids

    def document_at(self, position: int) -> int:
        """The document holding token position ``position`` (an offset into :attr:`tokens`)."""
        sequence = int(np.searchsorted(self.pointers, position * self.dtype.itemsize, side="right")) - 1
        return int(np.searchsorted(self.doc_idx, sequence, side="right")) - 1

    def __reduce__(self):
        return IndexedDataset, (self.prefix,)  # reopen in the receiving process rather than copy the token file

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {len(self)} sequences")
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.sizes[i])]

    @property
    def num_documents(self) -> int:
        return len(self.doc_idx) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def document_token_range(self, first: int, stop: int) -> tuple[int, int]:
        """Token offsets [begin, end) covering documents ``first … stop-1`` (contiguous in the token file)."""
        if not 0 <= first <= stop <= self.num_documents:
            raise IndexError(f"documents [{first}, {stop}) out of range for {self.num_documents} documents")
        seq_first, seq_stop = int(self.doc_idx[first]), int(self.doc_idx[stop])
        if seq_first == seq_stop:
            return 0, 0
        begin = int(self.pointers[seq_first]) // self.dtype.itemsize
        return begin, int(self.pointers[seq_stop - 1]) // self.dtype.itemsize + int(self.sizes[seq_stop - 1])

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({str(self.prefix)!r}, sequences={len(self)}, documents={self.num_documents}, "
            f"tokens={self.num_tokens}, dtype={self.dtype})"
        )


class IndexedDatasetWriter:
    """Streaming, atomic writer of an indexed dataset, one document (= one sequence) per :meth:`add_document`.

    Tokens go straight to a temporary ``.bin``; sizes are spooled to a temporary file, so memory stays bounded
    however large the corpus. :meth:`close` writes the index, then renames ``.bin`` and finally ``.idx`` into
    place (removing any previous ``.idx`` first), so a valid-looking pair never exists half-written; an exception
    inside ``with`` (or :meth:`abort`) deletes the temporary files and leaves nothing behind. The token-id range is
    recorded on the way and cached beside the pair, so opening it with a ``vocab_size`` check needs no scan.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype | type = np.uint16) -> None:
        self.prefix = split_prefix(prefix)
        self.dtype = np.dtype(dtype)
        self._code = dtype_code(self.dtype)
        self._max_token = np.iinfo(self.dtype).max if self.dtype.kind in "iu" else None
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        tmp = dict(dir=self.prefix.parent, prefix=f".{self.prefix.name}.", delete=False)
        self._bin = tempfile.NamedTemporaryFile(suffix=".bin.tmp", **tmp)  # noqa: SIM115 (closed in close/abort)
        self._sizes = tempfile.NamedTemporaryFile(suffix=".sizes.tmp", **tmp)  # noqa: SIM115
        self._idx_tmp: str | None = None
        self.num_documents = 0
        self.num_tokens = 0
        self.token_ids = TokenIdRange()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def add_document(self, tokens: np.ndarray | list[int]) -> None:
        """Append one document's tokens (the caller includes the EOD token, as GPT-NeoX's ``--append-eod``)."""
        array = np.asarray(tokens)
        if array.ndim != 1:
            raise ValueError(f"a document is a 1-D token array, got shape {array.shape}")
        if array.size >= 2**31:
            raise ValueError(f"a document of {array.size} tokens exceeds the format's int32 size field")
        if array.size:
            low, high = array.min(), array.max()
            if self._max_token is not None and (low < 0 or high > self._max_token):
                raise ValueError(f"token ids outside [0, {self._max_token}] do not fit dtype {self.dtype}")
            self.token_ids.update(array, self.num_tokens, low, high)
        self._bin.write(array.astype(self.dtype, copy=False).tobytes())
        self._sizes.write(np.int32(array.size).tobytes())
        self.num_documents += 1
        self.num_tokens += int(array.size)

    def close(self) -> IndexedDataset:
        """Finish the index, move both files into place (``.idx`` last) and return the dataset read back."""
        if self._closed:
            raise RuntimeError(f"writer for {self.prefix} is already closed")
        try:
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            self._sizes.close()
            idx_tmp = self._write_index()
        except BaseException:
            self.abort()
            raise
        os.unlink(self._sizes.name)
        bin_path, idx_path = dataset_files(self.prefix)
        idx_path.unlink(missing_ok=True)  # an old index must never pair with the new token file
        os.replace(self._bin.name, bin_path)
        os.replace(idx_tmp, idx_path)
        self._closed = True
        _write_token_ids_cache(self.prefix, _files_key(bin_path, idx_path), self.token_ids)
        return IndexedDataset(self.prefix)

    def _write_index(self) -> str:
        n = self.num_documents
        sizes = np.memmap(self._sizes.name, dtype=np.int32, mode="r") if n else np.zeros(0, np.int32)
        with tempfile.NamedTemporaryFile(
            dir=self.prefix.parent, prefix=f".{self.prefix.name}.", suffix=".idx.tmp", delete=False
        ) as f:
            self._idx_tmp = f.name
            f.write(_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, self._code, n, n + 1))
            for start in range(0, n, _CHECK_CHUNK):
                f.write(sizes[start : start + _CHECK_CHUNK].tobytes())
            pointer = 0  # byte offsets, streamed chunk by chunk
            for start in range(0, n, _CHECK_CHUNK):
                chunk = sizes[start : start + _CHECK_CHUNK].astype(np.int64) * self.dtype.itemsize
                ends = pointer + np.cumsum(chunk)
                f.write(np.concatenate(([pointer], ends[:-1])).astype(np.int64).tobytes())
                pointer = int(ends[-1])
            for start in range(0, n + 1, _CHECK_CHUNK):  # one sequence per document: doc_idx = 0 … n
                f.write(np.arange(start, min(start + _CHECK_CHUNK, n + 1), dtype=np.int64).tobytes())
            f.flush()
            os.fsync(f.fileno())
        del sizes
        return f.name

    def abort(self) -> None:
        """Discard everything written so far."""
        for handle in (self._bin, self._sizes):
            handle.close()
            Path(handle.name).unlink(missing_ok=True)
        if self._idx_tmp is not None:
            Path(self._idx_tmp).unlink(missing_ok=True)
        self._closed = True

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()
