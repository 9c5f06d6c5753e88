"""MemoryFormer as a transformers causal language model (spec §3).

Block (sequential pre-norm, the authors' code):
    a = RMSNorm(x);  Q, K, V = Memory Layers sharing one hash of a;  rotary on 25% of each head;
    o = causal softmax(Q Kᵀ/√d_head) V, heads concatenated, no W_O;  x = x + o
    x = x + MemoryBlock(RMSNorm(x))
Model: dense token embedding → blocks → RMSNorm → untied dense head d → V (the only fully-connected layer).

This file is also shipped inside every saved checkpoint (see ``export.py``), so it imports only from the
``memoryformer`` modules that are bundled with it, torch and transformers.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from memoryformer.kernels import resolve_backend
from memoryformer.kernels.cpu import memory_block_decode_cpu
from memoryformer.layers.attention import MemoryAttention, RotaryEmbedding
from memoryformer.layers.memory_layer import MemoryBlock, MemoryLayer
from memoryformer.layers.norms import RMSNorm
from memoryformer.models.configuration_memoryformer import MemoryFormerConfig
from memoryformer.models.export import write_remote_code
from memoryformer.models.init import small_init_std
from memoryformer.models.kv_cache import InPlaceKVCache


@functools.cache
def fused_lookup_backend(backend: str, device_type: str) -> bool:
    """Whether ``backend`` means the fused CPU operators on ``device_type`` (cached: decode asks once per block)."""
    return resolve_backend(backend, torch.device(device_type)) == "cpu"


class MemoryFormerBlock(GradientCheckpointingLayer):
    """One MemoryFormer block: shared-hash attention and a Memory Block, each behind a pre-norm residual."""

    def __init__(self, config: MemoryFormerConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        lookup = {"score": config.score, "temperature": config.temperature, "backend": config.lookup_backend}
        self.attention_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attention = MemoryAttention(
            config.hidden_size,
            config.num_attention_heads,
            config.tau,
            layer_idx,
            table_std=small_init_std(config.hidden_size),
            **lookup,
        )
        self.memory_block_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.memory_block = MemoryBlock(
            config.hidden_size,
            config.tau,
            expand_bits=config.expand_bits,
            activation=config.memory_block_activation,
            table_std=config.initializer_range,
            layer_norm_eps=config.layer_norm_eps,
            **lookup,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if self.fused_decode_applies(hidden_states, attention_mask, past_key_values):
            return self.fused_decode(hidden_states, position_embeddings, past_key_values)
        attn_output, _ = self.attention(
            self.attention_norm(hidden_states),
            position_embeddings,
            attention_mask,
            past_key_values,
            attn_implementation=self.config._attn_implementation,
            **kwargs,
        )
        hidden_states = hidden_states + attn_output
        return hidden_states + self.memory_block(self.memory_block_norm(hidden_states))

    def fused_decode_applies(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, past_key_values: Cache | None
    ) -> bool:
        """Whether this call is one inference decode step the fused CPU block operator computes (issue 15).

        That is: one new fp32 token per sequence on CPU without autograd or tracing, no mask (no padding: SDPA's
        causal attention over the whole cache), an :class:`InPlaceKVCache`, head_dim a multiple of 8, and the fused
        lookup as backend. Any other call, and any model loaded as remote code (its stubbed kernels report
        unavailable), runs the modules.
        """
        return (
            hidden_states.shape[1] == 1
            and attention_mask is None
            and isinstance(past_key_values, InPlaceKVCache)
            and not torch.is_grad_enabled()
            and hidden_states.dtype == torch.float32
            and self.config._attn_implementation == "sdpa"  # attention weights are never returned
            and self._modules["attention"].head_dim % 8 == 0  # the operator's vector width
            and not torch.compiler.is_compiling()
            and fused_lookup_backend(self._modules["attention"]._modules["qkv"].backend, hidden_states.device.type)
        )

    def fused_decode(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor], cache: Cache
    ) -> torch.Tensor:
        """This block's forward for [batch, 1, d] as one C++ operator that appends to the cache in place."""
        attention = self._modules["attention"]
        layer_cache = cache.layers[attention.layer_idx]
        shape = (hidden_states.shape[0], attention.num_heads, 1, attention.head_dim)
        keys, values, length = layer_cache.reserve(shape, hidden_states)
        cos, sin = position_embeddings
        output = memory_block_decode_cpu(
            hidden_states, cos, sin, keys, values, length, *self.fused_decode_operands().values()
        )
        layer_cache.advance(1)
        return output

    def fused_decode_operands(self) -> dict[str, torch.Tensor | int | float | bool | str]:
        """The block's weights and shapes as the fused operator names them, in its schema's order.

        Read from the modules' ``_modules``/``_parameters`` dicts: ``nn.Module`` attribute lookup (a Python-level
        ``__getattr__``) costs ~2 µs per name on this machine, which for these 25 names was a third of the step.
        """
        modules = self._modules
        attention, memory_block = modules["attention"], modules["memory_block"]
        qkv = attention._modules["qkv"]
        ml1, norm, ml2 = (memory_block._modules[name] for name in ("ml1", "norm", "ml2"))
        attention_norm = modules["attention_norm"]
        return {
            "attention_norm_scale": attention_norm._parameters["scale"],
            "rms_norm_eps": attention_norm.eps,
            "qkv_tables": qkv._parameters["tables"],
            "qkv_bias": qkv._parameters["bias"],
            "tau": qkv.tau,
            "num_heads": attention.num_heads,
            "scaling": attention.scaling,
            "memory_block_norm_scale": modules["memory_block_norm"]._parameters["scale"],
            "ml1_tables": ml1._parameters["tables"],
            "ml1_bias": ml1._parameters["bias"],
            "gelu": isinstance(memory_block._modules["act"], nn.GELU),
            "layer_norm_weight": norm._parameters["weight"],
            "layer_norm_bias": norm._parameters["bias"],
            "layer_norm_eps": norm.eps,
            "ml2_tables": ml2._parameters["tables"],
            "ml2_bias": ml2._parameters["bias"],
            "ml2_tau": ml2.tau,
            "score": qkv.score,
            "temperature": qkv.temperature,
        }


class MemoryFormerPreTrainedModel(PreTrainedModel):
    config_class = MemoryFormerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MemoryFormerBlock"]  # noqa: RUF012 (transformers class attributes)
    _skip_keys_device_placement = ["past_key_values"]  # noqa: RUF012
    _supports_sdpa = True
    _can_record_outputs = {"hidden_states": MemoryFormerBlock, "attentions": MemoryAttention}  # noqa: RUF012

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Fresh init (spec §1–3); ``transformers.initialization`` skips tensors that ``from_pretrained`` loaded."""
        std = small_init_std(self.config.hidden_size)
        if isinstance(module, MemoryLayer):
            init.normal_(module.tables, std=module.table_std)
            init.normal_(module.bias, std=module.bias_std)
        elif isinstance(module, (nn.Embedding, nn.Linear)):
            init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            init.ones_(module.scale)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """``PreTrainedModel.save_pretrained``, plus this model's source code beside the weights (``config.auto_map``),
        so the checkpoint loads with ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` in an
        environment without the ``memoryformer`` package (lm-eval's CLI, any Hugging Face user)."""
        self.config.auto_map = {
            "AutoConfig": "configuration_memoryformer.MemoryFormerConfig",
            "AutoModelForCausalLM": "modeling_memoryformer.MemoryFormerForCausalLM",
        }
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_remote_code(save_directory)


class MemoryFormerModel(MemoryFormerPreTrainedModel):
    """Embedding → MemoryFormer blocks → final RMSNorm; returns the last hidden state and the KV cache."""

    def __init__(self, config: MemoryFormerConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([MemoryFormerBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.rotary_ndims, config.rotary_emb_base)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = InPlaceKVCache(self.config)
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0) + past_seen

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                position_embeddings,
                attention_mask=causal_mask,
                past_key_values=past_key_values,
                **kwargs,
            )
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), past_key_values=past_key_values)


class MemoryFormerForCausalLM(MemoryFormerPreTrainedModel, GenerationMixin):
    """MemoryFormer with its untied LM head; ``labels`` give the shifted next-token cross-entropy."""

    def __init__(self, config: MemoryFormerConfig) -> None:
        super().__init__(config)
        self.model = MemoryFormerModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs) -> None:
        """``GenerationMixin``'s cache set-up, with :class:`InPlaceKVCache` instead of its default ``DynamicCache``
        (same contents, no copy of the cache per token; on CPU it enables the fused block decode)."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("past_key_values")
        default_cache = generation_config.cache_implementation in (None, "dynamic")
        if type(cache) is DynamicCache and default_cache and not getattr(cache, "_is_user_defined", False):
            model_kwargs["past_key_values"] = InPlaceKVCache(self.config)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs: BaseModelOutputWithPast = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = ["MemoryFormerForCausalLM", "MemoryFormerModel", "MemoryFormerPreTrainedModel"]
