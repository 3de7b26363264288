"""The engine's KV cache: entries appended in place, and the accepted path committed.

transformers' DynamicCache appends by `torch.cat`, which copies every cached entry of
every layer on every forward: a cost that grows with the context and that a tree forward
pays like any other. `KVCache` keeps each layer's entries in a buffer with room to grow,
so a forward writes only its own entries; the tensors the model attends to are views of
the buffer, bit for bit what DynamicCache would hold.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose `keys` and `values` are the first entries of a buffer with room
    for more (half as much again as it holds when it grows). A forward's entries are
    written after them; the buffer is copied only when it is full. Whatever replaces
    `keys` and `values` with tensors of its own (a batch's rows selected, a row added,
    the cache lengthened for a timing) is adopted into a new buffer at the next update,
    and a view that keeps their first entries (`keep_paths`, `crop`) stays in place."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.room: tuple[torch.Tensor, torch.Tensor] | None = None  # (keys, values) buffers

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, m = self.get_seq_length(), key_states.shape[-2]
        if not self._fits(n + m, key_states, value_states):
            self._grow(n, n + m, key_states, value_states)
        keys, values = self.room
        keys[:, :, n : n + m] = key_states
        values[:, :, n : n + m] = value_states
        self.keys, self.values = keys[:, :, : n + m], values[:, :, : n + m]
        return self.keys, self.values

    def _fits(self, length: int, key_states: torch.Tensor, value_states: torch.Tensor) -> bool:
        """Whether the buffer holds the cached entries as its first ones, matches the new
        entries' batch, heads, width and dtype, and has room for `length` in all."""
        if self.room is None:
            return False
        keys, values = self.room
        if keys.shape[-2] < length or keys.dtype != key_states.dtype or values.dtype != value_states.dtype \
                or keys.shape[:2] + keys.shape[3:] != key_states.shape[:2] + key_states.shape[3:] \
                or values.shape[:2] + values.shape[3:] != value_states.shape[:2] + value_states.shape[3:]:
            return False
        if self.keys.numel() == 0:
            return True
        return all(t.data_ptr() == buffer.data_ptr() and t.stride() == buffer.stride()
                   for t, buffer in ((self.keys, keys), (self.values, values)))

    def _grow(self, cached: int, length: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """A new buffer with room for half as much again as `length`, the `cached` entries copied in."""
        room = length + max(length // 2, 16)
        buffers = []
        for old, new in ((self.keys, key_states), (self.values, value_states)):
            buffer = new.new_empty((*new.shape[:2], room, *new.shape[3:]))
            if cached:
                buffer[:, :, :cached] = old
            buffers.append(buffer)
        self.room = (buffers[0], buffers[1])


class KVCache(DynamicCache):
    """A DynamicCache of `GrowingLayer`s, one added per model layer as the model first
    writes to it (as DynamicCache() without a config does)."""

    def __init__(self):
        Cache.__init__(self, layer_class_to_replicate=GrowingLayer)


def keep_path(cache: DynamicCache, prefix_len: int, path: list[int]) -> None:
    """One row: keep the first `prefix_len` positions, then the positions in `path`.

    `path` holds absolute, ascending positions >= `prefix_len` (the accepted entries
    as they were laid out in the last forward). Afterwards the cache is exactly
    `prefix_len + len(path)` long, as if only the accepted tokens had been fed.
    """
    keep_paths(cache, [(prefix_len, path)])


def keep_paths(cache: DynamicCache, rows: list[tuple[int, list[int]]]) -> int:
    """Every row b keeps its first `prefix_len` positions, then the positions in its `path`
    (ascending, >= prefix_len), moved to follow the prefix. The cache is cut to the
    longest row; shorter rows end in a hole for the mask to hide. Returns that length.
    """
    for prefix_len, path in rows:
        if any(b <= a for a, b in zip(path, path[1:])) or (path and path[0] < prefix_len):
            raise ValueError(f"keep_path: positions must be ascending and >= {prefix_len}, got {path}")
    new_len = max(prefix_len + len(path) for prefix_len, path in rows)
    moves = [(b, prefix_len, torch.tensor(path)) for b, (prefix_len, path) in enumerate(rows)
             if path != list(range(prefix_len, prefix_len + len(path)))]
    for layer in cache.layers:
        if not layer.is_initialized or layer.keys.numel() == 0:
            continue
        for b, start, index in moves:
            # keys, values: [B, H, S, D]. Entries only move left (path[j] >= start + j), and
            # the right-hand side is gathered before it is written.
            end = start + len(index)
            layer.keys[b, :, start:end] = layer.keys[b, :, index.to(layer.keys.device)]
            layer.values[b, :, start:end] = layer.values[b, :, index.to(layer.values.device)]
        layer.keys = layer.keys[:, :, :new_len]
        layer.values = layer.values[:, :, :new_len]
    return new_len
