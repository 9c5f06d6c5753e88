"""Pythia's Pile from the hub (issue 11 items 4–5): the shard download and verified merge, and the reader that
replays Pythia's data order. The hub is faked: ``huggingface_hub.hf_hub_download`` copies from local files."""

import dataclasses
import hashlib
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch

from memoryformer.config import compose_config
from memoryformer.data import (
    IndexedDataset,
    IndexedDatasetWriter,
    PackedSamples,
    PythiaOrderSamples,
    build_datasets,
    download_deduped_pile,
    pythia_pile,
    sample_indices,
)
from memoryformer.data.pythia_pile import (
    DEDUPED_PILE,
    PRESHUFFLED_DEDUPED_PILE,
    PileDownloadError,
    ShardedRelease,
    download_release,
)

SHARD_BYTES = 3000  # not a multiple of the token size: shards are byte ranges, as EleutherAI cut them


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FakeHub:
    """Serves files from a local directory through ``hf_hub_download``'s signature, recording every request."""

    def __init__(self, root):
        self.root, self.calls, self.fail_once, self.corrupt_once = root, [], set(), set()

    def hf_hub_download(self, repo_id, filename, *, repo_type=None, revision=None, local_dir=None):
        assert repo_type == "dataset"
        self.calls.append((repo_id, filename, revision))
        if filename in self.fail_once:
            self.fail_once.discard(filename)
            raise OSError(f"connection reset while downloading {filename}")
        target = local_dir / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.root / filename, target)
        if filename in self.corrupt_once:
            self.corrupt_once.discard(filename)
            data = bytearray(target.read_bytes())
            data[0] ^= 0xFF
            target.write_bytes(bytes(data))
        return str(target)

    def files(self):
        return [filename for _, filename, _ in self.calls]


@pytest.fixture
def published(tmp_path, monkeypatch):
    """A synthetic release on a fake hub: (release, source .bin bytes, source .idx bytes, hub)."""
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(tmp_path / "source" / "corpus_document") as writer:
        for _ in range(60):
            writer.add_document(np.append(rng.integers(1, 50_000, rng.integers(20, 200)), 0))
    source_bin = (tmp_path / "source" / "corpus_document.bin").read_bytes()
    source_idx = (tmp_path / "source" / "corpus_document.idx").read_bytes()
    shards = [source_bin[i : i + SHARD_BYTES] for i in range(0, len(source_bin), SHARD_BYTES)]
    release = ShardedRelease(
        repo_id="someone/corpus_idxmaps",
        name="corpus_document",
        num_shards=len(shards),
        sha256=sha256(source_bin),
        index_sha256=sha256(source_idx),
        shard_sha256=tuple(sha256(shard) for shard in shards),
    )
    hub_dir = tmp_path / "hub"
    hub_dir.mkdir()
    for i, shard in enumerate(shards):
        (hub_dir / release.shard_file(i)).write_bytes(shard)
    (hub_dir / release.index_file).write_bytes(source_idx)
    hub = FakeHub(hub_dir)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.hf_hub_download)
    assert release.num_shards >= 5
    return release, source_bin, source_idx, hub


def assert_nothing_valid_left(dest, release):
    """No dataset at the published prefix, and the partial output is a dot-file, never the prefix itself."""
    with pytest.raises(FileNotFoundError):
        IndexedDataset(dest / release.name)
    assert not (dest / f"{release.name}.bin").exists()


# --- download and merge ---------------------------------------------------------------------------------------


def test_merge_rebuilds_the_published_bin_and_verifies_it(published, tmp_path):
    release, source_bin, source_idx, hub = published
    dest = tmp_path / "dest"
    prefix = download_release(release, dest, revision="v1")
    assert prefix == dest / release.name
    assert (dest / f"{release.name}.bin").read_bytes() == source_bin
    assert (dest / f"{release.name}.idx").read_bytes() == source_idx
    assert IndexedDataset(prefix).num_documents == 60
    assert hub.files() == [release.index_file] + [release.shard_file(i) for i in range(release.num_shards)]
    assert {revision for _, _, revision in hub.calls} == {"v1"}
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        [f"{release.name}.bin", f"{release.name}.idx", f".{release.name}.lock"]
    )  # shards, progress and partial files are gone
    download_release(release, dest, revision="v1")  # complete: returns without touching the hub
    assert len(hub.calls) == release.num_shards + 1


def test_keep_shards_leaves_the_downloads(published, tmp_path):
    release, source_bin, _, _ = published
    dest = tmp_path / "dest"
    download_release(release, dest, keep_shards=True)
    kept = b"".join((dest / "shards" / release.shard_file(i)).read_bytes() for i in range(release.num_shards))
    assert kept == source_bin == (dest / f"{release.name}.bin").read_bytes()


def test_merged_sha256_mismatch_is_refused_and_leaves_nothing_valid(published, tmp_path):
    release, _, _, _ = published
    wrong = dataclasses.replace(release, sha256="0" * 64, shard_sha256=())  # only the merged hash to go by
    dest = tmp_path / "dest"
    with pytest.raises(PileDownloadError, match="publishes 0000"):
        download_release(wrong, dest)
    assert_nothing_valid_left(dest, release)
    assert not (dest / f".{release.name}.partial.bin").exists()
    assert not (dest / f".{release.name}.progress.json").exists()  # the next run starts afresh


def test_corrupt_shard_is_named_deleted_and_fetched_again(published, tmp_path):
    release, source_bin, _, hub = published
    hub.corrupt_once.add(release.shard_file(2))
    dest = tmp_path / "dest"
    with pytest.raises(PileDownloadError, match=re.escape(release.shard_file(2))):
        download_release(release, dest)
    assert_nothing_valid_left(dest, release)
    assert not (dest / "shards" / release.shard_file(2)).exists()
    assert (dest / f".{release.name}.partial.bin").stat().st_size == 2 * SHARD_BYTES  # shards 0–1 stay merged
    hub.calls.clear()
    download_release(release, dest)
    assert hub.files() == [release.index_file] + [release.shard_file(i) for i in range(2, release.num_shards)]
    assert (dest / f"{release.name}.bin").read_bytes() == source_bin


def test_interrupted_download_resumes_at_the_first_unmerged_shard(published, tmp_path):
    release, source_bin, _, hub = published
    hub.fail_once.add(release.shard_file(3))
    dest = tmp_path / "dest"
    with pytest.raises(OSError, match="connection reset"):
        download_release(release, dest, revision="v1")
    assert_nothing_valid_left(dest, release)
    hub.calls.clear()
    download_release(release, dest, revision="v1")
    assert hub.files() == [release.index_file] + [release.shard_file(i) for i in range(3, release.num_shards)]
    assert (dest / f"{release.name}.bin").read_bytes() == source_bin


def test_merge_killed_mid_shard_is_cut_back_to_the_last_boundary(published, tmp_path):
    release, source_bin, _, hub = published
    hub.fail_once.add(release.shard_file(4))
    dest = tmp_path / "dest"
    with pytest.raises(OSError):
        download_release(release, dest)
    with open(dest / f".{release.name}.partial.bin", "ab") as partial:  # a kill while shard 4 was being appended
        partial.write(b"half a shard")
    download_release(release, dest)
    assert (dest / f"{release.name}.bin").read_bytes() == source_bin


def test_other_revision_restarts_the_merge(published, tmp_path):
    release, source_bin, _, hub = published
    hub.fail_once.add(release.shard_file(3))
    dest = tmp_path / "dest"
    with pytest.raises(OSError):
        download_release(release, dest, revision="v1")
    hub.calls.clear()
    download_release(release, dest, revision="v2")  # shards of v1 must not be mixed into v2's file
    assert hub.files() == [release.index_file] + [release.shard_file(i) for i in range(release.num_shards)]
    assert (dest / f"{release.name}.bin").read_bytes() == source_bin


def test_shards_that_disagree_with_the_index_are_refused(published, tmp_path):
    release, _, _, _ = published
    short = ShardedRelease(release.repo_id, release.name, release.num_shards - 1)  # no hashes; a shard missing
    dest = tmp_path / "dest"
    # A release of n-1 shards names its files "-of-(n-2)"; serve the first n-1 real shards under those names.
    hub_dir = published[3].root
    for i in range(short.num_shards):
        shutil.copyfile(hub_dir / release.shard_file(i), hub_dir / short.shard_file(i))
    with pytest.raises(PileDownloadError, match="disagree with the published index"):
        download_release(short, dest)
    assert_nothing_valid_left(dest, release)
    assert not (dest / f".{release.name}.partial.idx").exists()


def test_download_deduped_pile_asks_for_pythias_published_files(tmp_path, monkeypatch):
    requested = []

    def fake_download(repo_id, filename, *, repo_type=None, revision=None, local_dir=None):
        requested.append((repo_id, filename, revision))
        local_dir.mkdir(parents=True, exist_ok=True)
        (local_dir / filename).write_bytes(b"not the published index")
        return str(local_dir / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    with pytest.raises(PileDownloadError, match="a659c5a57fa772fb"):  # the index's published sha256
        download_deduped_pile(tmp_path, revision="main")
    assert requested == [("EleutherAI/pythia_deduped_pile_idxmaps", "pile_0.87_deduped_text_document.idx", "main")]
    assert DEDUPED_PILE.shard_file(0) == "pile_0.87_deduped_text_document-00000-of-00082.bin"
    assert DEDUPED_PILE.shard_file(82) == "pile_0.87_deduped_text_document-00082-of-00082.bin"
    assert len(DEDUPED_PILE.shard_sha256) == 83 and DEDUPED_PILE.sha256.startswith("0cd548ef")
    assert PRESHUFFLED_DEDUPED_PILE.shard_file(20) == "document-00020-of-00020.bin"
    assert PRESHUFFLED_DEDUPED_PILE.index_file == "document.idx"


def test_command_line_downloads_and_prints_the_prefix(published, tmp_path, monkeypatch, capsys):
    release, source_bin, _, _ = published
    monkeypatch.setitem(pythia_pile.RELEASES, "preshuffled", release)
    prefix = pythia_pile.main(["--dest", str(tmp_path / "cli"), "--release", "preshuffled"])
    assert capsys.readouterr().out.strip() == str(prefix)
    assert (tmp_path / "cli" / f"{release.name}.bin").read_bytes() == source_bin


def test_unreachable_hub_names_the_way_out(tmp_path, monkeypatch, capsys):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, filename, **kwargs):
        raise LocalEntryNotFoundError("offline mode is enabled")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(SystemExit, match=r"HF_HUB_OFFLINE is set\. Run this on a machine with internet"):
        pythia_pile.main(["--dest", str(tmp_path)])
    assert not (tmp_path / f"{DEDUPED_PILE.name}.bin").exists()


@pytest.mark.slow  # a fresh interpreter importing torch: 14 s on the shared 2-core machine
def test_module_command_runs_without_warnings():
    """`python -m memoryformer.data.pythia_pile` must not find itself pre-imported by its package (runpy warns)."""
    result = subprocess.run(
        [sys.executable, "-W", "error", "-m", "memoryformer.data.pythia_pile", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(pythia_pile.__file__).parents[2])},
    )
    assert result.returncode == 0, result.stderr
    assert "--release {deduped,preshuffled}" in result.stdout


# --- Pythia's order -------------------------------------------------------------------------------------------


def write_preshuffled(prefix, num_sequences, sequence_tokens):
    """Sequence i starts with the token i (the sample's identity), then counts on."""
    with IndexedDatasetWriter(prefix) as writer:
        for i in range(num_sequences):
            writer.add_document((i + np.arange(sequence_tokens)) % 65_536)
    return IndexedDataset(prefix)


@pytest.fixture(scope="module")
def pythia_geometry(tmp_path_factory):
    """Three and a half of Pythia's steps: 3584 sequences of 2049 tokens."""
    return write_preshuffled(tmp_path_factory.mktemp("preshuffled") / "document", 3584, 2049)


def test_step_reads_exactly_pythias_batch_across_ranks(pythia_geometry):
    samples = PythiaOrderSamples(pythia_geometry, seq_len=2048)
    assert len(samples) == 3584
    for step in range(3):
        per_rank = [sample_indices(step, 1024, 128, rank, 2) for rank in range(2)]
        # micro-step j of rank r is micro-batch j·2 + r of the step: interleave to get the step's order back
        step_order = [i for j in range(4) for rank in range(2) for i in per_rank[rank][j]]
        batch = samples.batch(step_order)
        assert batch.shape == (1024, 2049)
        assert batch[:, 0].tolist() == list(range(step * 1024, (step + 1) * 1024))
        i = step * 1024 + 517
        assert torch.equal(samples[i], torch.from_numpy(pythia_geometry[i].astype(np.int64)))


def test_resume_from_a_step_reads_the_same_samples(pythia_geometry):
    straight = PythiaOrderSamples(pythia_geometry, seq_len=2048)
    resumed = pickle.loads(pickle.dumps(straight))  # a fresh process (DataLoader workers get it this way)
    for rank in range(2):
        for micro in sample_indices(2, 1024, 256, rank, 2):
            assert torch.equal(resumed.batch(micro), straight.batch(micro))
    assert resumed.window(2 * 1024) == 2048


def test_pythia_order_refuses_other_lengths_and_past_the_end(tmp_path, pythia_geometry):
    with pytest.raises(ValueError, match=r"train\.seq_len=2048"):
        PythiaOrderSamples(pythia_geometry, seq_len=128)
    ragged = IndexedDatasetWriter(tmp_path / "ragged")
    for length in (9, 9, 8, 9):
        ragged.add_document(np.arange(length))
    with pytest.raises(ValueError, match="sequence 2 has 8 tokens"):
        PythiaOrderSamples(ragged.close(), seq_len=8)
    samples = PythiaOrderSamples(pythia_geometry, seq_len=2048, sequences=range(1024))
    with pytest.raises(IndexError, match=r"train\.max_steps or set data\.valid_prefix .* 2560 held-out"):
        samples[1024]  # no silent second epoch, nor a step into the validation tail


def test_build_datasets_pythia_order_holds_out_the_tail(tmp_path):
    write_preshuffled(tmp_path / "document", 40, 9)
    cfg = {"name": "tiny_order", "order": "pythia", "train_prefix": str(tmp_path / "document"), "valid_fraction": 0.25}
    train, valid = build_datasets(cfg, seq_len=8, seed=0)
    assert isinstance(train, PythiaOrderSamples) and (len(train), len(valid)) == (30, 10)
    assert train[29][0].item() == 29 and valid[0][0].item() == 30
    write_preshuffled(tmp_path / "held_out", 5, 17)
    train, valid = build_datasets({**cfg, "valid_prefix": str(tmp_path / "held_out")}, seq_len=8, seed=0)
    assert len(train) == 40 and isinstance(valid, PackedSamples)
    with pytest.raises(ValueError, match="order must be packed or pythia"):
        build_datasets({**cfg, "order": "random"}, seq_len=8, seed=0)
    with pytest.raises(FileNotFoundError, match="--release preshuffled"):
        build_datasets({**cfg, "train_prefix": str(tmp_path / "absent")}, seq_len=8, seed=0)


def test_pile_pythia_order_config_composes(tmp_path):
    cfg = compose_config(["data=pile_pythia_order"])
    assert cfg.data.order == "pythia"
    assert cfg.data.train_prefix.endswith("data/pythia_pile_preshuffled/document")
    write_preshuffled(tmp_path / "document", 20, 2049)
    cfg = compose_config(["data=pile_pythia_order", f"data.train_prefix={tmp_path / 'document'}", "train.seq_len=2048"])
    train, valid = build_datasets(cfg.data, cfg.train.seq_len, cfg.seed)
    assert (len(train), len(valid)) == (19, 1) and train[3][0].item() == 3
    assert compose_config(["data=pile"]).data.order == "packed"


@pytest.mark.slow  # a real (tiny) training run: 15 s on the shared 2-core machine
def test_trainer_reads_pythias_sequences_step_by_step(shared_data, tmp_path, monkeypatch):
    """A tiny run on data=pile_pythia_order: step s trains on sequences [s·G, (s+1)·G), in order, and nothing else."""
    from memoryformer.train import pretrain

    write_preshuffled(tmp_path / "document", 64, 9)
    read = []
    original = PythiaOrderSamples.__getitem__

    def spy(self, i):
        read.append((self.sequences.start, int(i)))
        return original(self, i)

    monkeypatch.setattr(PythiaOrderSamples, "__getitem__", spy)
    overrides = [
        "data=pile_pythia_order",
        f"data.train_prefix={tmp_path / 'document'}",
        "data.valid_fraction=0.25",  # sequences 48–63
        "model=mf-nano",
        "model.num_hidden_layers=1",
        "model.hidden_size=64",
        "model.num_attention_heads=2",
        "model.tau=4",
        f"train.output_dir={tmp_path / 'runs'}",
        "train.seq_len=8",
        "train.micro_batch=4",
        "train.global_batch=8",
        "train.max_steps=2",
        "train.eval_every=2",
        "train.eval_batches=1",
        "train.checkpoint_every=2",
        "train.sample_tokens=0",
        "train.tracker=none",
        "train.eval_at_end=false",
    ]
    pretrain(compose_config(overrides))
    assert [i for start, i in read if start == 0] == list(range(16))  # 2 steps × 8, in Pythia's order
    assert sorted({i + start for start, i in read if start != 0}) == list(range(48, 52))  # validation: the tail
