"""The models: MemoryFormer as a transformers model, the Pythia baselines, and the named registry (spec §3–4).

Importing this package registers MemoryFormer with ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from memoryformer.models.configuration_memoryformer import MemoryFormerConfig
from memoryformer.models.export import write_remote_code
from memoryformer.models.modeling_memoryformer import (
    MemoryFormerForCausalLM,
    MemoryFormerModel,
    MemoryFormerPreTrainedModel,
)
from memoryformer.models.pythia import build_pythia, init_pythia_weights, pythia_config
from memoryformer.models.registry import (
    MODELS,
    ModelSpec,
    build_model,
    build_model_from_config,
    list_models,
    model_config,
    model_config_from_config,
    model_spec,
    parameter_count,
    recommended_lr,
)

AutoConfig.register(MemoryFormerConfig.model_type, MemoryFormerConfig, exist_ok=True)
AutoModel.register(MemoryFormerConfig, MemoryFormerModel, exist_ok=True)
AutoModelForCausalLM.register(MemoryFormerConfig, MemoryFormerForCausalLM, exist_ok=True)

__all__ = [
    "MODELS",
    "MemoryFormerConfig",
    "MemoryFormerForCausalLM",
    "MemoryFormerModel",
    "MemoryFormerPreTrainedModel",
    "ModelSpec",
    "build_model",
    "build_model_from_config",
    "build_pythia",
    "init_pythia_weights",
    "list_models",
    "model_config",
    "model_config_from_config",
    "model_spec",
    "parameter_count",
    "pythia_config",
    "recommended_lr",
    "write_remote_code",
]
