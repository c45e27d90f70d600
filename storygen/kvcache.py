"""A KV cache layer that appends in place, and whose rows can leave and join without copying the batch.

transformers' DynamicLayer grows by `torch.cat` on every decode step, which copies
the whole cache of every layer each token: at batch 16 and 300 positions that is
about 150 MB per step for SmolLM2-135M. This layer keeps spare room at the end of
its buffers and writes the new position into it, so a step copies one position;
the buffers double when full. It is a DynamicLayer in every other respect, so the
model's attention and masking code treats it as usual.

The engine's batch also changes rows: a finished story leaves, a new one joins, and the
columns every row has as padding are dropped. Done with indexing and `torch.cat`, each of
those copied the whole batch's cache twice (~6 % of a busy worker's time here). The layer's
view is rows [0, B) and columns [start, start + T) of its buffers instead, so
- a row that leaves is overwritten by the last row (`keep_rows`): one row is copied;
- padding columns are dropped by moving `start`: nothing is copied;
- rows that join are written into spare rows (`add_rows`), and a longer prompt than the batch's
  takes room left of `start` that dropped columns freed; only when there is no room are the
  buffers made again.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from storygen.transfer import to_device

MIN_SPARE = 64  # positions of room added when a buffer is (re)made


class AppendLayer(DynamicLayer):
    """`keys`/`values` are views of rows [0, B) and columns [start, start + T) of larger buffers."""

    def __init__(self) -> None:
        super().__init__()
        self._k: torch.Tensor | None = None  # (rows, H, capacity, D)
        self._v: torch.Tensor | None = None
        self._start = 0  # the first column in use

    def set(self, keys: torch.Tensor, values: torch.Tensor, spare: int = MIN_SPARE, rows: int = 0) -> None:
        """Replace the contents, leaving `spare` free positions after them and room for `rows` rows in all."""
        B, H, T, D = keys.shape
        # Both are made before either is kept: out of memory at the second leaves the layer as it was.
        k, v = self._room(keys, values, max(rows, B), T + spare)
        if k is self._k:  # kept buffers (a subclass's): the contents may be a view of them
            keys, values = keys.clone(), values.clone()
        self._k, self._v = k, v
        self._k[:B, :, :T] = keys
        self._v[:B, :, :T] = values
        self._start = 0
        self._view(B, T)
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def _room(self, keys: torch.Tensor, values: torch.Tensor, rows: int,
              columns: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffers of at least `rows` rows and `columns` columns for `set` to put keys and values like these in:
        new ones here (graphs.PoolLayer keeps its own while they are big enough)."""
        return (keys.new_empty(rows, keys.shape[1], columns, keys.shape[3]),
                values.new_empty(rows, values.shape[1], columns, values.shape[3]))

    def _view(self, rows: int, length: int) -> None:
        start = self._start
        self.keys, self.values = self._k[:rows, :, start:start + length], self._v[:rows, :, start:start + length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized or self._k is None:
            self.set(key_states, value_states)
            return self.keys, self.values
        T = self.keys.shape[-2]
        keys, values = self.extend(key_states.shape[-2])
        keys[:, :, T:] = key_states
        values[:, :, T:] = value_states
        return keys, values

    def extend(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The view grown by `n` positions at the end, for the caller to write (update, or a kernel
        that writes them itself: kernels.DecodeLayers); the buffers are made again if there is no room."""
        B, T = self.keys.shape[0], self.keys.shape[-2]
        if self._start + T + n > self._k.shape[-2]:
            self.set(self.keys, self.values, spare=max(MIN_SPARE, T, n), rows=self._k.shape[0])
        self._view(B, T + n)
        return self.keys, self.values

    def truncate(self, length: int) -> None:
        """Forget positions from `length` on (their room is reused)."""
        self._view(self.keys.shape[0], length)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self.set(self.keys[indices], self.values[indices])

    def keep_rows(self, order: list[int], first: int) -> None:
        """Keep the rows `order` (old indices, in that order) without their first `first` columns.

        order[p] is p, or a row at len(order) or later that moves into a leaver's place: only the
        rows that move are copied, each in place (nothing is allocated, so this cannot run out of
        memory half-way), and the dropped columns are only skipped."""
        B, T = len(order), self.keys.shape[-2] - first
        moves = [(p, old) for p, old in enumerate(order) if old != p]
        if any(old < B for _, old in moves):
            raise ValueError(f"keep_rows: a row moves from inside the kept batch ({order})")
        self._start += first
        for buffer in (self._k, self._v):
            columns = buffer[:, :, self._start:self._start + T]
            for p, old in moves:
                columns[p].copy_(columns[old])
        self._view(B, T)

    def add_rows(self, keys: torch.Tensor, values: torch.Tensor, rows: int = 0) -> None:
        """Add rows (G, H, L, D) after the batch's, right-aligned: whichever side is shorter is
        left-padded with zeros. rows: the room in rows to make when the buffers must be made again."""
        if not self.is_initialized or self._k is None:
            self.set(keys, values, rows=rows)
            return
        B, T = self.keys.shape[0], self.keys.shape[-2]
        G, L = keys.shape[0], keys.shape[-2]
        width = max(T, L)
        grow = width - T  # columns the batch's rows gain on the left, as padding
        if B + G > self._k.shape[0] or grow > self._start:
            self.set(pad_left(self.keys, width), pad_left(self.values, width), spare=max(MIN_SPARE, width),
                     rows=max(rows, B + G))
        elif grow:
            self._start -= grow
            self._k[:B, :, self._start:self._start + grow] = 0
            self._v[:B, :, self._start:self._start + grow] = 0
        start = self._start
        for buffer, new in ((self._k, keys), (self._v, values)):
            buffer[B:B + G, :, start:start + width - L] = 0
            buffer[B:B + G, :, start + width - L:start + width] = new
        self._view(B + G, width)


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


def keep_rows(layer: DynamicLayer, order: list[int], first: int) -> None:
    """Keep a layer's rows `order` (AppendLayer.keep_rows says which orders) without their first `first` columns."""
    if isinstance(layer, AppendLayer):
        layer.keep_rows(order, first)
    else:
        index = to_device(order, torch.long, layer.keys.device)
        layer.keys, layer.values = layer.keys[index, :, first:], layer.values[index, :, first:]


def add_rows(layer: DynamicLayer, keys: torch.Tensor, values: torch.Tensor, rows: int = 0) -> None:
    """Add rows (G, H, L, D) after a layer's, left-padding whichever side is shorter (AppendLayer.add_rows)."""
    if isinstance(layer, AppendLayer):
        layer.add_rows(keys, values, rows)
        return
    width = max(layer.keys.shape[-2], keys.shape[-2])
    layer.keys = torch.cat([pad_left(layer.keys, width), pad_left(keys, width)])
    layer.values = torch.cat([pad_left(layer.values, width), pad_left(values, width)])


def restore(layer: DynamicLayer, rows: int, length: int) -> None:
    """Back to its first `rows` rows and last `length` columns: undoes an add_rows that the batch does not keep
    (add_rows only writes rows after the batch's and padding before its columns)."""
    if isinstance(layer, AppendLayer):
        layer._start += layer.keys.shape[-2] - length
        layer._view(rows, length)
    else:
        layer.keys, layer.values = layer.keys[:rows, :, -length:], layer.values[:rows, :, -length:]


def pad_left(x: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """Zero-pad `x` on the left along `dim` up to `width`."""
    missing = width - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)
