"""GPT-NeoX's init methods, shared by the Pythia baselines and MemoryFormer (spec §3)."""

from __future__ import annotations

import math


def small_init_std(hidden_size: int) -> float:
    """GPT-NeoX ``small_init`` (Nguyen & Salazar 2019): std √(2/(5d))."""
    return math.sqrt(2 / (5 * hidden_size))


def wang_init_std(hidden_size: int, num_layers: int) -> float:
    """GPT-NeoX ``wang_init`` (Mesh-Transformer-JAX) for the layers that write into the residual: std 2/(L·√d)."""
    return 2 / (num_layers * math.sqrt(hidden_size))


__all__ = ["small_init_std", "wang_init_std"]
