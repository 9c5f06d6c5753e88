"""Bucket usage (the paper's Figure 4): exact counts for known codes, statistics by their definitions, and the
per-block counts, report and figure of a real (tiny) MemoryFormer."""

import csv
import json
import math
from collections import Counter

import pytest
import torch

from memoryformer.diagnostics import (
    block_bucket_usage,
    block_memory_layers,
    bucket_counts,
    layer_bucket_counts,
    usage_statistics,
    write_bucket_usage,
)
from memoryformer.layers import MemoryLayer, hash_chunks
from memoryformer.models import build_model


def inputs_with_codes(codes, tau, generator):
    """Tokens [N, K·τ] whose chunk k hashes to codes[n][k]: bit 1 (MSB first) ↔ a value ≥ 0, random magnitudes."""
    x = torch.empty(len(codes), len(codes[0]) * tau, dtype=torch.float64)
    for n, token_codes in enumerate(codes):
        for k, code in enumerate(token_codes):
            for i in range(tau):
                bit = (code >> (tau - 1 - i)) & 1
                magnitude = torch.rand((), generator=generator, dtype=torch.float64) * 2 + 0.05
                x[n, k * tau + i] = magnitude if bit else -magnitude
    return x


@pytest.mark.parametrize("tau", [2, 3])
def test_layer_counts_are_exact_for_known_codes(tau):
    generator = torch.Generator().manual_seed(0)
    num_chunks, buckets = 3, 2**tau
    codes = torch.randint(0, buckets, (50, num_chunks), generator=generator).tolist()
    codes += [[buckets - 1] * num_chunks] * 7  # one bucket per table retrieved far more often
    layer = MemoryLayer(num_chunks * tau, 5, tau)
    counts = layer_bucket_counts(layer, inputs_with_codes(codes, tau, generator))
    expected = torch.zeros(num_chunks, buckets, dtype=torch.int64)
    for k in range(num_chunks):
        for code, count in Counter(token[k] for token in codes).items():
            expected[k, code] = count
    assert torch.equal(counts, expected)
    assert counts.sum(1).tolist() == [len(codes)] * num_chunks  # every token retrieves one bucket per table


def test_zero_counts_as_a_one_bit():
    """Spec §1 golden D: z = [0.0, −1.0] hashes to code 2 (bit 1 for z ≥ 0, MSB first)."""
    layer = MemoryLayer(2, 1, 2)
    assert layer_bucket_counts(layer, torch.tensor([[0.0, -1.0]])).tolist() == [[0, 0, 1, 0]]


def test_bucket_counts_reject_rows_outside_the_tables():
    with pytest.raises(ValueError, match="rows must lie in"):
        bucket_counts(torch.tensor([[0, 9]]), num_chunks=2, tau=2)


def test_usage_statistics_match_their_definitions():
    counts = torch.tensor([[5, 5, 5, 5], [8, 0, 0, 0], [2, 1, 1, 0]])
    stats = usage_statistics(counts)
    # uniform: H = log 4; one bucket: H = 0; p = (1/2, 1/4, 1/4, 0): H = 1.5 bits = 1.5·log 2, / log 4 = 0.75
    assert stats["normalised_entropy"] == pytest.approx([1.0, 0.0, 0.75], abs=1e-12)
    assert stats["never_used_fraction"] == [0.0, 0.75, 0.25]
    assert stats["max_over_mean"] == pytest.approx([1.0, 4.0, 2.0])  # max count / (total / buckets)
    p = counts[2].double() / 4
    by_hand = -sum(q * math.log(q) for q in p.tolist() if q > 0) / math.log(4)
    assert stats["normalised_entropy"][2] == pytest.approx(by_hand)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model("mf-nano", num_hidden_layers=2, vocab_size=512, lookup_backend="reference")


def test_block_usage_counts_what_the_layers_receive(tiny_model):
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 512, (3, 16), generator=generator) for _ in range(2)]
    usage = block_bucket_usage(tiny_model, batches, layer=0)
    assert usage.tokens == 96 and list(usage.counts) == ["Q/K/V", "ML1", "ML2"]
    config = tiny_model.config
    shapes = {name: tuple(counts.shape) for name, counts in usage.counts.items()}
    tau, e, k = config.tau, config.expand_bits, config.num_chunks
    assert shapes == {"Q/K/V": (k, 2**tau), "ML1": (k, 2**tau), "ML2": (k, 2 ** (tau + e))}
    for counts in usage.counts.values():
        assert counts.sum(1).tolist() == [96] * k  # each token retrieves exactly one bucket of every table
    # Q/K/V by hand: block 0's shared hash reads RMSNorm(embeddings)
    block = tiny_model.model.layers[0]
    with torch.no_grad():
        hidden = block.attention_norm(tiny_model.model.embed_tokens(torch.cat(batches)))
    rows, _ = hash_chunks(hidden.reshape(-1, config.hidden_size), tau)
    assert torch.equal(usage.counts["Q/K/V"], bucket_counts(rows, k, tau))
    assert all(not layer._forward_pre_hooks for layer in block_memory_layers(tiny_model, 0).values())  # removed


def test_block_usage_rejects_bad_input(tiny_model):
    with pytest.raises(ValueError, match="layer must be in"):
        block_bucket_usage(tiny_model, [torch.zeros(1, 4, dtype=torch.int64)], layer=2)
    with pytest.raises(ValueError, match="no tokens"):
        block_bucket_usage(tiny_model, [], layer=0)
    with pytest.raises(TypeError, match="not a MemoryFormer"):
        block_bucket_usage(torch.nn.Linear(2, 2), [torch.zeros(1, 4, dtype=torch.int64)])


def test_report_and_figure_are_written(tiny_model, tmp_path):
    tiny_model.train()
    usage = block_bucket_usage(tiny_model, [torch.arange(64).reshape(2, 32)], layer=1)
    assert tiny_model.training  # restored
    paths = write_bucket_usage(usage, tmp_path, table=3)
    report = json.loads(paths["json"].read_text())
    assert report["layer"] == 1 and report["tokens"] == 64 and "share one hash" in report["note"]
    qkv = report["projections"]["Q/K/V"]
    assert qkv["summary"]["mean_never_used_fraction"] == pytest.approx(
        sum(qkv["per_table"]["never_used_fraction"]) / qkv["tables"]
    )
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == sum(p["tables"] for p in report["projections"].values())
    assert torch.equal(torch.load(paths["counts"])["ML2"], usage.counts["ML2"])
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
