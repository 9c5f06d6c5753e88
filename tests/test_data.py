"""The data pipeline: tokenizer, GPT-NeoX indexed format (read and write), corpus preparation, packed samples,
resume and data-parallel sharding, configs (spec §4 "Data")."""

import json
import pickle
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import zstandard
from omegaconf import OmegaConf

import memoryformer.data.build
from memoryformer.config import compose_config
from memoryformer.data import (
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    PackedSamples,
    build_datasets,
    in_validation_split,
    load_tokenizer,
    prepare_corpus,
    read_documents,
    sample_indices,
)
from memoryformer.paths import PROJECT_ROOT

NEOX = "tokenizers/gpt-neox-20b"
DOCS = [
    "Hello world",
    "The Pile is an 825 GiB diverse, open-source language modelling data set.\n\nSecond paragraph!",
    "  leading spaces and\ttabs\n\n\n   and runs of     spaces",
    "Unicode: café, naïve, 東京, emoji 🙂, combining e\u0301 (NFC-normalised)",
    "<|endoftext|> inside text is the special token",
    "x",
]


@pytest.fixture(scope="module")
def neox(shared_data):
    return load_tokenizer(shared_data / NEOX)


def expected_tokens(tokenizer, text):
    return [*tokenizer(text, add_special_tokens=False).input_ids, tokenizer.eos_token_id]


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t, "meta": {"i": i}}) + "\n" for i, t in enumerate(texts)))
    return path


# --- tokenizer --------------------------------------------------------------------------------------


def test_tokenizer_loads_offline_from_dir_and_file(shared_data):
    for source in (shared_data / NEOX, shared_data / NEOX / "tokenizer.json"):
        tokenizer = load_tokenizer(source)
        assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == 0
        assert len(tokenizer) == 50277  # the model pads to 50304, the tokenizer does not
        assert tokenizer("Hello world", add_special_tokens=False).input_ids == [12092, 1533]


def test_tokenizer_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.tokenizer"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json"):
        load_tokenizer(tmp_path / "empty")


# --- the indexed format, written byte by byte from its description ------------------------------------


def hand_built_pair(prefix, documents, dtype=np.uint16, code=8):
    """A .bin/.idx pair built with struct.pack from the format description, not by our writer."""
    itemsize = np.dtype(dtype).itemsize
    sizes = [len(d) for d in documents]
    pointers = [itemsize * sum(sizes[:i]) for i in range(len(sizes))]
    idx = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    idx += struct.pack("<Q", len(sizes)) + struct.pack("<Q", len(sizes) + 1)
    idx += b"".join(struct.pack("<i", s) for s in sizes)
    idx += b"".join(struct.pack("<q", p) for p in pointers)
    idx += b"".join(struct.pack("<q", i) for i in range(len(sizes) + 1))
    fmt = {np.uint16: "<H", np.int32: "<i"}[dtype]
    data = b"".join(struct.pack(fmt, token) for doc in documents for token in doc)
    prefix.with_name(prefix.name + ".idx").write_bytes(idx)
    prefix.with_name(prefix.name + ".bin").write_bytes(data)
    return idx, data


DOCUMENTS = [[5, 6, 7, 0], [65535, 0], [1, 2, 3, 4, 5, 0], [0]]


@pytest.mark.parametrize(("dtype", "code"), [(np.uint16, 8), (np.int32, 4)])
def test_reader_reads_hand_built_index(tmp_path, dtype, code):
    hand_built_pair(tmp_path / "pile_0.87_deduped_text_document", DOCUMENTS, dtype, code)  # Pythia's dotted name
    ds = IndexedDataset(tmp_path / "pile_0.87_deduped_text_document.idx")  # a .bin/.idx suffix names it too
    assert ds.dtype == np.dtype(dtype) and len(ds) == 4 and ds.num_documents == 4 and ds.num_tokens == 13
    assert ds.sizes.tolist() == [4, 2, 6, 1] and ds.doc_idx.tolist() == [0, 1, 2, 3, 4]
    for i, document in enumerate(DOCUMENTS):
        assert ds[i].tolist() == document
    assert ds[-1].tolist() == [0]
    assert ds.document_token_range(1, 3) == (4, 12)


def test_writer_output_is_byte_identical_to_the_format(tmp_path):
    idx, data = hand_built_pair(tmp_path / "hand", DOCUMENTS)
    with IndexedDatasetWriter(tmp_path / "ours", np.uint16) as writer:
        for document in DOCUMENTS:
            writer.add_document(document)
    assert (tmp_path / "ours.idx").read_bytes() == idx
    assert (tmp_path / "ours.bin").read_bytes() == data
    # ... plus the token-id range it recorded on the way (data/README.md, "Checked data")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "hand.bin",
        "hand.idx",
        "ours.bin",
        "ours.idx",
        "ours.token-ids.json",
    ]


def corrupt(tmp_path, edit_idx=None, edit_bin=None):
    idx, data = hand_built_pair(tmp_path / "ds", DOCUMENTS)
    (tmp_path / "ds.idx").write_bytes(edit_idx(bytearray(idx)) if edit_idx else idx)
    (tmp_path / "ds.bin").write_bytes(edit_bin(bytearray(data)) if edit_bin else data)
    return tmp_path / "ds"


def _set(buffer, offset, packed):
    buffer[offset : offset + len(packed)] = packed
    return bytes(buffer)


@pytest.mark.parametrize(
    ("edit_idx", "edit_bin", "message"),
    [
        (lambda b: _set(b, 0, b"NOTANIDX\x00"), None, "magic"),
        (lambda b: _set(b, 9, struct.pack("<Q", 2)), None, "version 2"),
        (lambda b: _set(b, 17, struct.pack("<B", 9)), None, "unknown dtype code 9"),
        (lambda b: b[:-5], None, "truncated"),
        (lambda b: b[:20], None, "truncated"),
        (None, lambda b: b[:-2], "truncated"),
        (None, lambda b: b[:-1], "whole number"),
        (None, lambda b: b + b"\x00\x00", "truncated or does not belong"),
        (lambda b: _set(b, 34 + 4 * 4 + 8, struct.pack("<q", 6)), None, "sequence 1 starts at byte 6"),
        (lambda b: _set(b, 34, struct.pack("<i", -1)), None, "negative"),
        (lambda b: _set(b, 34 + 12 * 4 + 8, struct.pack("<q", 3)), None, "document index"),
    ],
)
def test_reader_refuses_corrupt_or_truncated_files(tmp_path, edit_idx, edit_bin, message):
    prefix = corrupt(tmp_path, edit_idx, edit_bin)
    with pytest.raises(IndexedDatasetError, match=message):
        IndexedDataset(prefix)


def test_reader_missing_file_is_a_clear_error(tmp_path):
    hand_built_pair(tmp_path / "ds", DOCUMENTS)
    (tmp_path / "ds.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"ds\.bin does not exist"):
        IndexedDataset(tmp_path / "ds")


def test_writer_is_atomic(tmp_path):
    hand_built_pair(tmp_path / "ds", DOCUMENTS)
    old = (tmp_path / "ds.idx").read_bytes()
    with pytest.raises(RuntimeError, match="killed"), IndexedDatasetWriter(tmp_path / "ds") as writer:
        writer.add_document([1, 2, 3])
        raise RuntimeError("killed")
    assert (tmp_path / "ds.idx").read_bytes() == old  # the previous dataset is untouched ...
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.bin", "ds.idx"]  # ... and no temporaries remain
    with IndexedDatasetWriter(tmp_path / "ds") as writer:
        writer.add_document([9, 0])
    assert IndexedDataset(tmp_path / "ds")[0].tolist() == [9, 0]
    with pytest.raises(ValueError, match="do not fit"), IndexedDatasetWriter(tmp_path / "x", np.uint16) as writer:
        writer.add_document([70000])


# --- preparation: text → indexed dataset ---------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_prepared_tokens_equal_the_tokenizer_per_document(tmp_path, neox, num_workers):
    write_jsonl(tmp_path / "a.jsonl", DOCS[:3])
    write_jsonl(tmp_path / "b.jsonl", DOCS[3:])
    stats = prepare_corpus(
        [tmp_path / "*.jsonl"],
        tmp_path / "out" / "train",
        neox,
        num_workers=num_workers,
        batch_chars=50,
        progress=False,
    )
    ds = IndexedDataset(tmp_path / "out" / "train")
    assert ds.dtype == np.uint16 and len(ds) == len(DOCS) == stats.train_documents
    expected = [expected_tokens(neox, text) for text in DOCS]
    assert [ds[i].tolist() for i in range(len(ds))] == expected  # each document, EOD (0) after each
    assert ds.tokens.tolist() == [t for doc in expected for t in doc]
    assert stats.train_tokens == ds.num_tokens and stats.tokens_per_second > 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train.bin", "train.idx", "train.token-ids.json"]


def test_prepare_real_pile_sample(shared_data, tmp_path, neox):
    source = shared_data / "pretrain/pile/pile_sample_tuned_lens.jsonl"
    stats = prepare_corpus([source], tmp_path / "pile", neox, progress=False)
    ds = IndexedDataset(tmp_path / "pile")
    texts = [json.loads(line)["text"] for line in source.read_text().splitlines()]
    assert len(ds) == 10 and ds.num_tokens == 5284 + 10 == stats.train_tokens  # SOURCES.md: 5284 NeoX tokens
    for i, text in enumerate(texts):
        assert ds[i].tolist() == expected_tokens(neox, text)


def test_reads_jsonl_zst_and_txt(tmp_path, neox):
    lines = "".join(json.dumps({"text": t, "meta": {"pile_set_name": "Pile-CC"}}) + "\n" for t in DOCS)
    (tmp_path / "shard.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(lines.encode()))
    assert list(read_documents(tmp_path / "shard.jsonl.zst")) == DOCS
    (tmp_path / "wiki.txt").write_text(" = A = \n a text \n = = Sub = = \n more \n = B = \n b text \n")
    assert list(read_documents(tmp_path / "wiki.txt", r"^ = [^=].* = $")) == [
        " = A = \n a text \n = = Sub = = \n more \n",
        " = B = \n b text \n",
    ]
    assert list(read_documents(tmp_path / "wiki.txt")) == [(tmp_path / "wiki.txt").read_text()]
    prepare_corpus([tmp_path / "shard.jsonl.zst"], tmp_path / "z", neox, num_workers=0, progress=False)
    assert IndexedDataset(tmp_path / "z")[3].tolist() == expected_tokens(neox, DOCS[3])


def test_wikitext_heldout_splits_into_articles(shared_data):
    documents = list(read_documents(shared_data / "heldout/wikitext-2-raw-v1/test.txt", r"^ = [^=].* = $"))
    assert documents[0].startswith(" = Robert Boulter = \n") and all(d.startswith(" = ") for d in documents)
    assert "".join(documents) == (shared_data / "heldout/wikitext-2-raw-v1/test.txt").read_text()


def test_bad_inputs_fail_early_and_leave_nothing(tmp_path, neox):
    with pytest.raises(FileNotFoundError, match="no file matches"):
        prepare_corpus([tmp_path / "missing-*.jsonl"], tmp_path / "out", neox, progress=False)
    (tmp_path / "c.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported"):
        prepare_corpus([tmp_path / "c.csv"], tmp_path / "out", neox, progress=False)
    # A failure half-way (here a malformed line after good documents) must not leave a valid-looking dataset.
    path = write_jsonl(tmp_path / "bad.jsonl", DOCS)
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:7"):
        prepare_corpus([path], tmp_path / "out" / "train", neox, num_workers=2, batch_chars=10, progress=False)
    assert list((tmp_path / "out").iterdir()) == []


KILLED_RUN = """
import itertools, sys, time
import memoryformer.data.prepare as prepare

def endless(path, *args):
    for i in itertools.count():
        time.sleep(0.01)
        yield f"document {i} " * 100

prepare.read_documents = endless
prepare.prepare_corpus([sys.argv[1]], sys.argv[2], sys.argv[3], num_workers=0, batch_chars=1000, progress=False)
"""


def test_killed_preparation_leaves_no_valid_looking_dataset(tmp_path, shared_data, neox):
    source = write_jsonl(tmp_path / "in.jsonl", ["x"])
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, str(source), str(out / "train"), str(shared_data / NEOX)]
    )
    try:
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size > 10_000 for p in out.glob("*.bin.tmp")) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        process.kill()  # SIGKILL: no cleanup code runs
        process.wait()
    assert list(out.glob("*.bin.tmp")), "the run never started writing"
    assert not (out / "train.bin").exists() and not (out / "train.idx").exists()
    prepare_corpus([source], out / "train", neox, num_workers=0, progress=False)  # a rerun succeeds
    assert IndexedDataset(out / "train")[0].tolist() == expected_tokens(neox, "x")


def test_validation_split_is_deterministic_by_document(tmp_path, neox):
    texts = [f"document number {i} " * (i % 7 + 1) for i in range(200)]
    held_out = {t for t in texts if in_validation_split(t, 0.2)}
    assert 20 < len(held_out) < 60  # ~40 expected
    for order, name in ((texts, "fwd"), (texts[::-1], "rev")):
        write_jsonl(tmp_path / f"{name}.jsonl", order)
        stats = prepare_corpus(
            [tmp_path / f"{name}.jsonl"],
            tmp_path / name / "train",
            neox,
            valid_prefix=tmp_path / name / "valid",
            valid_fraction=0.2,
            num_workers=0,
            progress=False,
        )
        train, valid = IndexedDataset(tmp_path / name / "train"), IndexedDataset(tmp_path / name / "valid")
        decoded = {
            split: {neox.decode(ds[i][:-1]) for i in range(len(ds))} for split, ds in (("t", train), ("v", valid))
        }
        assert decoded["v"] == held_out and decoded["t"] == set(texts) - held_out  # file order does not matter
        assert stats.valid_documents == len(held_out)


# --- packed samples, resume and sharding -----------------------------------------------------------------


@pytest.fixture
def token_stream(tmp_path):
    """A dataset whose token at position p is p % 50000, in documents of uneven length."""
    rng = np.random.default_rng(0)
    tokens = np.arange(10_007) % 50_000
    cuts = np.sort(rng.choice(np.arange(1, len(tokens)), size=40, replace=False))
    with IndexedDatasetWriter(tmp_path / "stream") as writer:
        for document in np.split(tokens, cuts):
            writer.add_document(document)
    return IndexedDataset(tmp_path / "stream")


def test_samples_are_gpt_neox_windows_across_documents(token_stream):
    samples = PackedSamples(token_stream, seq_len=64, seed=1, shuffle=False)
    assert len(samples) == (10_007 - 1) // 64
    for j in (0, 1, 77, len(samples) - 1):
        assert samples[j].dtype == torch.int64
        assert samples[j].tolist() == list(range(64 * j, 64 * j + 65))  # windows share one token
    assert samples[len(samples)].tolist() == samples[0].tolist()  # epoch 2 starts over


def test_shuffle_is_a_seeded_permutation_per_epoch(token_stream):
    samples = PackedSamples(token_stream, seq_len=64, seed=1234)
    n = len(samples)
    epoch0 = [samples.window(i) for i in range(n)]
    epoch1 = [samples.window(n + i) for i in range(n)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(n)) and epoch0 != epoch1
    assert epoch0 == [PackedSamples(token_stream, 64, seed=1234).window(i) for i in range(n)]
    assert epoch0 != [PackedSamples(token_stream, 64, seed=1).window(i) for i in range(n)]


def test_resume_sees_exactly_the_samples_of_an_uninterrupted_run(token_stream):
    n, m = 100, 350  # m crosses into the third epoch (156 samples per epoch)
    full = PackedSamples(token_stream, 64, seed=7).batch(list(range(m)))
    first = PackedSamples(token_stream, 64, seed=7).batch(list(range(n)))
    resumed = PackedSamples(token_stream, 64, seed=7).batch(list(range(n, m)))  # a fresh process
    assert torch.equal(torch.cat([first, resumed]), full)


def test_ranks_see_disjoint_samples_covering_the_epoch(token_stream):
    samples = PackedSamples(token_stream, 64, seed=3)
    global_batch, micro, world = 10, 1, 2
    steps = len(samples) // global_batch  # 15 steps; the 6 leftover samples start the next step
    seen = {
        rank: [i for s in range(steps) for mb in sample_indices(s, global_batch, micro, rank, world) for i in mb]
        for rank in (0, 1)
    }
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(steps * global_batch))
    windows = {samples.window(i) for i in seen[0] + seen[1]}
    assert len(windows) == steps * global_batch  # distinct windows of the epoch


@pytest.mark.parametrize(("world", "accumulation", "micro"), [(2, 1, 4), (2, 3, 2), (4, 2, 1)])
def test_data_parallel_equals_one_accumulating_process(world, accumulation, micro):
    global_batch = micro * world * accumulation
    for step in (0, 5):
        single = sample_indices(step, global_batch, micro, rank=0, world_size=1)
        assert len(single) == accumulation * world
        per_rank = [sample_indices(step, global_batch, micro, rank, world) for rank in range(world)]
        for j in range(accumulation):  # micro-step j of all ranks = micro-steps jW … jW+W−1 of one process
            assert [per_rank[r][j] for r in range(world)] == single[j * world : (j + 1) * world]
        assert sorted(i for mb in single for i in mb) == list(range(step * global_batch, (step + 1) * global_batch))


def test_sample_indices_reject_inconsistent_batches():
    with pytest.raises(ValueError, match="multiple of micro_batch"):
        sample_indices(0, global_batch=10, micro_batch=4, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank 2 out of range"):
        sample_indices(0, 8, 2, rank=2, world_size=2)


def test_samples_pickle_by_reference(token_stream):
    samples = PackedSamples(token_stream, 64, seed=5, documents=range(3, 30))
    payload = pickle.dumps(samples)
    assert len(payload) < 2_000  # the memory map is reopened, not copied
    clone = pickle.loads(payload)
    assert len(clone) == len(samples) and torch.equal(clone[200], samples[200])


def test_too_short_corpus_is_a_clear_error(token_stream):
    with pytest.raises(ValueError, match="fewer than one sample"):
        PackedSamples(token_stream, seq_len=20_000, seed=0)


# --- configs and build_datasets -----------------------------------------------------------------------------


def text_config(tmp_path, shared_data, texts=tuple(t * 40 for t in DOCS), **extra):
    (tmp_path / "corpus").mkdir()
    write_jsonl(tmp_path / "corpus" / "part-0.jsonl", texts)
    (tmp_path / "valid.txt").write_text(" = V = \n held-out text for validation " * 30)
    return {
        "name": "tiny",
        "tokenizer": str(shared_data / NEOX),
        "train_files": [str(tmp_path / "corpus" / "*.jsonl")],
        "valid_files": [str(tmp_path / "valid.txt")],
        "txt_document_start": r"^ = [^=].* = $",
        "prepared_dir": str(tmp_path / "prepared"),
        "num_workers": 0,
        **extra,
    }


def test_build_datasets_prepares_once_and_reuses(tmp_path, shared_data):
    cfg = text_config(tmp_path, shared_data)
    train, valid = build_datasets(OmegaConf.create(cfg), seq_len=16, seed=0, show_progress=False)
    (prepared,) = [p for p in (tmp_path / "prepared").iterdir() if p.is_dir()]
    assert prepared.name.startswith("tiny-") and (prepared / "meta.json").is_file()
    assert train.dataset.num_documents == len(DOCS) and valid.dataset.num_documents == 1
    stamp = (prepared / "train.idx").stat().st_mtime_ns
    again, _ = build_datasets(cfg, seq_len=16, seed=0, show_progress=False)
    assert (prepared / "train.idx").stat().st_mtime_ns == stamp and torch.equal(again[3], train[3])
    with open(tmp_path / "corpus" / "part-0.jsonl", "a") as f:  # a changed corpus is a new cache entry
        f.write(json.dumps({"text": "one more document"}) + "\n")
    changed, _ = build_datasets(cfg, seq_len=16, seed=0, show_progress=False)
    assert changed.dataset.num_documents == len(DOCS) + 1
    assert len([p for p in (tmp_path / "prepared").iterdir() if p.is_dir()]) == 2


def test_validation_windows_do_not_depend_on_the_seed(tmp_path, shared_data):
    """Seeds reshuffle training, never validation: seed-to-seed spread is the training's, not the val subset's."""
    texts = [f"document {i}: " + "some words " * 50 for i in range(30)]
    cfg = text_config(tmp_path, shared_data, texts, valid_files=[], valid_fraction=0.3)
    train_a, valid_a = build_datasets(cfg, seq_len=8, seed=1, show_progress=False)
    train_b, valid_b = build_datasets(cfg, seq_len=8, seed=2, show_progress=False)
    assert len(valid_a) > 2
    assert all(torch.equal(valid_a[i], valid_b[i]) for i in range(len(valid_a)))
    assert not all(torch.equal(train_a[i], train_b[i]) for i in range(len(train_a)))


def test_build_datasets_concurrent_callers_prepare_once(tmp_path, shared_data, monkeypatch):
    texts = [f"document {i}: " + "some words " * 50 for i in range(30)]
    cfg = text_config(tmp_path, shared_data, texts, valid_files=[], valid_fraction=0.3)
    preparations = []
    prepare = memoryformer.data.build.prepare_corpus
    monkeypatch.setattr(
        memoryformer.data.build, "prepare_corpus", lambda *a, **k: preparations.append(1) or prepare(*a, **k)
    )
    with ThreadPoolExecutor(3) as ranks:  # .result() re-raises any rank's error
        calls = [ranks.submit(build_datasets, cfg, seq_len=8, seed=0, show_progress=False) for _ in range(3)]
        results = [call.result() for call in calls]
    assert len(preparations) == 1  # one rank prepared, the others waited
    assert len([p for p in (tmp_path / "prepared").iterdir() if p.is_dir()]) == 1  # no leftover temporaries
    assert all(torch.equal(r[0][0], results[0][0][0]) for r in results)
    train_docs, valid_docs = (samples.dataset.num_documents for samples in results[0])
    assert valid_docs == sum(in_validation_split(t, 0.3) for t in texts) and train_docs + valid_docs == 30


def test_pretokenized_config_reads_in_place_and_splits_the_tail(tmp_path, token_stream):
    cfg = {"name": "pile", "train_prefix": str(token_stream.prefix), "valid_prefix": None, "valid_fraction": 0.1}
    train, valid = build_datasets(cfg, seq_len=32, seed=0)
    assert train.documents == range(37) and valid.documents == range(37, 41)
    assert len(train.tokens) + len(valid.tokens) == token_stream.num_tokens
    assert train.tokens[-1] + 1 == valid.tokens[0]  # contiguous, disjoint


def test_missing_pile_says_what_to_download(tmp_path):
    cfg = {"name": "pile", "train_prefix": str(tmp_path / "pile_0.87_deduped_text_document"), "valid_fraction": 1e-4}
    with pytest.raises(FileNotFoundError, match=r"pythia_deduped_pile_idxmaps.*data\.train_prefix"):
        build_datasets(cfg, seq_len=2048, seed=1234)


def test_data_configs_compose(shared_data):
    for name in ("sample", "pile"):
        cfg = compose_config([f"data={name}"], config_name="prepare_data").data
        assert load_tokenizer(cfg.tokenizer).eos_token_id == 0
    sample = compose_config(["data=sample"], config_name="prepare_data").data
    assert len(OmegaConf.to_container(sample, resolve=True)["train_files"]) == 2
    assert sample.valid_files is None and 0 < sample.valid_fraction < 1  # held out from the training documents
    assert sample.prepared_dir == str(PROJECT_ROOT / "data" / "prepared")


def test_prepare_data_script(tmp_path, shared_data):
    pile = shared_data / "pretrain/pile/pile_sample_tuned_lens.jsonl"
    result = subprocess.run(
        [
            sys.executable,
            str(PROJECT_ROOT / "scripts" / "prepare_data.py"),
            f"hydra.run.dir={tmp_path / 'run'}",
            f"data.prepared_dir={tmp_path / 'prepared'}",
            f"data.train_files=[{pile}]",
            "data.valid_files=[]",
            "data.valid_fraction=0.2",
            "progress=false",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "train: IndexedDataset(" in result.stdout and "valid: IndexedDataset(" in result.stdout


@pytest.mark.slow
def test_prepare_whole_shared_sample(tmp_path, shared_data):
    cfg = compose_config(["data=sample", f"data.prepared_dir={tmp_path}"], config_name="prepare_data").data
    train, valid = build_datasets(cfg, seq_len=2048, seed=1234, show_progress=False)
    # SOURCES.md: 16,255,895 (Gutenberg) + 5,284 (Pile) tokens in 88 documents, plus one EOD per document,
    # split by document between train and validation.
    assert train.dataset.num_tokens + valid.dataset.num_tokens == 16_255_895 + 5_284 + 78 + 10
    assert train.dataset.num_documents + valid.dataset.num_documents == 88
    assert 0 < valid.dataset.num_documents < 15
    assert len(train) == (train.dataset.num_tokens - 1) // 2048
