"""Test-wide settings: offline, deterministic, Triton in interpreter mode."""

import os

# Must be set before any @triton.jit function is defined (i.e. before memoryformer.kernels.triton is imported).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from memoryformer.paths import shared_data_dir


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)


@pytest.fixture(scope="session")
def shared_data():
    """The shared data directory; tests that need it skip, saying why, when it is absent."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path} (set MEMORYFORMER_DATA to its location)")
    return path


@pytest.fixture(autouse=True)
def _isolated_hf_home(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's Hugging Face cache."""
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))


@pytest.fixture(scope="session")
def tiny_corpus(shared_data, tmp_path_factory):
    """A few hundred KB of the shared pretraining text and held-out text, as small files of their own."""
    root = tmp_path_factory.mktemp("tiny_corpus")
    train = root / "train.jsonl"
    with (shared_data / "pretrain/gutenberg/gutenberg-00000.jsonl").open() as src:
        import json

        text = json.loads(src.readline())["text"]
    chunk = 20_000
    train.write_text("".join(json.dumps({"text": text[i : i + chunk]}) + "\n" for i in range(0, 400_000, chunk)))
    valid = root / "valid.txt"
    valid.write_text((shared_data / "heldout/wikitext-2-raw-v1/test.txt").read_text()[:60_000])
    return {"train": train, "valid": valid, "root": root}


@pytest.fixture
def tiny_train_overrides(tiny_corpus, tmp_path):
    """Hydra overrides for a seconds-long training run of a narrowed 2-layer mf-nano on the tiny corpus."""
    return [
        "model=mf-nano",
        "model.num_hidden_layers=2",
        "model.hidden_size=64",
        "model.num_attention_heads=2",
        "model.tau=4",
        "data.name=tiny",
        f"data.train_files=[{tiny_corpus['train']}]",
        f"data.valid_files=[{tiny_corpus['valid']}]",
        "data.txt_document_start=null",
        f"data.prepared_dir={tiny_corpus['root'] / 'prepared'}",
        "data.num_workers=1",
        f"train.output_dir={tmp_path / 'runs'}",
        "train.seq_len=32",
        "train.micro_batch=4",
        "train.global_batch=8",
        "train.max_steps=6",
        "train.eval_every=3",
        "train.eval_batches=2",
        "train.checkpoint_every=3",
        "train.log_every=1",
        "train.sample_tokens=4",
        "train.tracker=none",
        "train.eval_at_end=false",
    ]
