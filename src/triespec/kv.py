"""Commit the accepted path into the KV cache, dropping every rejected draft entry."""

from __future__ import annotations

import torch
from transformers import DynamicCache


def keep_path(cache: DynamicCache, prefix_len: int, path: list[int]) -> None:
    """Keep the first `prefix_len` cache positions, then the positions in `path`.

    `path` holds absolute, ascending positions >= `prefix_len` (the accepted tree nodes
    as they were laid out in the last forward). Afterwards the cache is exactly
    `prefix_len + len(path)` long, as if only the accepted tokens had been fed.
    """
    if any(b <= a for a, b in zip(path, path[1:])) or (path and path[0] < prefix_len):
        raise ValueError(f"keep_path: positions must be ascending and >= {prefix_len}, got {path}")
    new_len = prefix_len + len(path)
    contiguous = path == list(range(prefix_len, new_len))
    index = None if contiguous else torch.tensor(path)
    for layer in cache.layers:
        if not layer.is_initialized or layer.keys.numel() == 0:
            continue
        if index is not None:
            # keys, values: [B, H, S, D]. Positions only move left (path[j] >= prefix_len + j),
            # and the right-hand side is gathered before it is written.
            layer.keys[:, :, prefix_len:new_len] = layer.keys[:, :, index.to(layer.keys.device)]
            layer.values[:, :, prefix_len:new_len] = layer.values[:, :, index.to(layer.values.device)]
        layer.keys = layer.keys[:, :, :new_len]
        layer.values = layer.values[:, :, :new_len]
