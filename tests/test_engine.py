"""Greedy output must be token-identical to plain `model.generate` (fp32)."""

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaForCausalLM

from conftest import CONTEXT, EOS, VOCAB, ScriptedDrafter, make_model, plain_greedy, random_tree, repetitive_prompt, tiny_config, tiny_model
from triespec import Engine, NoDraft, TokenTree, TrieDrafter


def oracle(reference: list[int], wrong_first: bool = False):
    """Trees built around the true continuation `reference` (prompt + plain greedy output):
    the true chain, with a wrong sibling at every depth, and a second branch that shares
    the true prefix and then goes wrong."""

    def make_tree(seq):
        truth = reference[len(seq) : len(seq) + 6]
        tokens, parents = [], []
        parent = -1
        for depth, token in enumerate(truth):
            wrong = (token + 1 + depth) % VOCAB
            pair = [wrong, token] if wrong_first else [token, wrong]
            tokens += pair
            parents += [parent, parent]
            parent = len(tokens) - (1 if wrong_first else 2)
        return TokenTree(tuple(tokens), tuple(parents))

    return ScriptedDrafter(make_tree)


@pytest.mark.parametrize("repeat", [False, True])
def test_trie_engine_matches_plain_greedy(arch, repeat):
    model = tiny_model(arch)
    engine = Engine(model, adaptive=False, decoding_length=16, branch_length=6)
    for seed in range(3):
        rng = random.Random(seed)
        prompt = repetitive_prompt(seed) if repeat else [rng.randrange(1, EOS) for _ in range(20)]
        expected = plain_greedy(model, prompt, 48)
        result = engine.generate(prompt, max_new_tokens=48)
        assert result.token_ids == expected, f"{arch} seed {seed}"
        assert result.stats.new_tokens == len(expected)
        assert sum(result.stats.tokens_per_step) == len(expected)


@pytest.mark.parametrize("mode", ["hierarchical", "parallel", "single"])
def test_trie_modes_match_plain_greedy_and_accept_drafts(mode):
    model = tiny_model("llama")
    engine = Engine(model, adaptive=False, decoding_length=24, branch_length=8, mode=mode)
    prompt = repetitive_prompt(7)
    expected = plain_greedy(model, prompt, 64)
    first = engine.generate(prompt, max_new_tokens=64)
    second = engine.generate(prompt, max_new_tokens=64)  # now drafted from memory of the first
    assert first.token_ids == expected and second.token_ids == expected
    assert second.stats.steps < first.stats.steps
    assert max(second.stats.tokens_per_step) > 1


def test_oracle_drafts_are_accepted_whole(arch):
    model = tiny_model(arch)
    prompt = repetitive_prompt(3)
    expected = plain_greedy(model, prompt, 40)
    for wrong_first in (False, True):
        engine = Engine(model, drafter=oracle(prompt + expected, wrong_first))
        result = engine.generate(prompt, max_new_tokens=40)
        assert result.token_ids == expected
        assert result.stats.steps <= -(-40 // 7)  # 6 drafted + 1 bonus per step


def test_all_wrong_drafts_cost_nothing_in_output(arch):
    model = tiny_model(arch)
    prompt = repetitive_prompt(4)
    expected = plain_greedy(model, prompt, 30)
    reference = prompt + expected

    def wrong_tree(seq):
        truth = reference[len(seq) : len(seq) + 4]
        return TokenTree.chain([(t + 1) % VOCAB for t in truth]) if truth else TokenTree()

    result = Engine(model, drafter=ScriptedDrafter(wrong_tree)).generate(prompt, max_new_tokens=30)
    assert result.token_ids == expected
    assert result.stats.tokens_per_step == [1] * len(expected)


def test_eos_inside_an_accepted_path():
    model = make_model("llama", seed=1)
    prompt = repetitive_prompt(5)
    free = plain_greedy(model, prompt, 40, eos_token_id=None)
    position = next(i for i in range(5, 40) if free[i] not in free[:i])
    model.generation_config.eos_token_id = free[position]
    expected = plain_greedy(model, prompt, 40)
    assert expected == free[: position + 1]  # plain decoding stops on it, EOS included

    result = Engine(model, drafter=oracle(prompt + free)).generate(prompt, max_new_tokens=40)
    assert result.token_ids == expected
    assert result.finish_reason == "stop"
    assert result.stats.tokens_per_step[-1] > 1  # the EOS came inside a multi-token step


@pytest.mark.parametrize("max_new_tokens", [1, 2, 9, 13])
def test_max_new_tokens_reached_mid_path(max_new_tokens):
    model = make_model("qwen2")
    model.generation_config.eos_token_id = None  # so that the limit, not EOS, ends it
    prompt = repetitive_prompt(6)
    full = plain_greedy(model, prompt, 20)
    result = Engine(model, drafter=oracle(prompt + full)).generate(prompt, max_new_tokens=max_new_tokens)
    assert result.token_ids == full[:max_new_tokens]
    assert result.finish_reason == "length"


def test_generation_stops_at_the_end_of_the_context():
    model = tiny_model("llama")
    prompt = [random.Random(0).randrange(1, EOS) for _ in range(CONTEXT - 10)]
    result = Engine(model, adaptive=False, decoding_length=8).generate(prompt, max_new_tokens=50)
    assert len(result.token_ids) == 10 and result.finish_reason == "length"
    assert result.token_ids == plain_greedy(model, prompt, 10)


def test_no_draft_engine_is_plain_decoding():
    model = tiny_model("gpt2")
    prompt = repetitive_prompt(8)
    result = Engine(model, drafter=NoDraft()).generate(prompt, max_new_tokens=20)
    assert result.token_ids == plain_greedy(model, prompt, 20)
    assert result.stats.steps == 20


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompt=st.lists(st.integers(1, EOS - 1), min_size=1, max_size=24),
    repeat=st.integers(0, 3),
    memory=st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=30), max_size=4),
    tree_seed=st.integers(0, 2**32 - 1),
    tree_size=st.integers(0, 24),
    max_new_tokens=st.integers(1, 24),
)
def test_property_random_prompts_tries_and_trees(prompt, repeat, memory, tree_seed, tree_size, max_new_tokens):
    model = tiny_model("llama")
    prompt = prompt * (repeat + 1)
    expected = plain_greedy(model, prompt, max_new_tokens)

    # the trie, filled with random text and with pieces of the true answer
    drafter = TrieDrafter(decoding_length=16, branch_length=5, max_nodes=300)
    for text in memory:
        drafter.learn_text(text)
    drafter.learn_text(expected[: len(expected) // 2])
    drafter.memory.check()
    assert Engine(model, drafter=drafter, adaptive=False).generate(prompt, max_new_tokens=max_new_tokens).token_ids == expected

    # random tree shapes mixing true and false tokens
    rng = random.Random(tree_seed)
    reference = prompt + expected

    def make_tree(seq):
        return random_tree(rng, reference[len(seq) : len(seq) + 8], tree_size)

    result = Engine(model, drafter=ScriptedDrafter(make_tree)).generate(prompt, max_new_tokens=max_new_tokens)
    assert result.token_ids == expected


# --- bad input -------------------------------------------------------------


@pytest.mark.parametrize("prompt", [[], ""])
def test_empty_prompt(prompt):
    with pytest.raises(ValueError, match="empty|tokenizer"):
        Engine(tiny_model("llama")).generate(prompt)


@pytest.mark.parametrize("max_new_tokens", [0, -3, 2.5])
def test_bad_max_new_tokens(max_new_tokens):
    with pytest.raises(ValueError, match="max_new_tokens"):
        Engine(tiny_model("llama")).generate([1, 2], max_new_tokens=max_new_tokens)


def test_bad_decoding_length():
    with pytest.raises(ValueError, match="decoding_length"):
        Engine(tiny_model("llama"), decoding_length=0)


def test_prompt_longer_than_the_context():
    with pytest.raises(ValueError, match="context"):
        Engine(tiny_model("llama")).generate([1] * CONTEXT)


def test_token_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match="vocabulary"):
        Engine(tiny_model("llama")).generate([1, VOCAB + 5])


def test_text_and_stop_strings_need_a_tokenizer():
    engine = Engine(tiny_model("llama"))
    with pytest.raises(ValueError, match="tokenizer"):
        engine.generate("hello")
    with pytest.raises(ValueError, match="tokenizer"):
        engine.generate([1, 2], stop=["x"])


def test_unknown_model_path():
    with pytest.raises(ValueError, match="no such file"):
        Engine.from_pretrained("/nonexistent/model/folder")
    with pytest.raises(ValueError, match="no such file"):
        Engine.from_pretrained("./missing.gguf")


class IgnoresMask(LlamaForCausalLM):
    """Stands in for a model whose attention builds its own causal mask."""

    def forward(self, *args, attention_mask=None, **kwargs):
        return super().forward(*args, attention_mask=None, **kwargs)


def test_model_that_ignores_the_tree_mask_is_refused():
    torch.manual_seed(0)
    model = IgnoresMask(tiny_config("llama")).eval()
    with pytest.raises(ValueError, match="IgnoresMask.*ignores the 4-D tree attention mask"):
        Engine(model)


def test_model_with_unsupported_attention_layers_is_refused():
    model = make_model("llama")
    model.config.layer_types = ["chunked_attention", "full_attention"]
    with pytest.raises(ValueError, match="LlamaForCausalLM.*chunked_attention"):
        Engine(model)
