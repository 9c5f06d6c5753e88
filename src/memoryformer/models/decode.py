"""Fast CPU inference for both model families behind the normal ``generate()`` (issue 15).

The default decode path needs no switch: ``generate`` keeps the KV cache in an :class:`InPlaceKVCache`
(``models/kv_cache.py``: appends in place instead of ``torch.cat``-ing the whole cache per token), and on CPU each
MemoryFormer block then decodes as one fused C++ operator (``kernels/csrc/block_decode.cpp``: norms, the three
lookups, rotary, the cache append and attention in one call; ``MemoryFormerBlock.fused_decode``). That operator was
chosen over ``torch.compile`` of the step because a decode step is dispatch-bound and the fused block removes a
block's ~50 small ops outright: measured side by side (``make bench``, three runs), compiling the step cost
mf-tiny 0.76-0.91x against its fused blocks (and minutes of compilation), while it gained Pythia, which has no such
operator, 1.04-1.55x. Any call the operator does not cover (padding masks, autograd, fp64, another
lookup backend, remote-code checkpoints) runs the modules, with the same tokens.

Two further switches, each applied the same way to MemoryFormer and to its Pythia baseline so that a speed ratio
measures the architecture, not engineering done on one side only:

- :func:`to_inference_dtype`: the weight storage that dominates a model's bytes in a narrower dtype. For a
  MemoryFormer that is its Memory Layer tables (the hash, norms, attention and the dense head stay fp32: the fused
  CPU op widens bf16 rows to fp32 in registers and accumulates in fp32, spec §1 step 6); a model without Memory
  Layers (Pythia) is cast whole. Dense bf16 matmuls are no faster than fp32 on CPUs without native bf16 units
  (AVX2: measured equal), so casting MemoryFormer's dense layers would cost accuracy for nothing.
- :func:`enable_compiled_decode`: transformers' static KV cache plus ``torch.compile`` of the per-token step,
  through ``generate``'s own ``compile_config`` (transformers compiles only on GPUs unless told otherwise). The
  fused lookup is a ``torch.library`` op with a fake kernel, so the whole step is one graph. When no C++ compiler
  is present (inductor needs one on CPU) it leaves the model on the default path, which gives the same tokens. It
  is opt-in: on CPU it is slower than MemoryFormer's fused blocks (above) but the fastest path for Pythia, so
  the benchmark compares the two families on it too.

:func:`build_for_inference` builds a registered model with its tables directly in the narrow dtype, so mf-base
(6.75B parameters: 27 GB in fp32) never exists in fp32 and fits a 24 GB machine at ~13.7 GB.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn
from transformers.generation import CompileConfig, GenerationConfig

from memoryformer.layers.memory_layer import MemoryLayer

logger = logging.getLogger(__name__)

# Accepted spellings of an inference dtype (CLI / Hydra: `make sample DTYPE=bf16`).
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bf16"`` / ``"bfloat16"`` / ``torch.bfloat16`` (and the fp32 spellings) → a torch dtype."""
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    if isinstance(name, str) and name.lower() in DTYPES:
        return DTYPES[name.lower()]
    raise ValueError(f"unsupported inference dtype {name!r}; choose one of {sorted(DTYPES)}")


def memory_layers(model: nn.Module) -> list[MemoryLayer]:
    return [module for module in model.modules() if isinstance(module, MemoryLayer)]


@torch.no_grad()
def to_inference_dtype(model: nn.Module, dtype: str | torch.dtype) -> nn.Module:
    """Cast ``model`` in place for inference in ``dtype`` and return it (see the module docstring for what is cast).

    A MemoryFormer keeps fp32 activations: only its tables change dtype, and their fp32 copies are released.
    """
    dtype = parse_dtype(dtype)
    layers = memory_layers(model)
    if not layers:
        return model.to(dtype)
    for layer in layers:
        layer.tables.data = layer.tables.data.to(dtype)
    return model


def build_for_inference(name: str, dtype: str | torch.dtype = "fp32", **overrides: Any) -> nn.Module:
    """A freshly initialised registered model (eval mode) in ``dtype`` as :func:`to_inference_dtype` defines it.

    MemoryFormer tables are allocated in ``dtype`` from the start (built on the meta device, then materialised
    and initialised), so peak memory is the narrow model's, not the fp32 one's.
    """
    from memoryformer.models.configuration_memoryformer import MemoryFormerConfig
    from memoryformer.models.registry import build_model, model_config

    dtype = parse_dtype(dtype)
    if not isinstance(model_config(name, **overrides), MemoryFormerConfig):
        return to_inference_dtype(build_model(name, **overrides), dtype).eval()  # baselines are small: plain build
    with torch.device("meta"):
        model = build_model(name, **overrides)
    for layer in memory_layers(model):
        layer.tables = nn.Parameter(torch.empty_like(layer.tables, dtype=dtype), requires_grad=False)
    model.to_empty(device="cpu")
    model.apply(model._init_weights)  # the family's own init (spec §1-3), on the materialised tensors
    return model.eval()


# One shared instance: generate recompiles when the config it is handed differs from the last one it compiled with.
COMPILE_CONFIG = CompileConfig(fullgraph=True, dynamic=False, mode="default")
COMPILE_CONFIG._compile_all_devices = True  # transformers' switch to compile on CPU too


def compiler_available() -> bool:
    """Whether ``torch.compile``'s CPU backend (inductor) can build kernels here: it needs a C++ compiler."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as error:  # no compiler, or an inductor that cannot import: both mean "stay eager"
        logger.warning("torch.compile is unavailable (%s); decoding stays on the eager path", error)
        return False
    return True


def compiled_generation_config(generation_config: GenerationConfig) -> GenerationConfig:
    """A copy of ``generation_config`` that decodes with a static KV cache and a compiled per-token step."""
    config = copy.deepcopy(generation_config)
    config.cache_implementation = "static"
    config.compile_config = COMPILE_CONFIG
    return config


def enable_compiled_decode(model: nn.Module) -> bool:
    """Make ``model.generate`` decode with a static KV cache and a compiled per-token step; True if enabled.

    Returns False, leaving ``generate`` on its eager default, when no compiler is available. Greedy tokens are
    the eager path's (tests/test_decode.py). The first ``generate`` compiles (minutes on 2 busy cores); later calls
    of the same batch size and cache length reuse the compiled step (the prefill itself runs eagerly).

    This sets ``model.generation_config``, which ``generate`` also uses to fill the unset fields of a config passed
    to it: to decode one model both ways, pass :func:`compiled_generation_config` per call instead.
    """
    if not compiler_available():
        return False
    model.generation_config = compiled_generation_config(model.generation_config)
    return True


def disable_compiled_decode(model: nn.Module) -> None:
    """Back to transformers' default: a dynamic KV cache, eager steps."""
    model.generation_config.cache_implementation = None
    model.generation_config.compile_config = None


__all__ = [
    "DTYPES",
    "build_for_inference",
    "compiled_generation_config",
    "compiler_available",
    "disable_compiled_decode",
    "enable_compiled_decode",
    "parse_dtype",
    "to_inference_dtype",
]
