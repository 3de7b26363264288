"""Commit the accepted path into the KV cache, dropping every rejected draft entry."""

from __future__ import annotations

import torch
from transformers import DynamicCache


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
