"""Pack committed-but-uncached tokens and a draft tree into one forward pass.

A step feeds `k >= 1` *pending* tokens (committed, not yet in the KV cache: the whole
prompt at the first step, the last accepted token afterwards) followed by the tree's
n nodes. Pending tokens attend causally; a node attends to the cache, to all pending
tokens and to its own ancestors. Positions: pending tokens continue the cache, a node
sits at (last pending position + depth). The model sees this through its public
forward: a 4-D additive mask and explicit position ids, no patched modeling code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tree import TokenTree


@dataclass(frozen=True)
class Packed:
    input_ids: torch.Tensor  # [1, k + n]
    position_ids: torch.Tensor  # [1, k + n]
    attention_mask: torch.Tensor | dict[str, torch.Tensor]  # [1, 1, k + n, past + k + n] (per layer type)


def attention_layout(config) -> tuple[list[str], int | None]:
    """The model's attention layer types and its sliding window (None: no window).

    Models with one kind of layer take a tensor mask; models that mix full and
    sliding-window layers (Gemma 2/3, Qwen2 with windows) take a dict by layer type.
    """
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is None:
        types = ["sliding_attention" if window else "full_attention"]
    types = sorted(set(types))
    unknown = [t for t in types if t not in ("full_attention", "sliding_attention")]
    if unknown:
        raise ValueError(f"{type(config).__name__}: attention layer types {unknown} cannot take a tree mask")
    return types, window


def pack(
    pending: list[int], tree: TokenTree, past_len: int, dtype: torch.dtype, layout, device=None
) -> Packed:
    k, n = len(pending), len(tree)
    depths = torch.tensor(tree.depths, dtype=torch.long)
    positions = torch.cat([torch.arange(past_len, past_len + k), past_len + k - 1 + depths])  # [k + n]

    # allowed[q, kv]: may query q attend to key kv?
    allowed = torch.zeros(k + n, past_len + k + n, dtype=torch.bool)
    allowed[:, :past_len] = True
    allowed[:k, past_len : past_len + k] = torch.ones(k, k, dtype=torch.bool).tril()
    allowed[k:, past_len : past_len + k] = True
    allowed[k:, past_len + k :] = tree.ancestors

    types, window = attention_layout(layout)
    kv_positions = torch.cat([torch.arange(past_len), positions])  # [past + k + n]
    masks = {}
    for kind in types:
        ok = allowed
        if kind == "sliding_attention" and window:
            ok = allowed & (positions[:, None] - kv_positions[None, :] < window)
        mask = torch.zeros(ok.shape, dtype=dtype).masked_fill_(~ok, torch.finfo(dtype).min)
        masks[kind] = mask[None, None].to(device)
    ids = torch.tensor([list(pending) + list(tree.tokens)], device=device)
    mask = masks[types[0]] if len(types) == 1 else masks
    return Packed(ids, positions[None].to(device), mask)
