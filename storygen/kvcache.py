"""A KV cache layer that appends in place.

transformers' DynamicLayer grows by `torch.cat` on every decode step, which copies
the whole cache of every layer each token: at batch 16 and 300 positions that is
about 150 MB per step for SmolLM2-135M. This layer keeps spare room at the end of
its buffers and writes the new position into it, so a step copies one position;
the buffers double when full. It is a DynamicLayer in every other respect, so the
model's attention and masking code treats it as usual.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

MIN_SPARE = 64  # positions of room added when a buffer is (re)made


class AppendLayer(DynamicLayer):
    """`keys`/`values` are views of the first `length` positions of larger buffers."""

    def __init__(self) -> None:
        super().__init__()
        self._k: torch.Tensor | None = None  # (B, H, capacity, D)
        self._v: torch.Tensor | None = None

    def set(self, keys: torch.Tensor, values: torch.Tensor, spare: int = MIN_SPARE) -> None:
        """Replace the contents, leaving `spare` free positions after them."""
        B, H, T, D = keys.shape
        self._k = keys.new_empty(B, H, T + spare, D)
        self._v = values.new_empty(B, H, T + spare, values.shape[-1])
        self._k[:, :, :T] = keys
        self._v[:, :, :T] = values
        self.keys, self.values = self._k[:, :, :T], self._v[:, :, :T]
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized or self._k is None:
            self.set(key_states, value_states)
            return self.keys, self.values
        T, n = self.keys.shape[-2], key_states.shape[-2]
        if T + n > self._k.shape[-2]:
            self.set(self.keys, self.values, spare=max(MIN_SPARE, T, n))
        self._k[:, :, T:T + n] = key_states
        self._v[:, :, T:T + n] = value_states
        self.keys, self.values = self._k[:, :, :T + n], self._v[:, :, :T + n]
        return self.keys, self.values

    def truncate(self, length: int) -> None:
        """Forget positions from `length` on (their room is reused)."""
        self.keys, self.values = self._k[:, :, :length], self._v[:, :, :length]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self.set(self.keys[indices], self.values[indices])


def cache_argument(model: torch.nn.Module) -> str:
    """The name of the model's forward argument that takes the KV cache.

    transformers 5.24 renamed `past_key_values` to `cache`; the old name warns (a FutureWarning
    on every forward) until 5.40 removes it. Ask the signature rather than the version, so a
    model whose forward still says `past_key_values` keeps working too.
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def new_cache(config) -> DynamicCache:
    """A DynamicCache whose layers append in place, when every layer is plain full attention."""
    cache = DynamicCache(config=config)
    if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [AppendLayer() for _ in cache.layers]
    return cache


def replace_layer(layer: DynamicLayer, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Set a layer's contents whatever its kind."""
    if isinstance(layer, AppendLayer):
        layer.set(keys, values)
    else:
        layer.keys, layer.values = keys, values


def truncate_layer(layer: DynamicLayer, length: int) -> None:
    if isinstance(layer, AppendLayer):
        layer.truncate(length)
    else:
        layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]
