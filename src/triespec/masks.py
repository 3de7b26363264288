"""Pack each row's uncached tokens and draft tree into one batched forward pass.

A row feeds `k >= 1` *pending* tokens (committed, not yet in the KV cache: the whole
prompt at the first step, the last accepted token afterwards) followed by its tree's n
nodes. Pending tokens attend causally; a node attends to the row's cache, to all its
pending tokens and to its own ancestors. Positions: pending tokens continue the row's
cache, a node sits at (last pending position + depth).

Rows share one KV cache of `width` positions; row r's own entries are its first
`past_r`, the rest of its width is a hole that the mask hides. Each row's new tokens
are right-aligned in the batch (padding first), so the rows whose logits are needed are
always the last ones. The model sees all this through its public forward: a 4-D
additive mask and explicit position ids, no patched modeling code.
"""

from __future__ import annotations

import inspect
import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import torch

from .kv import KVCache
from .tree import TokenTree


@dataclass(frozen=True)
class Row:
    pending: list[int]
    tree: TokenTree
    past: int  # this row's tokens in the cache


@dataclass(frozen=True)
class Packed:
    input_ids: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor | dict[str, torch.Tensor]  # [B, 1, T, width + T] (per layer type)
    offsets: list[int]  # where each row's new tokens start in T (and at width + offset in the cache)


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


def pack(rows: list[Row], width: int, dtype: torch.dtype, layout, device=None) -> Packed:
    B = len(rows)
    T = max(len(r.pending) + len(r.tree) for r in rows)
    ids = torch.zeros(B, T, dtype=torch.long)
    positions = torch.zeros(B, T, dtype=torch.long)
    kv_positions = torch.zeros(B, width + T, dtype=torch.long)
    allowed = torch.zeros(B, T, width + T, dtype=torch.bool)  # may query q attend to key kv?
    offsets = []
    for b, row in enumerate(rows):
        k, n, past = len(row.pending), len(row.tree), row.past
        off = T - k - n
        offsets.append(off)
        pos = torch.cat([torch.arange(past, past + k), past + k - 1 + torch.tensor(row.tree.depths, dtype=torch.long)])
        ids[b, off:] = torch.tensor(list(row.pending) + list(row.tree.tokens))
        positions[b, off:] = pos
        kv_positions[b, :past] = torch.arange(past)
        kv_positions[b, width + off :] = pos
        new = width + off  # this row's first new entry in the cache
        allowed[b, off:, :past] = True
        allowed[b, off : off + k, new : new + k] = torch.ones(k, k, dtype=torch.bool).tril()
        allowed[b, off + k :, new : new + k] = True
        allowed[b, off + k :, new + k :] = row.tree.ancestors

    mask = attention_mask(allowed, positions, kv_positions, layout, dtype, device)
    return Packed(ids.to(device), positions.to(device), mask, offsets)


def attention_mask(allowed: torch.Tensor, positions: torch.Tensor, kv_positions: torch.Tensor, layout,
                   dtype: torch.dtype, device=None) -> torch.Tensor | dict[str, torch.Tensor]:
    """The 4-D additive mask the model takes, from which query may see which key:
    allowed [B, T, S] (bool), positions [B, T] of the queries, kv_positions [B, S] of the
    keys. Sliding-window layers also hide keys `window` or more positions back; a model
    mixing layer types gets a dict by type. The one place masks are built."""
    types, window = attention_layout(layout)
    masks = {}
    for kind in types:
        ok = allowed
        if kind == "sliding_attention" and window:
            ok = allowed & (positions[:, :, None] - kv_positions[:, None, :] < window)
        mask = torch.zeros(ok.shape, dtype=dtype).masked_fill_(~ok, torch.finfo(dtype).min)
        masks[kind] = mask[:, None].to(device)  # [B, 1, T, S]
    return masks[types[0]] if len(types) == 1 else masks


FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"  # transformers' switch for torch's own GQA under a mask


def forward(model, packed: Packed, cache, **kwargs):
    """The model's ordinary forward over a packed batch, appending to `cache`.

    On a CPU, attention with grouped key/value heads runs on torch's GQA (`enable_gqa`).
    transformers' SDPA attention uses it only without a mask (CUDA's fast kernels lack
    it under one) and otherwise copies every key/value head once per query head it
    serves, over the whole cache; a tree's forward always has a mask. At 1,500 cached
    tokens that copy was about a tenth of a 16-token forward of Qwen2.5-Coder-1.5B on a
    CPU (docs/kernels.md). Same products, so the same logits (tested bit for bit). The
    switch is transformers' environment variable, set for the forward's duration unless
    the user set it: a forward run meanwhile in another thread may take either path,
    with the same logits."""
    with _cpu_gqa(packed.input_ids.device):
        return model(input_ids=packed.input_ids, position_ids=packed.position_ids,
                     attention_mask=packed.attention_mask, **with_cache(model, cache), **kwargs)


@contextmanager
def _cpu_gqa(device: torch.device):
    if device.type != "cpu" or os.environ.get(FORCE_GQA) is not None:  # elsewhere, or the user's own choice
        yield
        return
    os.environ[FORCE_GQA] = "1"
    try:
        yield
    finally:
        os.environ.pop(FORCE_GQA, None)


def with_cache(model, cache) -> dict:
    """Forward kwargs that hand `cache` to `model` and ask it to fill it.

    transformers 5.24 renamed forward's `past_key_values` to `cache` (the old name warns
    and goes in 5.40); models written for older releases, remote code among them, only
    know the old one.
    """
    return {_cache_name(type(model)): cache, "use_cache": True}


@lru_cache(maxsize=None)
def _cache_name(cls) -> str:
    for klass in cls.__mro__:  # a wrapper's forward(*args, **kwargs) defers to its parent's
        params = inspect.signature(klass.forward).parameters if "forward" in vars(klass) else {}
        for name in ("cache", "past_key_values"):
            if name in params:
                return name
    return "past_key_values"


def context_length(config) -> int:
    """The most positions the model takes, as its config states it."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 30  # no stated limit


@torch.inference_mode()
def check_tree_attention(model) -> None:
    """Refuse a model whose attention does not honour a 4-D tree mask.

    Feeds [a, b, c] with c a sibling of b (same position, must not see b) and compares
    c's logits with [a, c] fed as a plain sequence.
    """
    name = f"{type(model).__name__} (attention {model.config._attn_implementation!r})"
    config = model.config.get_text_config()
    try:
        attention_layout(config)
        vocab = model.get_output_embeddings().weight.shape[0]
        a, b, c = 1 % vocab, 2 % vocab, 3 % vocab

        def last_logits(tree: TokenTree) -> torch.Tensor:
            packed = pack([Row([a], tree, 0)], 0, model.dtype, config, model.device)
            return forward(model, packed, KVCache()).logits[0, -1].float()

        tree_logits = last_logits(TokenTree((b, c), (-1, -1)))
        chain_logits = last_logits(TokenTree.chain([c]))
    except ValueError as e:
        raise ValueError(f"{name} cannot take a tree attention mask: {e}") from e
    except Exception as e:  # any failure here means the model cannot be driven this way
        raise ValueError(f"{name} cannot take a 4-D attention mask with explicit position ids: {e}") from e
    tolerance = 1e-3 if model.dtype == torch.float32 else 3e-2
    error = ((tree_logits - chain_logits).norm() / chain_logits.norm().clamp_min(1e-6)).item()
    if not error <= tolerance:
        raise ValueError(
            f"{name} ignores the 4-D tree attention mask (relative logit error {error:.2g}); "
            "use attn_implementation='sdpa' or 'eager'"
        )
