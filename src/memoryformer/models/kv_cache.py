"""A KV cache that grows in place: transformers' ``DynamicCache`` without a copy of the whole cache per token.

``DynamicCache`` appends with ``torch.cat``, so decoding token t copies all t cached keys and values of every layer
into a fresh allocation (at a 512-token cache, a fifth of a MemoryFormer block's decode time went to it). This cache
keeps each layer's keys and values in a buffer with spare capacity (doubled when full, like a Python list) and
exposes the filled prefix as a view, so an append writes only the new positions. It is still a ``DynamicCache``
to everything that reads it: same layer API, same lengths, and ``crop``, beam reordering and batch selection work
(they replace the views, and the next append adopts them into a new buffer).

It serves both families alike (``generate(past_key_values=InPlaceKVCache(config))``, or any forward call), so that a
speed ratio measures the architecture, not a cache used on one side only. A MemoryFormer block additionally writes
its new key and value straight into the reserved slot (:meth:`InPlaceKVLayer.reserve`) from its fused decode step,
which then costs no tensor operation for the cache's bookkeeping.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

MIN_CAPACITY = 256  # positions allocated at least, so short generations never reallocate


class InPlaceKVLayer(DynamicLayer):
    """One layer's keys and values [batch, heads, length, head_dim]: the prefixes of buffers with spare capacity.

    ``keys``/``values`` are views made on access; assigning them (as ``DynamicLayer``'s ``crop``, ``reset``, beam
    reordering and batch selection do) either shortens the prefix (a view of the same buffer) or makes the assigned
    tensor the new buffer, which the next append grows. Keys and values keep their own lengths, because those
    methods assign them one after the other; :meth:`get_seq_length` is the keys'.
    """

    def __init__(self, **kwargs) -> None:
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None
        self.lengths = {"key_buffer": 0, "value_buffer": 0}
        super().__init__(**kwargs)

    keys = property(lambda self: self._prefix("key_buffer"), lambda self, new: self._assign("key_buffer", new))
    values = property(lambda self: self._prefix("value_buffer"), lambda self, new: self._assign("value_buffer", new))

    def get_seq_length(self) -> int:
        return self.lengths["key_buffer"]

    def reserve(self, shape: tuple[int, int, int, int], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Room for ``shape`` = (batch, heads, tokens, head_dim) more positions in ``like``'s dtype and device:
        (key buffer, value buffer, first free position). The buffers are contiguous [batch, heads, capacity,
        head_dim]; write the new positions, then :meth:`advance`."""
        if not self.is_initialized:
            self.lazy_initialization(like, like)
        batch, heads, tokens, head_dim = shape
        length = self.get_seq_length()
        needed = length + tokens
        buffer = self.key_buffer
        fits = (
            buffer is not None
            and buffer.dim() == 4
            and buffer.shape[:2] == (batch, heads)
            and buffer.shape[3] == head_dim
            and buffer.shape[2] >= needed
            and buffer.is_contiguous()
            and self.value_buffer.is_contiguous()
            and self.lengths["value_buffer"] == length
        )
        if not fits:  # a first fill (prefill, or a training forward) gets what it needs; growth doubles
            capacity = (batch, heads, max(MIN_CAPACITY, 2 * needed if length else needed), head_dim)
            self.key_buffer = self._grown(self.keys, capacity, like)
            self.value_buffer = self._grown(self.values, capacity, like)
            self.lengths["value_buffer"] = length
        return self.key_buffer, self.value_buffer, length

    def advance(self, tokens: int) -> None:
        """Count ``tokens`` positions written after :meth:`reserve` as cached."""
        for name in self.lengths:
            self.lengths[name] += tokens

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` positions: only the lengths change, no tensor is touched."""
        if tokens_to_remove > 0 or not self.is_initialized:
            super().crop(tokens_to_remove)  # DynamicLayer's error for the legacy positive form, or nothing
            return
        for name in self.lengths:
            self.lengths[name] = max(0, self.lengths[name] + tokens_to_remove)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values, start = self.reserve(key_states.shape, key_states)
        end = start + key_states.shape[-2]
        keys[..., start:end, :] = key_states
        values[..., start:end, :] = value_states
        self.advance(end - start)
        return self.keys, self.values

    def _prefix(self, name: str) -> torch.Tensor | None:
        buffer = getattr(self, name)
        return buffer[..., : self.lengths[name], :] if buffer is not None and buffer.dim() == 4 else buffer

    def _assign(self, name: str, new: torch.Tensor | None) -> None:
        buffer = getattr(self, name)
        if new is None or buffer is None or new._base is not buffer or new.data_ptr() != buffer.data_ptr():
            setattr(self, name, new)  # not a prefix of the buffer (reordered, selected, reset): it becomes the buffer
        self.lengths[name] = new.shape[-2] if new is not None and new.dim() == 4 else 0

    @staticmethod
    def _grown(cached: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A contiguous buffer of ``shape`` holding ``cached`` (or nothing yet) in its prefix."""
        buffer = like.new_empty(shape)
        if cached is not None and cached.dim() == 4 and cached.shape[-2]:
            buffer[..., : cached.shape[-2], :] = cached
        return buffer


class InPlaceKVCache(DynamicCache):
    """A ``DynamicCache`` whose layers grow in place (:class:`InPlaceKVLayer`); a drop-in for both model families."""

    def __init__(self, config: PretrainedConfig | None = None) -> None:
        if config is None:
            Cache.__init__(self, layer_class_to_replicate=InPlaceKVLayer)
            return
        layers = config.get_text_config(decoder=True).num_hidden_layers
        Cache.__init__(self, layers=[InPlaceKVLayer() for _ in range(layers)])


__all__ = ["InPlaceKVCache", "InPlaceKVLayer"]
