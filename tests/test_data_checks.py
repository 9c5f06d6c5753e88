"""Checked data (issue 12, item 6): token ids against the vocabulary on opening an indexed dataset (cached scan),
file:line errors for bad corpus text, tokenizer workers that die with a SIGKILLed parent, and bounded memory on
very long documents with the same token ids."""

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import zstandard

import memoryformer.data.indexed_dataset as indexed_dataset
import memoryformer.data.prepare as prepare
from memoryformer.data import (
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    build_datasets,
    load_tokenizer,
    prepare_corpus,
    read_documents,
)

NEOX = "tokenizers/gpt-neox-20b"
VOCAB = 50277  # GPT-NeoX-20B's ids, 0 … 50276


@pytest.fixture(scope="module")
def neox(shared_data):
    return load_tokenizer(shared_data / NEOX)


def write_dataset(prefix, documents, keep_cache=False):
    """An indexed dataset of ``documents``; without the writer's cached token-id range unless ``keep_cache``."""
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for document in documents:
            writer.add_document(document)
    if not keep_cache:
        prefix.with_name(prefix.name + ".token-ids.json").unlink()
    return prefix


def set_dtype_code(prefix, code):
    idx = prefix.with_name(prefix.name + ".idx")
    data = bytearray(idx.read_bytes())
    data[17] = code
    idx.write_bytes(bytes(data))


@pytest.fixture
def count_scans(monkeypatch):
    """How many times a token file is scanned (the scan itself still runs)."""
    scans = []
    scan = IndexedDataset._scan_token_ids
    monkeypatch.setattr(IndexedDataset, "_scan_token_ids", lambda self: scans.append(self.prefix) or scan(self))
    return scans


# --- token ids against the vocabulary -----------------------------------------------------------------------


def test_ids_outside_the_vocabulary_are_refused_naming_file_id_position_and_document(tmp_path):
    prefix = write_dataset(tmp_path / "ds", [[5, 6, 7, 0], [50276, 0], [1, 50290, 3, 0]])
    assert IndexedDataset(prefix).num_tokens == 10  # without a vocabulary, nothing is checked
    with pytest.raises(IndexedDatasetError) as error:
        IndexedDataset(prefix, vocab_size=VOCAB)
    message = str(error.value)
    assert str(tmp_path / "ds.bin") in message
    assert "token id 50290 at token position 7 (document 2)" in message and "[0, 50277)" in message
    assert "data.tokenizer" in message  # ... and what to do
    assert IndexedDataset(prefix, vocab_size=50291).check_token_ids(50291).max_id == 50290


def test_int16_dtype_code_on_uint16_data_is_refused_and_the_printed_fix_works(tmp_path):
    prefix = write_dataset(tmp_path / "pile_0.87_deduped_text_document", [[40000, 0], [12, 50276, 0]])
    set_dtype_code(prefix, 3)  # int16 instead of uint16: every id ≥ 32768 reads as negative
    expected = (
        r"dtype code 3 \(int16\), which cannot hold .* 0 … 50276 "
        r"\(token id -25536 at token position 0, document 0, is 40000 as uint16\)"
    )
    with pytest.raises(IndexedDatasetError, match=expected) as error:
        IndexedDataset(prefix, vocab_size=VOCAB)
    fix = str(error.value).split("fix the index with `")[1].split("`")[0]
    assert fix.startswith("python -c ")
    subprocess.run(fix.replace("python", sys.executable, 1), shell=True, check=True)
    dataset = IndexedDataset(prefix, vocab_size=VOCAB)
    assert dataset.dtype == np.uint16 and dataset[0].tolist() == [40000, 0]


def test_negative_ids_from_a_signed_dtype_are_refused(tmp_path):
    prefix = write_dataset(tmp_path / "ds", [[3, 0], [40000, 0]])
    set_dtype_code(prefix, 3)  # a small vocabulary fits int16, but 40000 reads as -25536
    with pytest.raises(IndexedDatasetError, match=r"token id -25536 at token position 2 \(document 1\)"):
        IndexedDataset(prefix, vocab_size=1000)


def test_float_dtype_is_refused(tmp_path):
    with IndexedDatasetWriter(tmp_path / "ds", np.float32) as writer:
        writer.add_document([1.0, 0.0])
    with pytest.raises(IndexedDatasetError, match=r"dtype code 6 \(float32\), which cannot hold"):
        IndexedDataset(tmp_path / "ds", vocab_size=VOCAB)


def test_wrong_token_width_is_named_as_a_dtype_code_problem(tmp_path):
    prefix = write_dataset(tmp_path / "ds", [[1, 2, 0], [3, 0]])
    set_dtype_code(prefix, 4)  # int32 code on 2-byte tokens
    with pytest.raises(IndexedDatasetError, match=r"fit 2-byte tokens.*dtype code 4 \(int32.*8 \(uint16\)"):
        IndexedDataset(prefix)


def test_scan_is_cached_by_size_and_mtime_so_a_second_open_is_free(tmp_path, count_scans):
    prefix = write_dataset(tmp_path / "ds", [[5, 6, 0], [7, 0]])
    IndexedDataset(prefix, vocab_size=VOCAB)
    IndexedDataset(prefix, vocab_size=VOCAB)
    IndexedDataset(prefix, vocab_size=100)  # the range is cached, not the verdict: another vocabulary is free too
    assert count_scans == [prefix]
    cached = json.loads((tmp_path / "ds.token-ids.json").read_text())
    assert (cached["min_id"], cached["max_id"], cached["max_position"]) == (0, 7, 3)
    data = bytearray((tmp_path / "ds.bin").read_bytes())  # same size, new content: the cache no longer applies
    data[0:2] = np.uint16(60000).tobytes()
    (tmp_path / "ds.bin").write_bytes(bytes(data))
    with pytest.raises(IndexedDatasetError, match="token id 60000 at token position 0"):
        IndexedDataset(prefix, vocab_size=VOCAB)
    assert len(count_scans) == 2


def test_written_and_prepared_data_is_never_scanned(tmp_path, neox, count_scans):
    prefix = write_dataset(tmp_path / "ds", [[5, 50276, 0], [0]], keep_cache=True)
    assert IndexedDataset(prefix, vocab_size=VOCAB).check_token_ids(VOCAB).max_position == 1
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "Hello world"}) + "\n")
    prepare_corpus([tmp_path / "a.jsonl"], tmp_path / "out" / "train", neox, num_workers=0, progress=False)
    assert IndexedDataset(tmp_path / "out" / "train", vocab_size=VOCAB)[0].tolist() == [12092, 1533, 0]
    assert count_scans == []


def test_read_only_location_caches_in_the_user_cache(tmp_path, monkeypatch, count_scans):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    prefix = write_dataset(tmp_path / "ds", [[5, 0]])
    (tmp_path / "ds.token-ids.json").mkdir()  # unwritable there (tests run as root, so chmod would not stop us)
    IndexedDataset(prefix, vocab_size=VOCAB)
    IndexedDataset(prefix, vocab_size=VOCAB)
    assert len(count_scans) == 1 and len(list((tmp_path / "cache" / "memoryformer" / "token-ids").iterdir())) == 1


def test_concurrent_openers_scan_once(tmp_path, count_scans):
    prefix = write_dataset(tmp_path / "ds", [[*range(1, 1000), 0]] * 50)
    with ThreadPoolExecutor(4) as ranks:  # .result() re-raises any rank's error
        for call in [ranks.submit(IndexedDataset, prefix, vocab_size=VOCAB) for _ in range(4)]:
            call.result()
    assert count_scans == [prefix]


def test_scan_reads_in_bounded_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(indexed_dataset, "SCAN_CHUNK_BYTES", 64)  # 32 tokens per read over 3 documents
    tokens = np.arange(1, 201) % 1000
    tokens[150] = 2000
    prefix = write_dataset(tmp_path / "ds", [tokens[:100], tokens[100:140], tokens[140:]])
    ids = IndexedDataset(prefix).token_id_range()
    assert (ids.min_id, ids.min_position, ids.max_id, ids.max_position) == (1, 0, 2000, 150)
    assert IndexedDataset(prefix).document_at(150) == 2 and IndexedDataset(prefix).document_at(139) == 1


def test_build_datasets_checks_ids_unless_switched_off(tmp_path, shared_data):
    prefix = write_dataset(tmp_path / "pile", [[5, 6, 7, 0] * 20, [50300, 0] * 20])
    cfg = {"name": "pile", "tokenizer": str(shared_data / NEOX), "train_prefix": str(prefix), "valid_fraction": 0.5}
    with pytest.raises(IndexedDatasetError, match="token id 50300"):
        build_datasets(cfg, seq_len=8, seed=0)
    train, _ = build_datasets({**cfg, "check_token_ids": False}, seq_len=8, seed=0)
    assert train.dataset.num_documents == 2


def test_build_datasets_checks_a_prepared_corpus_without_scanning(tmp_path, shared_data, count_scans):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 9}) + "\n" for i in range(9)))
    (tmp_path / "valid.txt").write_text("held-out text for validation " * 9)
    cfg = {
        "name": "tiny",
        "tokenizer": str(shared_data / NEOX),
        "train_files": [str(tmp_path / "train.jsonl")],
        "valid_files": [str(tmp_path / "valid.txt")],
        "prepared_dir": str(tmp_path / "prepared"),
        "num_workers": 0,
    }
    for _ in range(2):  # prepared, then reused: the ids are checked from the range recorded while writing
        train, valid = build_datasets(cfg, seq_len=8, seed=0, show_progress=False)
    assert count_scans == [] and train.dataset.num_documents == 9 and valid.dataset.num_documents == 1
    (directory,) = [p for p in (tmp_path / "prepared").iterdir() if p.is_dir()]
    assert {p.name for p in directory.iterdir()} >= {"train.token-ids.json", "valid.token-ids.json"}


# --- corpus text: file and line ------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst", ".txt"])
def test_non_utf8_byte_names_file_and_line(tmp_path, suffix):
    raw = b'{"text": "fine"}\n{"text": "caf\xe9"}\n' if suffix != ".txt" else b"fine\r\ncaf\xe9\n"
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(zstandard.ZstdCompressor().compress(raw) if suffix.endswith(".zst") else raw)
    with pytest.raises(ValueError, match=rf"bad{suffix.replace('.', r'[.]')}:2: not valid UTF-8.*iconv"):
        list(read_documents(path))


@pytest.mark.parametrize(("value", "kind"), [("null", "NoneType"), ("5", "int"), ('["a"]', "list")])
def test_non_string_text_names_file_and_line(tmp_path, value, kind):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": ' + value + "}\n")
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: the 'text' field is a {kind}, not a string"):
        list(read_documents(path))


def test_unpaired_surrogate_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "a \\ud800 b"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: .*unpaired surrogate"):
        list(read_documents(path))


def test_bad_text_fails_preparation_and_leaves_nothing(tmp_path, neox):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"".join(b'{"text": "document %d"}\n' % i for i in range(50)) + b'{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:51: not valid UTF-8"):
        prepare_corpus([path], tmp_path / "out" / "train", neox, num_workers=2, batch_chars=20, progress=False)
    assert list((tmp_path / "out").iterdir()) == []


def test_txt_lines_read_as_before_with_universal_newlines(tmp_path):
    path = tmp_path / "wiki.txt"
    path.write_bytes(b" = A = \r\n a\rtext \n = B = \r\n b")
    assert "".join(read_documents(path)) == path.read_text(encoding="utf-8")
    assert list(read_documents(path, r"^ = [^=].* = $")) == [" = A = \n a\ntext \n", " = B = \n b"]


# --- tokenizer workers die with their parent ------------------------------------------------------------------

ENDLESS_PREPARATION = """
import itertools, sys, time
import memoryformer.data.prepare as prepare

if sys.argv[4] == "watchdog-only":
    prepare.PR_SET_PDEATHSIG = 0  # an invalid prctl option: no kernel help, the watchdog alone must act
    prepare.PARENT_CHECK_SECONDS = 0.2

def endless(path, *args):
    for i in itertools.count():
        time.sleep(0.005)
        yield f"document {i} " * 100

prepare.read_documents = endless
prepare.prepare_corpus([sys.argv[1]], sys.argv[2], sys.argv[3], num_workers=2, batch_chars=1000, progress=False)
"""


def _process_table() -> dict[int, tuple[int, str]]:
    """pid → (parent pid, state) of every process, from /proc."""
    table = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # not a process, or gone meanwhile
        table[int(entry)] = (int(fields[1]), fields[0])
    return table


def _descendants(pid: int) -> set[int]:
    table, found, frontier = _process_table(), set(), {pid}
    while frontier:
        frontier = {child for child, (parent, _) in table.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pids: set[int]) -> set[int]:
    table = _process_table()
    return {pid for pid in pids if pid in table and table[pid][1] != "Z"}  # a zombie holds no memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process table from /proc")
@pytest.mark.parametrize("guard", ["prctl", pytest.param("watchdog-only", marks=pytest.mark.slow)])
def test_tokenizer_workers_die_with_a_killed_parent(tmp_path, shared_data, guard):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"text": "x"}) + "\n")
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            ENDLESS_PREPARATION,
            str(source),
            str(tmp_path / "train"),
            str(shared_data / NEOX),
            guard,
        ]
    )
    try:
        deadline = time.monotonic() + 120
        workers: set[int] = set()
        while len(workers) < 2 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
            workers = _descendants(process.pid)
        assert len(workers) >= 2, f"the tokenizer workers never started (exit status {process.poll()})"
        time.sleep(1)  # let them take work
    finally:
        process.send_signal(signal.SIGKILL)  # like `kill -9` of `make data`: no cleanup code runs
        process.wait()
    deadline = time.monotonic() + 30
    while _alive(workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(workers), f"orphaned tokenizer workers still alive: {sorted(_alive(workers))}"


# --- long documents: in pieces, same ids, bounded memory -------------------------------------------------------


def test_piece_bounds_cut_where_whitespace_runs_start():
    text = "alpha beta\n\n  gamma delta epsilon " * 20
    bounds = prepare._piece_bounds(text, 32)
    assert bounds[0] == 0 and bounds[-1] == len(text) and len(bounds) > 20
    for start, stop in itertools.pairwise(bounds):
        assert 0 < stop - start <= 32
    for cut in bounds[1:-1]:
        assert text[cut].isspace() and not text[cut - 1].isspace()
    assert prepare._piece_bounds(text, None) == prepare._piece_bounds(text, len(text)) == [0, len(text)]
    assert prepare._piece_bounds("x" * 100, 32) == [0, 32, 64, 96, 100]  # no whitespace at all: cut mid-word


@pytest.mark.parametrize(("num_workers", "piece_chars"), [(0, 1000), (2, 64)])
def test_long_documents_in_pieces_give_whole_document_ids(tmp_path, shared_data, neox, num_workers, piece_chars):
    with open(shared_data / "pretrain/gutenberg/gutenberg-00000.jsonl") as f:
        book = json.loads(f.readline())["text"][:120_000]  # a real book: prose, headings, runs of blank lines
    pile = [json.loads(line)["text"] for line in (shared_data / "pretrain/pile/pile_sample_tuned_lens.jsonl").open()]
    texts = [book, *pile, "trailing spaces   \n\n\t", "   leading", "a" * 300, ""]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    stats = prepare_corpus(
        [tmp_path / "in.jsonl"],
        tmp_path / "out",
        neox,
        num_workers=num_workers,
        batch_chars=4 * piece_chars,
        piece_chars=piece_chars,
        progress=False,
    )
    dataset = IndexedDataset(tmp_path / "out")
    assert stats.empty_documents == 1 and len(dataset) == len(texts) - 1
    for i, text in enumerate(texts[:-2]):
        assert dataset[i].tolist() == [*neox(text, add_special_tokens=False).input_ids, 0], f"document {i}"
    assert neox.decode(dataset[len(texts) - 2][:-1]) == "a" * 300  # cut mid-word: same text, ids may differ


def test_no_encode_call_sees_more_than_a_batch_plus_a_piece(tmp_path, neox, monkeypatch):
    calls = []
    encode = prepare._encode
    monkeypatch.setattr(
        prepare, "_encode", lambda pieces, *a: calls.append(sum(map(len, pieces))) or encode(pieces, *a)
    )
    text = "word " * 40_000  # one 200 kB document
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": text}) + "\n")
    prepare_corpus(
        [tmp_path / "in.jsonl"],
        tmp_path / "out",
        neox,
        num_workers=0,
        batch_chars=10_000,
        piece_chars=2_000,
        progress=False,
    )
    assert sum(calls) == len(text) and max(calls) <= 10_000 + 2_000 and len(calls) > 10
    assert IndexedDataset(tmp_path / "out")[0].tolist() == [*neox(text, add_special_tokens=False).input_ids, 0]


def test_a_tokenizer_that_cuts_differently_is_not_cut(neox):
    from tokenizers import pre_tokenizers

    backend = neox.backend_tokenizer
    assert prepare._pieces_are_exact(backend)
    prefixed = type(backend).from_str(backend.to_str())
    prefixed.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert not prepare._pieces_are_exact(prefixed)


PEAK_MEMORY = """
import json, resource, sys
from memoryformer.data import load_tokenizer, prepare_corpus

tokenizer = load_tokenizer(sys.argv[2])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
prepare_corpus([sys.argv[1]], sys.argv[3], tokenizer, num_workers=0, progress=False)
print(json.dumps({"peak_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""


@pytest.mark.slow
def test_peak_memory_of_a_long_document_is_bounded(tmp_path, shared_data):
    with open(shared_data / "pretrain/gutenberg/gutenberg-00000.jsonl") as f:
        books = [json.loads(line)["text"] for line in f]
    text = "\n\n".join(books)[:8_000_000]  # one 8 MB document: whole, it took ~1 GB to tokenize
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": text}) + "\n")
    result = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY, str(tmp_path / "long.jsonl"), str(shared_data / NEOX), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        check=True,
    )
    growth = json.loads(result.stdout.strip().splitlines()[-1])["peak_growth_mb"]
    assert growth < 250, f"peak RSS grew by {growth:.0f} MB for an 8 MB document"
