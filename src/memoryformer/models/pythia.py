"""Pythia baselines: transformers' own GPT-NeoX, configured as EleutherAI's published Pythia models (spec §4).

Nothing of GPT-NeoX is re-implemented here: :func:`pythia_config` returns a ``GPTNeoXConfig`` with the values of
the published Pythia ``config.json`` files, and :func:`init_pythia_weights` applies Pythia's from-scratch init
(the GPT-NeoX ``small_init`` / ``wang_init`` methods) to a ``GPTNeoXForCausalLM``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from memoryformer.models.init import small_init_std, wang_init_std

# What every Pythia model shares (its published config.json); sizes come from the registry.
PYTHIA_ARCHITECTURE: dict[str, Any] = {
    "vocab_size": 50304,  # GPT-NeoX-20B tokenizer (50277 tokens) padded to a multiple of 128
    "hidden_act": "gelu",
    "use_parallel_residual": True,
    "layer_norm_eps": 1e-5,
    "rotary_pct": 0.25,
    "rotary_emb_base": 10000,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "attention_dropout": 0.0,
    "hidden_dropout": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "architectures": ["GPTNeoXForCausalLM"],
}

# Keys a Pythia override may set: GPT-NeoX's own config fields and its legacy rotary names (as in config.json).
PYTHIA_KNOBS: tuple[str, ...] = (*GPTNeoXConfig.__annotations__, "rotary_pct", "rotary_emb_base")


def pythia_config(
    hidden_size: int, num_hidden_layers: int, num_attention_heads: int, **overrides: Any
) -> GPTNeoXConfig:
    """A ``GPTNeoXConfig`` of Pythia's architecture at the given size; the FFN is 4d unless overridden."""
    values = {
        **PYTHIA_ARCHITECTURE,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "intermediate_size": 4 * hidden_size,
        **overrides,
    }
    return GPTNeoXConfig(**values)


@torch.no_grad()
def init_pythia_weights(model: GPTNeoXForCausalLM) -> None:
    """Pythia's from-scratch init: small_init for every weight (embedding and head included), wang_init for
    ``attention.dense`` and ``mlp.dense_4h_to_h``, biases 0, LayerNorm 1/0."""
    config = model.config
    small = small_init_std(config.hidden_size)
    wang = wang_init_std(config.hidden_size, config.num_hidden_layers)
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            residual_output = name.endswith(("attention.dense", "mlp.dense_4h_to_h"))
            nn.init.normal_(module.weight, std=wang if residual_output else small)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


def build_pythia(config: GPTNeoXConfig) -> GPTNeoXForCausalLM:
    """A freshly initialised Pythia model."""
    model = GPTNeoXForCausalLM(config)
    init_pythia_weights(model)
    return model


__all__ = ["PYTHIA_ARCHITECTURE", "build_pythia", "init_pythia_weights", "pythia_config"]
