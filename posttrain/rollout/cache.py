"""A KV cache for the sampler that is allocated once and written in place.

transformers' `DynamicCache` grows every layer's keys and values with `torch.cat` at each new
token, which copies the whole cache per token per layer: 13% of a decode step's CPU time on the
GRPO benchmark's shape. `preallocated_cache(config, capacity)` is a `DynamicCache` whose
full-attention layers are `PreallocatedLayer`s instead: the first `update` allocates
(batch, heads, capacity, head_dim) buffers, each later one copies the new positions into
them, and the attention sees a view of the filled part, so the values attended to are the
same as with `cat`. Sliding-window and other special layers keep their own classes.
"""

from __future__ import annotations

from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """A full-attention cache layer holding up to `capacity` positions in fixed buffers."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.key_buffer: Tensor | None = None
        self.value_buffer: Tensor | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        batch, heads, _, _ = key_states.shape
        self.device = key_states.device
        self.key_buffer = key_states.new_empty(batch, heads, self.capacity, key_states.shape[-1])
        self.value_buffer = value_states.new_empty(
            batch, heads, self.capacity, value_states.shape[-1]
        )
        self.keys, self.values = self.key_buffer[:, :, :0], self.value_buffer[:, :, :0]
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        """Write the new positions after the filled ones; the filled views, like `cat` returns."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.keys.shape[-2]  # the filled positions
        end = start + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache holds {self.capacity} positions, {end} were asked for")
        self.key_buffer[:, :, start:end] = key_states
        self.value_buffer[:, :, start:end] = value_states
        self.keys = self.key_buffer[:, :, :end]
        self.values = self.value_buffer[:, :, :end]
        return self.keys, self.values

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep (or repeat) the rows `indices` of the batch, in that order."""
        if self.is_initialized:
            filled = self.keys.shape[-2]
            self.key_buffer = self.key_buffer[indices]
            self.value_buffer = self.value_buffer[indices]
            self.keys = self.key_buffer[:, :, :filled]
            self.values = self.value_buffer[:, :, :filled]

    def reset(self) -> None:
        self.key_buffer = self.value_buffer = None
        super().reset()


def preallocated_cache(config, capacity: int) -> DynamicCache:
    """`DynamicCache(config=config)` with each plain full-attention layer preallocated."""
    cache = DynamicCache(config=config)
    cache.layers = [
        PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer
        for layer in cache.layers
    ]
    return cache
