"""FLOPs and size accounting (spec §4–5), the measured FLOP count, the `make flops` report and its writers."""

import csv
import runpy

import pytest
import torch
from transformers import GPTNeoXConfig
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXLayer

from memoryformer.config import compose_config
from memoryformer.flops import (
    GIGA,
    PAPER_TABLE1_FLOPS,
    BlockFlops,
    block_exact_macs,
    block_flops,
    figure1_rows,
    measured_block_flops,
    memoryformer_block_exact_macs,
    memoryformer_block_flops,
    model_flops_per_token,
    model_size_rows,
    plot_figure1,
    table1_flops_rows,
    transformer_block_flops,
)
from memoryformer.layers import MemoryLayer
from memoryformer.paths import PROJECT_ROOT

S = 2048
TABLE1_SHAPES = {"mf-tiny": (512, 64), "mf-small": (768, 96), "mf-base": (1024, 128)}  # d, K


# --- the formulas --------------------------------------------------------------------------------------------


def test_transformer_block_is_12sd2_plus_2s2d():
    s, d = 3, 5
    assert transformer_block_flops(d, s) == BlockFlops(12 * s * d * d, 12 * s * d * d + 2 * s * s * d)
    # a non-4d FFN: 4sd² for QKVO + 2sdf for the two FFN matrices
    assert transformer_block_flops(d, s, intermediate_size=7).without_attention == 4 * s * d * d + 2 * s * d * 7


def test_memoryformer_block_paper_convention_is_6ksd():
    s, d, k = 3, 16, 2
    assert memoryformer_block_flops(d, s, k) == BlockFlops(6 * k * s * d, 6 * k * s * d + 2 * s * s * d)


@pytest.mark.parametrize(("name", "expected_g"), [("mf-tiny", 0.352), ("mf-small", 0.793), ("mf-base", 1.409)])
def test_exact_macs_match_spec(name, expected_g):
    d, k = TABLE1_SHAPES[name]
    macs = memoryformer_block_exact_macs(d, S, k, tau=8, expand_bits=2)
    assert macs == S * (4 * k * d + 10 * k * k)
    assert round(macs / GIGA, 3) == expected_g


def test_bad_shapes_fail_early():
    with pytest.raises(ValueError, match="d = K·tau"):
        memoryformer_block_exact_macs(512, S, 60, tau=8, expand_bits=2)
    with pytest.raises(ValueError, match="seq_len must be a positive integer"):
        transformer_block_flops(512, 0)
    with pytest.raises(ValueError, match="model_type"):
        block_flops(GPTNeoXConfig().to_dict())  # a dict has no model_type attribute


# --- Table 1 -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def table1_configs():
    from memoryformer.models import model_config

    return {name: model_config(name) for name in PAPER_TABLE1_FLOPS}


def test_table1_reproduces_every_cell_but_mf_small(table1_configs):
    rows = {row["model"]: row for row in table1_flops_rows(table1_configs)}
    assert list(rows) == list(PAPER_TABLE1_FLOPS)
    for name, row in rows.items():
        if name == "mf-small":
            continue
        assert row["matches"] and row["flag"] == "", row
        assert round(row["ours_without_attention_G"], 1) == row["paper_without_attention_G"]
        assert round(row["ours_total_G"], 1) == row["paper_total_G"]
    small = rows["mf-small"]
    assert not small["matches"]
    assert small["ours_without_attention_G"] == pytest.approx(0.906, abs=5e-4)
    assert small["ours_total_G"] == pytest.approx(7.348, abs=5e-4)
    assert "1.0/7.4" in small["flag"] and "0.906/7.348" in small["flag"]


def test_table1_unit_is_1e9_not_2_pow_30(table1_configs):
    # Why G = 1e9: with 2^30 the Pythia-70M cells would read 6.0/10.0, not the paper's 6.4/10.7.
    ours = block_flops(table1_configs["pythia-70m"], S)
    assert (round(ours.without_attention / 2**30, 1), round(ours.total / 2**30, 1)) == (6.0, 10.0)


def test_exact_count_of_registered_models(table1_configs):
    exact = block_exact_macs(table1_configs["mf-tiny"], S)
    assert exact.without_attention == memoryformer_block_exact_macs(512, S, 64, 8, 2)
    assert exact.total == exact.without_attention + 2 * S * S * 512
    # for a Transformer every matmul is in the paper's count already
    assert block_exact_macs(table1_configs["pythia-70m"], S) == block_flops(table1_configs["pythia-70m"], S)


def test_model_flops_per_token_is_twice_the_macs(table1_configs):
    config = table1_configs["pythia-70m"]
    d, layers, vocab = 512, 6, config.vocab_size
    assert model_flops_per_token(config, S) == 2 * (layers * (12 * d * d + 2 * S * d) + d * vocab)
    tiny = table1_configs["mf-tiny"]
    assert model_flops_per_token(tiny, S) == 2 * (6 * (4 * 64 * 512 + 10 * 64 * 64 + 2 * S * 512) + 512 * vocab)


# --- sizes ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def size_rows():
    return {row["model"]: row for row in model_size_rows(["pythia-70m", "pythia-410m", "mf-tiny", "mf-base"])}


def test_size_table_parameters_match_spec(size_rows):
    assert size_rows["pythia-70m"]["params"] == 70_426_624
    assert size_rows["pythia-410m"]["params"] == 405_334_016
    assert size_rows["mf-tiny"]["params"] == pytest.approx(467e6, rel=5e-3)
    assert size_rows["mf-base"]["params"] == pytest.approx(6.75e9, rel=5e-3)
    assert size_rows["pythia-70m"]["tables_fp16_GB"] == 0 and size_rows["pythia-70m"]["K"] is None


@pytest.mark.parametrize("name", ["mf-tiny", "mf-base"])
def test_table_bytes_equal_the_models_tables(size_rows, name):
    from memoryformer.models import build_model

    with torch.device("meta"):
        model = build_model(name)
    tables = sum(m.tables.numel() for m in model.modules() if isinstance(m, MemoryLayer))
    assert size_rows[name]["tables_fp16_GB"] * GIGA == pytest.approx(2 * tables, rel=1e-12)
    assert size_rows[name]["tables_fp32_GB"] * GIGA == pytest.approx(4 * tables, rel=1e-12)
    # the rest of the parameters are embedding, head, biases and norms: small beside the tables
    assert 0 < sum(p.numel() for p in model.parameters()) - tables < 0.25 * tables


# --- measured with torch's FlopCounterMode -------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_measured_pythia_block_equals_analytic(attn_implementation):
    d, s = 64, 16
    config = GPTNeoXConfig(hidden_size=d, num_attention_heads=4, intermediate_size=4 * d, rotary_pct=0.25)
    config._attn_implementation = attn_implementation
    measured = measured_block_flops(GPTNeoXLayer(config, layer_idx=0), d, s)
    assert measured["flops"] == 2 * transformer_block_flops(d, s).total
    assert measured["macs"] == transformer_block_flops(d, s).total
    assert measured["by_operator"]["aten.addmm"] == 2 * 12 * s * d * d  # the four Linear layers


@pytest.mark.parametrize("backend", ["reference", "embedding_bag"])
def test_measured_memoryformer_block(backend):
    from memoryformer.models import MemoryFormerConfig
    from memoryformer.models.modeling_memoryformer import MemoryFormerBlock

    d, s, tau, k = 64, 16, 8, 8
    config = MemoryFormerConfig(hidden_size=d, num_attention_heads=4, tau=tau, lookup_backend=backend)
    measured = measured_block_flops(MemoryFormerBlock(config, layer_idx=0), d, s)
    attention = 2 * s * s * d
    if backend == "reference":  # the lookups are an einsum (bmm): the counter sees every weighted sum
        assert measured["macs"] == memoryformer_block_exact_macs(d, s, k, tau, expand_bits=2) + attention
    else:  # gathers are not matmuls: only QKᵀ and AV are counted
        assert measured["macs"] == attention
    assert measured["flops"] == 2 * measured["macs"]


# --- Figure 1 and the `make flops` report --------------------------------------------------------------------


def assert_nontrivial_png(path):
    from matplotlib.image import imread

    image = imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 300
    assert image.reshape(-1, image.shape[-1]).std(axis=0).max() > 0.05  # not a blank canvas


def test_figure1_memoryformer_is_cheaper_and_the_png_reads(tmp_path):
    rows = figure1_rows([256, 1024, 4096], [1024, 2048], tau=8)
    assert len(rows) == 6
    for row in rows:
        s, d = row["seq_len"], row["d"]
        assert row["transformer_G"] * GIGA == 12 * s * d * d + 2 * s * s * d
        assert row["memoryformer_G"] * GIGA == 6 * (d // 8) * s * d + 2 * s * s * d
        assert row["memoryformer_G"] < row["transformer_G"]
    assert_nontrivial_png(plot_figure1(rows, tmp_path / "f.png"))
    with pytest.raises(ValueError, match="multiple of tau"):
        figure1_rows([100], [1024], tau=8)


def test_make_flops_end_to_end(tmp_path, capsys):
    # The script's own main, called in-process with the composed config (Hydra passes a given cfg through).
    main = runpy.run_path(str(PROJECT_ROOT / "scripts" / "flops.py"))["main"]
    out = tmp_path / "flops"
    main(compose_config([f"output_dir={out}", "models=[pythia-70m,mf-tiny]"], config_name="flops"))
    assert str(out / "figure1_flops.png") in capsys.readouterr().out
    names = ["table1_flops.md", "table1_flops.csv", "model_sizes.md", "model_sizes.csv", "figure1_flops.csv"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "figure1_flops.png"])
    with (out / "table1_flops.csv").open(newline="") as f:
        table1 = {row["model"]: row for row in csv.DictReader(f)}
    assert [name for name, row in table1.items() if row["matches"] != "True"] == ["mf-small"]
    assert "**no**" in (out / "table1_flops.md").read_text()
    with (out / "model_sizes.csv").open(newline="") as f:
        sizes = {row["model"]: row for row in csv.DictReader(f)}
    assert list(sizes) == ["pythia-70m", "mf-tiny"]
    assert int(sizes["pythia-70m"]["params"]) == 70_426_624
    assert "70,426,624" in (out / "model_sizes.md").read_text()
    assert_nontrivial_png(out / "figure1_flops.png")
