"""FLOPs and size accounting: the paper's convention, the exact MAC count, a measured count, and the report.

Spec §5. "FLOPs" in the paper count **multiply-accumulates** (MACs); this module does too unless a name says
otherwise (:func:`model_flops_per_token` and :func:`measured_block_flops` report FLOPs = 2 × MACs).

One block at sequence length s, width d (K chunks of τ bits, e expanding bits):

- Transformer (GPT-NeoX/Pythia): 12sd² (QKV 3d², output 1d², FFN 8d²) + 2s²d (QKᵀ and AV).
- MemoryFormer, the paper's approximation: 6Ksd + 2s²d.
- MemoryFormer, exact weighted sums: s·(4Kd + (τ+e)K²) + 2s²d — Q, K, V and ML2 each sum K rows of width d
  (4Kd), ML1 sums K rows of width K(τ+e). Hashing, norms, softmax and rotary are excluded (as in the paper).

Attention is counted over the full s×s score matrix (no halving for the causal mask), as the paper does.
Table 1's unit is G = 10⁹ at 1 decimal: with G = 2³⁰ Pythia-70M would read 6.0/10.0 instead of 6.4/10.7, while
10⁹ reproduces every cell but MF-small's (the formula gives 0.906/7.348, the paper prints 1.0/7.4; we report
ours and flag the paper's). At d = 768 the paper's two cells would need K ≈ 101–106 (τ ≈ 7.3), not K = d/8 = 96.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from memoryformer.layers import block_table_bytes, table_bytes
from memoryformer.reporting import atomic_path, markdown_table, write_csv_atomic, write_text_atomic

GIGA = 1e9  # Table 1's "G" (see the module docstring for why not 2**30)
PAPER_SEQ_LEN = 2048

# The paper's Table 1, FLOPs per block at s = 2048 in G: (without attention, total).
PAPER_TABLE1_FLOPS: dict[str, tuple[float, float]] = {
    "pythia-70m": (6.4, 10.7),
    "mf-tiny": (0.4, 4.7),
    "pythia-160m": (14.5, 20.9),
    "mf-small": (1.0, 7.4),
    "pythia-410m": (25.8, 34.4),
    "mf-base": (1.6, 10.2),
}

MODEL_TYPES = ("gpt_neox", "memoryformer")


class BlockFlops(NamedTuple):
    """Multiply-accumulates of one block: without the s² attention terms, and in total."""

    without_attention: int
    total: int


# --- the formulas ------------------------------------------------------------------------------------------


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def attention_macs(d: int, seq_len: int) -> int:
    """2s²d: QKᵀ (s·s·d) and AV (s·s·d), summed over heads, full s×s matrix."""
    _check_positive(d=d, seq_len=seq_len)
    return 2 * seq_len * seq_len * d


def transformer_block_flops(d: int, seq_len: int, intermediate_size: int | None = None) -> BlockFlops:
    """12sd² / 12sd² + 2s²d for a 4d FFN; with another FFN width f, 4sd² + 2sdf (+ 2s²d)."""
    f = 4 * d if intermediate_size is None else intermediate_size
    _check_positive(d=d, seq_len=seq_len, intermediate_size=f)
    dense = 4 * seq_len * d * d + 2 * seq_len * d * f
    return BlockFlops(dense, dense + attention_macs(d, seq_len))


def memoryformer_block_flops(d: int, seq_len: int, num_chunks: int) -> BlockFlops:
    """The paper's approximation 6Ksd / 6Ksd + 2s²d."""
    _check_positive(d=d, seq_len=seq_len, num_chunks=num_chunks)
    lookups = 6 * num_chunks * seq_len * d
    return BlockFlops(lookups, lookups + attention_macs(d, seq_len))


def memoryformer_block_exact_macs(d: int, seq_len: int, num_chunks: int, tau: int, expand_bits: int) -> int:
    """s·(4Kd + (τ+e)K²): the weighted sums of Q, K, V, ML1 and ML2, without attention, hashing or norms."""
    _check_positive(d=d, seq_len=seq_len, num_chunks=num_chunks, tau=tau)
    if not isinstance(expand_bits, int) or expand_bits < 0:
        raise ValueError(f"expand_bits must be a non-negative integer, got {expand_bits!r}")
    if num_chunks * tau != d:
        raise ValueError(f"a MemoryFormer needs d = K·tau, got d={d}, K={num_chunks}, tau={tau}")
    return seq_len * (4 * num_chunks * d + (tau + expand_bits) * num_chunks**2)


# --- from a model config -----------------------------------------------------------------------------------


def _model_type(config: Any) -> str:
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"cannot count FLOPs of a config with model_type={model_type!r}; pass a MemoryFormerConfig "
            f"(model_type 'memoryformer') or a transformers GPTNeoXConfig (model_type 'gpt_neox')"
        )
    return model_type


def block_flops(config: Any, seq_len: int = PAPER_SEQ_LEN) -> BlockFlops:
    """MACs of one block of ``config`` in the paper's convention (spec §5)."""
    if _model_type(config) == "gpt_neox":
        return transformer_block_flops(config.hidden_size, seq_len, config.intermediate_size)
    return memoryformer_block_flops(config.hidden_size, seq_len, config.num_chunks)


def block_exact_macs(config: Any, seq_len: int = PAPER_SEQ_LEN) -> BlockFlops:
    """MACs of one block of ``config`` counting every weighted sum exactly (for a Transformer, the paper's)."""
    if _model_type(config) == "gpt_neox":
        return block_flops(config, seq_len)
    d = config.hidden_size
    lookups = memoryformer_block_exact_macs(d, seq_len, config.num_chunks, config.tau, config.expand_bits)
    return BlockFlops(lookups, lookups + attention_macs(d, seq_len))


def model_flops_per_token(config: Any, seq_len: int = PAPER_SEQ_LEN) -> int:
    """Forward FLOPs per token of the whole model, for MFU: 2 × (layers × exact block MACs / s + d·V).

    FLOPs = 2 × MACs here (unlike the paper's tables). The embedding is a gather (0 FLOPs); the LM head is d·V
    MACs; norms, softmax and hashing are left out. Attention counts the full s×s matrix, i.e. 2sd MACs per token
    per layer (PaLM's convention). Forward + backward is 3× this.
    """
    d = config.hidden_size
    per_token_block_macs = block_exact_macs(config, seq_len).total // seq_len  # every term carries a factor s
    return 2 * (config.num_hidden_layers * per_token_block_macs + d * config.vocab_size)


def model_table_bytes(config: Any, bytes_per_value: int = 2) -> int:
    """Bytes of all Memory-Layer tables of a model (Q, K, V and the Memory Block per layer; biases excluded)."""
    if _model_type(config) == "gpt_neox":
        return 0
    d, tau = config.hidden_size, config.tau
    per_layer = table_bytes(d, 3 * d, tau, bytes_per_value) + block_table_bytes(
        d, tau, config.expand_bits, bytes_per_value
    )
    return config.num_hidden_layers * per_layer


# --- measured with torch's FLOP counter --------------------------------------------------------------------


def _rotary_inputs(module: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """The rotary cos/sin a known block type takes as ``position_embeddings`` (positions 0…s−1)."""
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXLayer, GPTNeoXRotaryEmbedding

    from memoryformer.layers.attention import RotaryEmbedding
    from memoryformer.models.modeling_memoryformer import MemoryFormerBlock

    positions = torch.arange(x.shape[1], device=x.device)[None]
    if isinstance(module, GPTNeoXLayer):
        rotary = GPTNeoXRotaryEmbedding(module.attention.config).to(x.device)
    elif isinstance(module, MemoryFormerBlock):
        rotary = RotaryEmbedding(module.config.rotary_ndims, module.config.rotary_emb_base)
    else:
        return {}
    return {"position_embeddings": rotary(x, positions)}


def measured_block_flops(module: nn.Module, d: int, seq_len: int, batch_size: int = 1) -> dict[str, Any]:
    """Run ``module`` on a random [batch, s, d] input under ``FlopCounterMode``; FLOPs = 2 × MACs.

    What is covered: matrix products only (mm, addmm, bmm, einsum lowered to bmm) — a bias add, norms, softmax,
    rotary, hashing and gathers (``index``, ``embedding_bag``, the fused CPU/Triton lookups) count 0. So a
    Pythia block measures 2 × (12sd² + 2s²d) × batch; a MemoryFormer block measures its attention 2 × 2s²d plus,
    only with the ``reference`` lookup backend (an einsum), its weighted sums 2 × s·(4Kd + (τ+e)K²).
    SDPA runs on its math backend here: torch's fused CPU attention kernel is not registered with the counter
    and would silently count 0; the math path counts the full s×s products.

    ``module`` is a transformers ``GPTNeoXLayer`` or a ``MemoryFormerBlock`` (rotary cos/sin are built from its
    config), or any block callable as ``module(x)``. Returns ``{"flops", "macs", "by_operator"}``.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    _check_positive(d=d, seq_len=seq_len, batch_size=batch_size)
    param = next(module.parameters())
    x = torch.randn(batch_size, seq_len, d, device=param.device, dtype=param.dtype)
    counter = FlopCounterMode(display=False)
    with torch.no_grad():
        kwargs = _rotary_inputs(module, x)
        with sdpa_kernel(SDPBackend.MATH), counter:
            module(x, **kwargs)
    flops = counter.get_total_flops()
    by_operator = {str(op): count for op, count in counter.get_flop_counts().get("Global", {}).items()}
    return {"flops": flops, "macs": flops // 2, "by_operator": by_operator}


# --- tables ------------------------------------------------------------------------------------------------


def _registry_configs(names: Iterable[str]) -> dict[str, Any]:
    from memoryformer.models import model_config

    return {name: model_config(name) for name in names}


def _g(macs: int) -> float:
    return macs / GIGA


def table1_flops_rows(configs: Mapping[str, Any] | None = None) -> list[dict]:
    """Table 1's FLOPs rows at s = 2048: the paper's per-block G next to ours, and a ``flag`` where they differ.

    ``configs`` maps each name of :data:`PAPER_TABLE1_FLOPS` to its model config (default: the registry's).
    Ours agree when both cells are equal at the paper's rounding (1 decimal in G = 10⁹).
    """
    configs = _registry_configs(PAPER_TABLE1_FLOPS) if configs is None else configs
    missing = [name for name in PAPER_TABLE1_FLOPS if name not in configs]
    if missing:
        raise KeyError(f"no config for Table 1 model(s) {missing}; pass configs for all of {list(PAPER_TABLE1_FLOPS)}")
    rows = []
    for name, (paper_without, paper_total) in PAPER_TABLE1_FLOPS.items():
        config = configs[name]
        ours = block_flops(config, PAPER_SEQ_LEN)
        exact = block_exact_macs(config, PAPER_SEQ_LEN)
        ours_without, ours_total = _g(ours.without_attention), _g(ours.total)
        pairs = ((ours_without, paper_without), (ours_total, paper_total))
        matches = all(f"{ours_g:.1f}" == f"{paper_g:.1f}" for ours_g, paper_g in pairs)  # the paper's rounding
        flag = "" if matches else f"paper {paper_without}/{paper_total} ≠ formula {ours_without:.3f}/{ours_total:.3f}"
        rows.append(
            {
                "model": name,
                "paper_without_attention_G": paper_without,
                "ours_without_attention_G": ours_without,
                "paper_total_G": paper_total,
                "ours_total_G": ours_total,
                "exact_without_attention_G": _g(exact.without_attention),
                "exact_total_G": _g(exact.total),
                "matches": matches,
                "flag": flag,
            }
        )
    return rows


def model_size_rows(names: Sequence[str] | None = None, seq_len: int = PAPER_SEQ_LEN) -> list[dict]:
    """Per registered model: shape, exact parameters, table memory fp16/fp32, per-block MACs and per-token FLOPs."""
    from memoryformer.models import list_models, parameter_count

    names = list(list_models()) if names is None else list(names)
    rows = []
    for name, config in _registry_configs(names).items():
        is_mf = _model_type(config) == "memoryformer"
        paper, exact = block_flops(config, seq_len), block_exact_macs(config, seq_len)
        rows.append(
            {
                "model": name,
                "model_type": config.model_type,
                "layers": config.num_hidden_layers,
                "d": config.hidden_size,
                "heads": config.num_attention_heads,
                "tau": config.tau if is_mf else None,
                "K": config.num_chunks if is_mf else None,
                "params": parameter_count(name),  # built on the meta device: instant even for 6.75B
                "tables_fp16_GB": model_table_bytes(config, 2) / GIGA,
                "tables_fp32_GB": model_table_bytes(config, 4) / GIGA,
                "block_without_attention_G": _g(paper.without_attention),
                "block_total_G": _g(paper.total),
                "block_exact_without_attention_G": _g(exact.without_attention),
                "block_exact_total_G": _g(exact.total),
                "forward_GFLOPs_per_token": model_flops_per_token(config, seq_len) / GIGA,
            }
        )
    return rows


# --- Figure 1 ----------------------------------------------------------------------------------------------


def figure1_rows(hidden_sizes: Iterable[int], seq_lens: Iterable[int], tau: int = 8) -> list[dict]:
    """Figure 1's data: per-block MACs (paper convention) of a Transformer and a MemoryFormer (K = d/τ)."""
    rows = []
    for seq_len in seq_lens:
        for d in hidden_sizes:
            if d % tau:
                raise ValueError(f"hidden size {d} is not a multiple of tau={tau} (a MemoryFormer needs d = K·tau)")
            rows.append(
                {
                    "seq_len": seq_len,
                    "d": d,
                    "transformer_G": _g(transformer_block_flops(d, seq_len).total),
                    "memoryformer_G": _g(memoryformer_block_flops(d, seq_len, d // tau).total),
                }
            )
    return rows


def plot_figure1(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, tau: int = 8) -> Path:
    """Figure 1 as a PNG: FLOPs per block against hidden size, one line per (architecture, s); log y."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless
    from matplotlib.ticker import MultipleLocator

    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    seq_lens = sorted({row["seq_len"] for row in rows})
    linestyles = dict(zip(seq_lens, itertools.cycle(["--", "-", ":", "-."])))
    for column, label, color in (
        ("transformer_G", "Transformer", "tab:blue"),
        ("memoryformer_G", f"MemoryFormer (τ={tau}, K=d/{tau})", "tab:orange"),
    ):
        for s in seq_lens:
            series = [row for row in rows if row["seq_len"] == s]
            ax.plot(
                [row["d"] for row in series],
                [row[column] for row in series],
                linestyles[s],
                color=color,
                marker="o",
                markersize=3,
                label=f"{label}, s={s}",
            )
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MultipleLocator(512))  # hidden sizes are multiples of 256 in practice
    ax.set_xlabel("hidden size d")
    ax.set_ylabel("FLOPs per block (G multiply-accumulates)")
    ax.set_title("FLOPs of one block (attention included)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=150)
    return Path(path)


# --- the report `make flops` writes ------------------------------------------------------------------------

TABLE1_COLUMNS = [
    "model",
    "paper_without_attention_G",
    "ours_without_attention_G",
    "paper_total_G",
    "ours_total_G",
    "exact_without_attention_G",
    "exact_total_G",
    "matches",
    "flag",
]
SIZE_COLUMNS = [
    "model",
    "model_type",
    "layers",
    "d",
    "heads",
    "tau",
    "K",
    "params",
    "tables_fp16_GB",
    "tables_fp32_GB",
    "block_without_attention_G",
    "block_total_G",
    "block_exact_without_attention_G",
    "block_exact_total_G",
    "forward_GFLOPs_per_token",
]
FIGURE1_COLUMNS = ["seq_len", "d", "transformer_G", "memoryformer_G"]


def write_flops_report(
    output_dir: str | os.PathLike,
    models: Sequence[str] | None = None,
    seq_len: int = PAPER_SEQ_LEN,
    figure_seq_lens: Sequence[int] = (1024, 2048),
    figure_hidden_sizes: Sequence[int] = tuple(range(256, 4097, 256)),
    figure_tau: int = 8,
) -> dict[str, Path]:
    """Write Table 1's FLOPs rows, the per-model size table and Figure 1 into ``output_dir`` (atomically).

    ``models`` picks the rows of the size table (default: every registered model) and ``seq_len`` its sequence
    length; Table 1 is always at the paper's s = 2048. Returns the written paths.
    """
    out = Path(output_dir)
    # the paper's cells at the paper's precision, ours to 3 decimals
    g3 = {c: (".1f" if c.startswith("paper_") else ".3f") for c in TABLE1_COLUMNS if c.endswith("_G")}
    table1 = table1_flops_rows()
    shown = [{**row, "matches": "yes" if row["matches"] else "**no**"} for row in table1]
    table1_md = (
        f"# Table 1: FLOPs per block (G multiply-accumulates, G = 1e9), s = {PAPER_SEQ_LEN}\n\n"
        "Paper convention (spec §5): Transformer 12sd² + 2s²d, MemoryFormer 6Ksd + 2s²d; `exact` counts the\n"
        "MemoryFormer's weighted sums s·(4Kd + (τ+e)K²). `matches` compares at the paper's rounding (1 decimal).\n\n"
        + markdown_table(shown, TABLE1_COLUMNS, g3)
    )
    sizes = model_size_rows(models, seq_len)
    size_formats = {"params": ",d", "tables_fp16_GB": ".3f", "tables_fp32_GB": ".3f"}
    size_formats |= {c: ".3f" for c in SIZE_COLUMNS if c.endswith("_G") or c.endswith("_GFLOPs_per_token")}
    sizes_md = (
        f"# Model sizes and FLOPs (s = {seq_len})\n\n"
        "`params`: exact count (built on the meta device). `tables_*_GB`: all Memory-Layer tables, biases excluded\n"
        "(G = 1e9 bytes). `block_*_G`: MACs per block in G, paper convention and exact. `forward_GFLOPs_per_token`:\n"
        "2 × MACs of the whole forward (blocks + LM head), the MFU convention; training is 3× that.\n\n"
        + markdown_table(sizes, SIZE_COLUMNS, size_formats)
    )
    figure = figure1_rows(figure_hidden_sizes, figure_seq_lens, figure_tau)
    paths = {
        "table1_md": write_text_atomic(out / "table1_flops.md", table1_md),
        "table1_csv": write_csv_atomic(out / "table1_flops.csv", table1, TABLE1_COLUMNS),
        "sizes_md": write_text_atomic(out / "model_sizes.md", sizes_md),
        "sizes_csv": write_csv_atomic(out / "model_sizes.csv", sizes, SIZE_COLUMNS),
        "figure1_csv": write_csv_atomic(out / "figure1_flops.csv", figure, FIGURE1_COLUMNS),
        "figure1_png": plot_figure1(figure, out / "figure1_flops.png", figure_tau),
    }
    return paths
