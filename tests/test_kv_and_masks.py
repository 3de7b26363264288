import os

import pytest
import torch
from transformers import DynamicCache

from conftest import tiny_config, tiny_model
from triespec import TokenTree
from triespec.kv import KVCache, keep_path, keep_paths
from triespec.masks import Row, attention_layout, pack, with_cache


def forward(model, pending, tree, past, cache):
    packed = pack([Row(pending, tree, past)], past, model.dtype, model.config, None)
    return model(input_ids=packed.input_ids, position_ids=packed.position_ids,
                 attention_mask=packed.attention_mask, **with_cache(model, cache)).logits[0]


def cache_of(model, ids) -> DynamicCache:
    cache = DynamicCache()
    with torch.no_grad():
        model(torch.tensor([ids]), **with_cache(model, cache))
    return cache


@pytest.mark.parametrize("accepted", [[], [0], [0, 1], [2, 3], [2, 3, 4]])
def test_keep_path_equals_feeding_only_the_accepted_tokens(accepted):
    model = tiny_model("llama")
    prompt = [5, 9, 14, 3, 7]
    # root -> 20 -> 21          (nodes 0, 1)
    # root -> 30 -> 31 -> 32    (nodes 2, 3, 4)
    tree = TokenTree((20, 21, 30, 31, 32), (-1, 0, -1, 2, 3))
    cache = DynamicCache()
    with torch.no_grad():
        forward(model, prompt, tree, 0, cache)
    keep_path(cache, len(prompt), [len(prompt) + i for i in accepted])

    reference = cache_of(model, prompt + [tree.tokens[i] for i in accepted])
    assert cache.get_seq_length() == len(prompt) + len(accepted)
    for got, want in zip(cache.layers, reference.layers):
        torch.testing.assert_close(got.keys, want.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.values, want.values, rtol=1e-5, atol=1e-5)


def test_keep_path_then_decoding_continues_exactly():
    model = tiny_model("llama")
    prompt = [5, 9, 14, 3, 7]
    tree = TokenTree((20, 21, 30, 31), (-1, 0, -1, 2))
    cache = DynamicCache()
    with torch.no_grad():
        forward(model, prompt, tree, 0, cache)
        keep_path(cache, len(prompt), [len(prompt) + 2, len(prompt) + 3])  # keep 30, 31
        got = forward(model, [40], TokenTree(), len(prompt) + 2, cache)[-1]
        want = model(torch.tensor([prompt + [30, 31, 40]])).logits[0, -1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_keep_path_rejects_unordered_positions():
    cache = cache_of(tiny_model("llama"), [1, 2, 3, 4])
    with pytest.raises(ValueError):
        keep_path(cache, 2, [3, 2])
    with pytest.raises(ValueError):
        keep_path(cache, 2, [1])


def test_pack_layout():
    tree = TokenTree((20, 21, 30), (-1, 0, -1))
    packed = pack([Row([7, 8], tree, 4)], 4, torch.float32, tiny_config("llama"))
    assert packed.input_ids.tolist() == [[7, 8, 20, 21, 30]]
    # pending at 4, 5; nodes at 5 + depth
    assert packed.position_ids.tolist() == [[4, 5, 6, 7, 6]]
    allowed = (packed.attention_mask[0, 0] == 0).int().tolist()
    assert allowed == [
        # past(4)     7  8  20 21 30
        [1, 1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 0, 0, 1],
    ]
    assert packed.attention_mask.min() == torch.finfo(torch.float32).min


def test_sliding_window_masks_far_positions_by_position_not_index():
    config = tiny_config("gemma3")  # window 8, mixed layers -> dict of masks
    tree = TokenTree((20, 21), (-1, 0))
    packed = pack([Row([7], tree, 10)], 10, torch.float32, config)
    assert set(packed.attention_mask) == {"full_attention", "sliding_attention"}
    full = packed.attention_mask["full_attention"][0, 0] == 0
    sliding = packed.attention_mask["sliding_attention"][0, 0] == 0
    assert full[:, :11].all()  # no window on full layers: every row sees all 10 past + 1 pending
    # node 21 sits at position 12: it sees positions 5..12 only
    assert sliding[2].nonzero().flatten().tolist() == [5, 6, 7, 8, 9, 10, 11, 12]


def test_unknown_attention_types_are_refused():
    config = tiny_config("llama")
    config.layer_types = ["chunked_attention", "full_attention"]
    with pytest.raises(ValueError, match="chunked_attention"):
        attention_layout(config)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_tree_forward_on_cpu_runs_torchs_gqa_not_copied_heads(arch, monkeypatch):
    """Grouped key/value heads (the tiny models have 2 for 4 query heads): under a tree's
    mask, transformers would copy each key/value head per query head (repeat_kv) unless
    told to use torch's GQA; masks.forward tells it, on the CPU, and the logits are the
    copying path's."""
    from transformers.integrations import sdpa_attention

    from triespec import masks

    model = tiny_model(arch)
    tree = TokenTree((20, 21, 30, 31, 32), (-1, 0, -1, 2, 3))
    packed = pack([Row([7, 8], tree, 5)], 5, model.dtype, model.config, None)
    with torch.no_grad():
        copied = model(input_ids=packed.input_ids, position_ids=packed.position_ids,
                       attention_mask=packed.attention_mask, **with_cache(model, cache_of(model, [5, 9, 14, 3, 7]))).logits

        def refuse(*args, **kwargs):
            raise AssertionError("key/value heads copied under a mask")

        monkeypatch.setattr(sdpa_attention, "repeat_kv", refuse)
        grouped = masks.forward(model, packed, cache_of(model, [5, 9, 14, 3, 7])).logits
    assert masks.FORCE_GQA not in os.environ  # put back as it was
    assert torch.equal(grouped, copied)


def test_the_growing_cache_holds_what_dynamic_cache_holds_and_appends_in_place():
    """The same forwards, commits and batch moves on transformers' DynamicCache and on the
    engine's KVCache give bit-identical logits and entries; appends within the buffer's room
    copy nothing (the layer's entries stay a view of one buffer)."""
    model = tiny_model("llama")
    prompts = [[5, 9, 14, 3, 7, 11], [8, 2, 6, 1, 4, 12]]
    tree = TokenTree((20, 21, 22), (-1, 0, -1))

    def run(cache):
        logits, buffers, past = [], [], len(prompts[0])
        with torch.no_grad():
            logits.append(model(torch.tensor(prompts), **with_cache(model, cache)).logits)
            for step in range(6):
                rows = [Row([30 + step], tree, past), Row([40 + step], tree, past)]
                packed = pack(rows, past, model.dtype, model.config, None)
                logits.append(model(input_ids=packed.input_ids, position_ids=packed.position_ids,
                                    attention_mask=packed.attention_mask, **with_cache(model, cache)).logits)
                # row 0 accepts node 0 (20), row 1 node 2 (22): entries move left within the buffer
                keep_paths(cache, [(past, [past, past + 1]), (past, [past, past + 3])])
                past += 2
                buffers.append(getattr(cache.layers[0], "room", [None])[0])
            cache.batch_select_indices(torch.tensor([1]))  # a row leaves: the layer adopts a new buffer
            logits.append(model(torch.tensor([[50]]), position_ids=torch.tensor([[past]]),
                                **with_cache(model, cache)).logits)
        return logits, buffers

    expected, _ = run(DynamicCache())
    cache = KVCache()
    got, buffers = run(cache)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert all(b is buffers[0] for b in buffers)  # six appends after the prompt's, one buffer: nothing copied
    layer = cache.layers[0]
    assert layer.keys.data_ptr() == layer.room[0].data_ptr() and layer.keys.shape[0] == 1
