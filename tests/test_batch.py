"""Several prompts verified in one forward per step: each row as if it ran alone."""

import random

import pytest
import torch
from transformers import DynamicCache

from conftest import EOS, make_model, plain_greedy, repetitive_prompt, tiny_model
from triespec import Engine, TokenTree
from triespec.kv import keep_paths
from triespec.masks import Row, pack, with_cache


def ragged_prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [
        repetitive_prompt(seed, length=40),
        [rng.randrange(1, EOS) for _ in range(3)],
        repetitive_prompt(seed + 1, length=12),
        [rng.randrange(1, EOS)],
    ]


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3", "gpt2", "phi3"])
def test_batch_rows_equal_single_rows_and_plain_greedy(arch):
    model = tiny_model(arch)
    prompts = ragged_prompts(1)
    limits = [40, 7, 25, 33]  # rows finish at very different steps
    expected = [plain_greedy(model, p, n) for p, n in zip(prompts, limits)]
    batch = Engine(model, adaptive=False, decoding_length=12, branch_length=5).generate(prompts, max_new_tokens=limits)
    assert [r.token_ids for r in batch] == expected
    single = [Engine(model, adaptive=False, decoding_length=12, branch_length=5).generate(p, max_new_tokens=n).token_ids
              for p, n in zip(prompts, limits)]
    assert single == expected


def test_generate_takes_a_list_of_prompts():
    model = tiny_model("qwen2")
    prompts = ragged_prompts(2)
    results = Engine(model, adaptive=False, decoding_length=16, branch_length=6).generate(prompts, max_new_tokens=30)
    assert [r.token_ids for r in results] == [plain_greedy(model, p, 30) for p in prompts]
    assert all(r.stats.steps >= 1 for r in results)


def test_batch_with_memory_drafts_and_eos():
    model = make_model("llama", seed=3)
    prompts = ragged_prompts(3)
    free = [plain_greedy(model, p, 30, eos_token_id=None) for p in prompts]
    model.generation_config.eos_token_id = free[0][11]  # row 0 (at least) ends early on EOS
    expected = [plain_greedy(model, p, 30) for p in prompts]
    engine = Engine(model, adaptive=False, decoding_length=16, branch_length=6)
    engine.generate(prompts, max_new_tokens=30)
    again = engine.generate(prompts, max_new_tokens=30)  # drafted from memory: long accepted paths
    assert [r.token_ids for r in again] == expected
    assert again[0].finish_reason == "stop"
    assert max(max(r.stats.tokens_per_step) for r in again) > 1


def test_sampled_batch_rows_equal_their_single_runs():
    model = make_model("llama", seed=4)
    prompts = ragged_prompts(4)
    engine = Engine(model, adaptive=False, decoding_length=8)
    settings = dict(max_new_tokens=20, do_sample=True, temperature=0.8, seed=7)
    batch = engine.generate(prompts, **settings)
    assert [r.token_ids for r in batch] == [engine.generate(p, **settings).token_ids for p in prompts]


def test_pack_ragged_rows():
    rows = [Row([7], TokenTree((20, 21), (-1, 0)), 3), Row([8, 9], TokenTree(), 1)]
    packed = pack(rows, 3, torch.float32, tiny_model("llama").config)
    assert packed.input_ids.tolist() == [[7, 20, 21], [0, 8, 9]]
    assert packed.position_ids.tolist() == [[3, 4, 5], [0, 1, 2]]
    assert packed.offsets == [0, 1]
    allowed = (packed.attention_mask[:, 0] == 0).int().tolist()
    assert allowed[0] == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    # row 1 has one cached token (its hole at 1..2 is hidden) and its new tokens at 4, 5
    assert allowed[1][1:] == [[1, 0, 0, 0, 1, 0], [1, 0, 0, 0, 1, 1]]


def test_keep_paths_moves_each_rows_entries_behind_its_prefix():
    cache = DynamicCache()
    model = tiny_model("llama")
    with torch.no_grad():
        model(torch.arange(1, 13).view(2, 6), **with_cache(model, cache))
    before = [layer.keys.clone() for layer in cache.layers]
    width = keep_paths(cache, [(1, [3, 5]), (4, [4])])
    assert width == 5
    for layer, keys in zip(cache.layers, before):
        assert layer.keys.shape[2] == 5
        torch.testing.assert_close(layer.keys[0, :, :3], keys[0, :, [0, 3, 5]])
        torch.testing.assert_close(layer.keys[1, :, :5], keys[1, :, :5])


def test_batch_input_errors():
    engine = Engine(tiny_model("llama"))
    with pytest.raises(ValueError, match="one prompt"):
        engine.generate([[1, 2], [3, 4]], streamer=object())
    with pytest.raises(ValueError, match="2 max_new_tokens for 3 prompts"):
        engine.generate([[1], [2], [3]], max_new_tokens=[4, 5])
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[1, 2], []])
