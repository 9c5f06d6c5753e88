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
"""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path

import numpy as np

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


class IndexedDatasetError(ValueError):
    """A ``.bin``/``.idx`` pair that is not a valid indexed dataset (corrupt, truncated or inconsistent)."""


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
    :class:`IndexedDatasetError` naming the problem on a corrupt or truncated pair.
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = split_prefix(prefix)
        self.bin_path, self.idx_path = dataset_files(self.prefix)
        for path in (self.idx_path, self.bin_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist: an indexed dataset needs both {self.prefix}.bin/.idx")
        self._read_index()
        bin_bytes = self.bin_path.stat().st_size
        if bin_bytes % self.dtype.itemsize:
            raise IndexedDatasetError(
                f"{self.bin_path} has {bin_bytes} bytes, not a whole number of {self.dtype} tokens: "
                "truncated or corrupt"
            )
        # np.memmap refuses empty files; an empty dataset is still a valid one.
        self.tokens = (
            np.memmap(self.bin_path, dtype=self.dtype, mode="r") if bin_bytes else np.zeros(0, dtype=self.dtype)
        )
        self._validate(bin_bytes)

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
                raise IndexedDatasetError(
                    f"{self.idx_path}: sequence {i} starts at byte {self.pointers[i]}, expected {starts[bad[0]]} "
                    f"(sequences must be contiguous): corrupt index"
                )
            expected_pointer = int(ends[-1])
        if expected_pointer != bin_bytes:
            raise IndexedDatasetError(
                f"{self.bin_path} has {bin_bytes} bytes but {self.idx_path} describes {expected_pointer}: "
                f"the token file is truncated or does not belong to this index"
            )
        doc_idx = self.doc_idx
        chunks = (doc_idx[start : start + _CHECK_CHUNK + 1] for start in range(0, len(doc_idx), _CHECK_CHUNK))
        monotone = all((chunk[1:] >= chunk[:-1]).all() for chunk in chunks)
        if len(doc_idx) == 0 or doc_idx[0] != 0 or doc_idx[-1] != len(self.sizes) or not monotone:
            raise IndexedDatasetError(
                f"{self.idx_path}: the document index must rise from 0 to the number of sequences "
                f"({len(self.sizes)}): corrupt index"
            )

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
    inside ``with`` (or :meth:`abort`) deletes the temporary files and leaves nothing behind.
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
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def add_document(self, tokens: np.ndarray | list[int]) -> None:
        """Append one document's tokens (the caller includes the EOD token, as GPT-NeoX's ``--append-eod``)."""
        array = np.asarray(tokens)
        if array.ndim != 1:
            raise ValueError(f"a document is a 1-D token array, got shape {array.shape}")
        if self._max_token is not None and array.size and (array.min() < 0 or array.max() > self._max_token):
            raise ValueError(f"token ids outside [0, {self._max_token}] do not fit dtype {self.dtype}")
        if array.size >= 2**31:
            raise ValueError(f"a document of {array.size} tokens exceeds the format's int32 size field")
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
