"""The attention of a MemoryFormer block: Q, K and V from one hash, rotary, causal attention, no W_O (spec §3).

Rotary follows GPT-NeoX (rotate_half on the first ``rotary_pct`` of each head's dims, base 10000); transformers'
own GPT-NeoX helper applies it, so the convention is exactly Pythia's. The attention itself is dispatched through
transformers' attention interface (``sdpa`` = ``F.scaled_dot_product_attention`` by default, ``eager`` as the
plain-matmul fallback), and the KV cache is a transformers ``Cache``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb, eager_attention_forward

from memoryformer.layers.hashing import Score
from memoryformer.layers.memory_layer import MemoryLayer


class RotaryEmbedding(nn.Module):
    """cos and sin [batch, seq, rotary_dims] of GPT-NeoX rotary for the given positions.

    Computed on the fly from ``position_ids`` (no buffer), in fp32 (fp64 for fp64 inputs), then cast to the input
    dtype, as GPT-NeoX does.
    """

    def __init__(self, rotary_dims: int, base: float = 10000.0) -> None:
        super().__init__()
        if rotary_dims % 2:
            raise ValueError(f"rotary_dims must be even (rotary rotates pairs of dims), got {rotary_dims}")
        self.rotary_dims, self.base = rotary_dims, base

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = torch.promote_types(x.dtype, torch.float32)
        exponents = torch.arange(0, self.rotary_dims, 2, device=x.device, dtype=dtype) / self.rotary_dims
        inv_freq = 1.0 / (self.base**exponents)
        freqs = position_ids[..., None].to(dtype) * inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)

    def extra_repr(self) -> str:
        return f"rotary_dims={self.rotary_dims}, base={self.base}"


class MemoryAttention(nn.Module):
    """Causal multi-head self-attention whose Q, K and V come from Memory Layers sharing one hash (spec §3).

    The three Memory Layers are one ``MemoryLayer(d, 3d, τ)``: its table [K·2^τ, 3d] is the concatenation
    [T_Q | T_K | T_V] of three tables, and one gather of it is numerically identical to three lookups with the
    same hash. There is no output projection: the heads are concatenated and returned.
    """

    is_causal = True  # read by transformers' attention functions

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        tau: int,
        layer_idx: int,
        score: Score = "l1",
        temperature: float = 1.0,
        backend: str = "auto",
        table_std: float = 0.02,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide hidden_size={hidden_size}")
        self.hidden_size, self.num_heads, self.layer_idx = hidden_size, num_heads, layer_idx
        self.head_dim = hidden_size // num_heads
        self.scaling = self.head_dim**-0.5
        self.qkv = MemoryLayer(hidden_size, 3 * hidden_size, tau, score, temperature, backend, table_std=table_std)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        attn_implementation: str | None = "sdpa",
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[batch, seq, d] → ([batch, seq, d], attention weights or None); updates ``past_key_values``."""
        batch, seq, _ = hidden_states.shape
        heads_shape = (batch, seq, self.num_heads, self.head_dim)
        q, k, v = (t.view(heads_shape).transpose(1, 2) for t in self.qkv(hidden_states).split(self.hidden_size, -1))
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(attn_implementation, eager_attention_forward)
        o, weights = attention(self, q, k, v, attention_mask, scaling=self.scaling, dropout=0.0, **kwargs)
        return o.reshape(batch, seq, self.hidden_size), weights


__all__ = ["MemoryAttention", "RotaryEmbedding"]
