"""Data pipeline (spec §4, "Data"): the GPT-NeoX-20B tokenizer, Megatron/GPT-NeoX indexed datasets (the format of
Pythia's pre-tokenized Pile), corpus preparation, packed training samples with an exact resume position, and
Pythia's Pile downloaded from the hub and replayed in Pythia's own order."""

from memoryformer.data.build import build_datasets, corpus_key, prepare_configured_corpus
from memoryformer.data.indexed_dataset import (
    DTYPE_CODES,
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    token_dtype,
)
from memoryformer.data.prepare import (
    PrepareStats,
    expand_sources,
    in_validation_split,
    prepare_corpus,
    read_documents,
    tokenize_documents,
)
from memoryformer.data.samples import PackedSamples, sample_indices
from memoryformer.data.tokenizer import load_tokenizer, tokenizer_fingerprint

__all__ = [
    "DTYPE_CODES",
    "IndexedDataset",
    "IndexedDatasetError",
    "IndexedDatasetWriter",
    "PackedSamples",
    "PrepareStats",
    "PythiaOrderSamples",
    "build_datasets",
    "corpus_key",
    "download_deduped_pile",
    "download_preshuffled_pile",
    "expand_sources",
    "in_validation_split",
    "load_tokenizer",
    "prepare_configured_corpus",
    "prepare_corpus",
    "read_documents",
    "sample_indices",
    "token_dtype",
    "tokenize_documents",
    "tokenizer_fingerprint",
]

_PYTHIA_PILE_API = {"PythiaOrderSamples", "download_deduped_pile", "download_preshuffled_pile"}


def __getattr__(name: str):
    # Loaded on first use, so that `python -m memoryformer.data.pythia_pile` (its download command) does not find
    # its own module already imported by this package (runpy would warn and run it twice).
    if name in _PYTHIA_PILE_API:
        from memoryformer.data import pythia_pile

        return getattr(pythia_pile, name)
    raise AttributeError(f"module 'memoryformer.data' has no attribute {name!r}")
