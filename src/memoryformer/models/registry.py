"""The named models of spec §4 — the one place their numbers live — and the one way to build any of them.

``build_model("mf-tiny", tau=4)`` returns a freshly initialised model; overrides are config fields of the model's
family (``MemoryFormerConfig`` or ``GPTNeoXConfig``). Hydra's ``conf/model/<name>.yaml`` only names the model and
lists the knobs as ``null`` (= the named model's value); :func:`build_model_from_config` turns that into a call
of :func:`build_model`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import PretrainedConfig, PreTrainedModel

from memoryformer.models.configuration_memoryformer import MemoryFormerConfig
from memoryformer.models.modeling_memoryformer import MemoryFormerForCausalLM
from memoryformer.models.pythia import PYTHIA_KNOBS, build_pythia, pythia_config

Family = Literal["memoryformer", "pythia"]

# MemoryFormer's own knobs (MemoryFormerConfig fields); the defaults of those not set by a ModelSpec apply.
MEMORYFORMER_KNOBS: tuple[str, ...] = tuple(MemoryFormerConfig.__annotations__)


@dataclass(frozen=True)
class ModelSpec:
    """A named model: its family, the size values that set it apart, and its training learning rates."""

    name: str
    family: Family
    size: dict[str, int]
    lr: float  # peak learning rate of spec §4
    min_lr: float  # end of the cosine decay
    baseline: str | None = None  # the Pythia model a MemoryFormer is compared with
    published_params: int | None = None  # Pythia's published parameter count (exact)
    note: str = ""


def _pythia(name: str, layers: int, d: int, heads: int, lr: float, min_lr: float, params: int) -> ModelSpec:
    size = {"num_hidden_layers": layers, "hidden_size": d, "num_attention_heads": heads}
    return ModelSpec(name, "pythia", size, lr=lr, min_lr=min_lr, published_params=params)


def _memoryformer(name: str, layers: int, d: int, heads: int, baseline: ModelSpec, note: str = "") -> ModelSpec:
    """τ=8, K=d/8, e=2 (the config defaults); LR = 3× the baseline's (the paper's rule), min LR 3e-5."""
    size = {"num_hidden_layers": layers, "hidden_size": d, "num_attention_heads": heads}
    return ModelSpec(name, "memoryformer", size, 3 * baseline.lr, 3e-5, baseline=baseline.name, note=note)


_PYTHIA = {
    spec.name: spec
    for spec in (
        _pythia("pythia-14m", 6, 128, 4, 1e-3, 1e-4, 14_067_712),
        _pythia("pythia-31m", 6, 256, 8, 1e-3, 1e-4, 30_494_720),
        _pythia("pythia-70m", 6, 512, 8, 1e-3, 1e-4, 70_426_624),
        _pythia("pythia-160m", 12, 768, 12, 6e-4, 6e-5, 162_322_944),
        _pythia("pythia-410m", 24, 1024, 16, 3e-4, 3e-5, 405_334_016),
    )
}
_MEMORYFORMER = {
    spec.name: spec
    for spec in (
        _memoryformer("mf-nano", 6, 128, 4, _PYTHIA["pythia-14m"], "CPU-sized (our name)"),
        _memoryformer("mf-micro", 6, 256, 8, _PYTHIA["pythia-31m"], "CPU-sized (our name)"),
        _memoryformer("mf-tiny", 6, 512, 8, _PYTHIA["pythia-70m"]),
        _memoryformer("mf-small", 12, 768, 12, _PYTHIA["pythia-160m"], "authors' config: 6 layers, 8 heads, LR 3e-3"),
        _memoryformer("mf-base", 24, 1024, 16, _PYTHIA["pythia-410m"]),
    )
}
MODELS: dict[str, ModelSpec] = {**_MEMORYFORMER, **_PYTHIA}


def list_models(family: Family | None = None) -> list[str]:
    """Names of the registered models (of one family if given), smallest first within each family."""
    return [name for name, spec in MODELS.items() if family in (None, spec.family)]


def model_spec(name: str) -> ModelSpec:
    """The registry entry of ``name``; an unknown name is an error listing the valid ones."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    return MODELS[name]


def _check_overrides(spec: ModelSpec, overrides: Mapping[str, Any]) -> None:
    knobs = MEMORYFORMER_KNOBS if spec.family == "memoryformer" else PYTHIA_KNOBS
    unknown = sorted(set(overrides) - set(knobs))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown} for {spec.name} ({spec.family}); valid keys: {list(knobs)}")


def model_config(name: str, **overrides: Any) -> PretrainedConfig:
    """The transformers config of a named model, with config-field overrides (e.g. ``tau=4``)."""
    spec = model_spec(name)
    _check_overrides(spec, overrides)
    values = {**spec.size, **overrides}
    if spec.family == "pythia":
        return pythia_config(**values)
    return MemoryFormerConfig(**values)


def build_model_from_model_config(config: PretrainedConfig) -> PreTrainedModel:
    """A freshly initialised model of either family from its config (the family's own init)."""
    if isinstance(config, MemoryFormerConfig):
        return MemoryFormerForCausalLM(config)
    return build_pythia(config)


def build_model(name: str, **overrides: Any) -> PreTrainedModel:
    """A freshly initialised model of a registered name (see :func:`list_models`), with config overrides.

    Build inside ``with torch.device("meta"):`` to get shapes without memory (e.g. to count parameters).
    """
    return build_model_from_model_config(model_config(name, **overrides))


def recommended_lr(name: str) -> tuple[float, float]:
    """(peak LR, min LR) of spec §4: Pythia's published values; MemoryFormer 3× its baseline's, min 3e-5."""
    spec = model_spec(name)
    return spec.lr, spec.min_lr


def parameter_count(name: str, **overrides: Any) -> int:
    """Parameters of a named model, counted on the meta device (instant and memory-free at any size)."""
    with torch.device("meta"):
        model = build_model(name, **overrides)
    return sum(p.numel() for p in model.parameters())


def split_model_config(model_cfg: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(name, overrides) of a Hydra ``model`` node: ``name`` plus knobs, where ``null`` means the named value."""
    from omegaconf import DictConfig, OmegaConf

    values = OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else dict(model_cfg)
    if "name" not in values:
        raise ValueError(
            f"the model config needs a `name` (one of {', '.join(list_models())}); got keys {list(values)}"
        )
    name = values.pop("name")
    return name, {key: value for key, value in values.items() if value is not None}


def model_config_from_config(model_cfg: Mapping[str, Any]) -> PretrainedConfig:
    """The transformers config that a Hydra ``model`` node describes."""
    name, overrides = split_model_config(model_cfg)
    return model_config(name, **overrides)


def build_model_from_config(model_cfg: Mapping[str, Any]) -> PreTrainedModel:
    """A freshly initialised model from a Hydra ``model`` node (``conf/model/<name>.yaml``)."""
    return build_model_from_model_config(model_config_from_config(model_cfg))


__all__ = [
    "MODELS",
    "ModelSpec",
    "build_model",
    "build_model_from_config",
    "build_model_from_model_config",
    "list_models",
    "model_config",
    "model_config_from_config",
    "model_spec",
    "parameter_count",
    "recommended_lr",
    "split_model_config",
]
