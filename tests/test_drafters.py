"""The drafter contract and the one builder every entry point uses."""

import inspect

import pytest

from conftest import ScriptedDrafter, plain_greedy, repetitive_prompt, tiny_model
from triespec import Engine, TokenTree
from triespec.bench import methods
from triespec.cli import BRANCH_LENGTH, DECODING_LENGTH, DRAFTER_CHOICES
from triespec.drafters import (DRAFTERS, MergedDrafter, ModelDrafter, NoDraft, PromptLookupDrafter, SuffixDrafter,
                               TrieDrafter, build)


def test_build_makes_each_drafter_by_name():
    model = tiny_model("llama")
    assert isinstance(build("none"), NoDraft)
    trie = build("trie", decoding_length=8, branch_length=4)
    assert isinstance(trie, TrieDrafter) and (trie.decoding_length, trie.branch_length) == (8, 4)
    assert isinstance(build("model", [model], widths=(2, 1)), ModelDrafter)
    hybrid = build("hybrid", [model], decoding_length=12)
    assert isinstance(hybrid, MergedDrafter) and hybrid.decoding_length == 12 and hybrid.costly
    assert hybrid.memory is hybrid.drafters[0].memory  # the trie's: what a server saves
    assert not trie.costly and build("model", [model]).costly and build("model", [model]).memory is None
    suffix = build("suffix", max_spec_factor=2.0, use_tree_spec=True)
    assert isinstance(suffix, SuffixDrafter) and not suffix.costly and suffix.spec["max_spec_factor"] == 2.0
    lookup = build("lookup", decoding_length=4)
    assert isinstance(lookup, PromptLookupDrafter) and lookup.decoding_length == 4 and lookup.memory is None


def test_the_command_line_offers_every_drafter_with_its_defaults():
    assert set(DRAFTER_CHOICES) == set(DRAFTERS) - {"none"}
    defaults = inspect.signature(TrieDrafter).parameters
    assert (defaults["decoding_length"].default, defaults["branch_length"].default) == (DECODING_LENGTH, BRANCH_LENGTH)


def test_suffix_drafts_continue_what_its_cache_holds():
    """SuffixDecoding's cache under our contract: a prompt's repeat is drafted, a learned answer
    too, as chains (or trees) of at most decoding_length nodes with scores in [0, 1]."""
    drafter = build("suffix", decoding_length=6)
    drafter.learn_text([7, 8, 9, 10, 11, 12, 13, 14], context=[1])
    session = drafter.begin([3, 4, 5, 6, 3, 4])
    tree = session.propose(32, 12)
    assert tree.tokens[:2] == (5, 6) and tree.parents[0] == -1  # the prompt's own repeat
    session.learn([5, 6, 7, 8, 9])
    tree = session.propose(32, 12)
    # the learned answer, as many tokens as the match is long (vLLM's max_spec_factor 1)
    assert tree.tokens == (10, 11, 12) and all(0 <= s <= 1 for s in tree.scores)
    assert len(session.propose(3, 12)) == 3 and session.propose(32, 2).depth == 2
    session.end()
    with pytest.raises(ValueError):
        session.end()  # the cache knows it is over


def test_lookup_drafts_what_followed_the_first_earlier_match():
    """transformers' prompt lookup under our contract: the chain after the first earlier
    occurrence of the last two tokens (then one), at most decoding_length long."""
    session = build("lookup", decoding_length=3).begin([1, 2, 3, 4, 5, 1, 2, 9, 1, 2])
    tree = session.propose(32, 12)
    assert tree.tokens == (3, 4, 5) and tree.parents == (-1, 0, 1)  # the first match, not the last
    assert session.propose(2, 12).tokens == (3, 4) and session.propose(32, 1).tokens == (3,)
    session.learn([7])  # "2 7" was never seen, "7" neither: nothing to draft
    assert len(session.propose(32, 12)) == 0
    session.learn([1])  # "7 1" unseen, "1" first followed by 2 3 4
    assert session.propose(32, 12).tokens == (2, 3, 4)


@pytest.mark.parametrize("name, models, settings, words", [
    ("nope", 0, {}, "unknown drafter"),
    ("trie", 1, {}, "needs drafter 'model' or 'hybrid'"),
    ("model", 0, {}, "needs a draft model"),
    ("hybrid", 0, {}, "needs a draft model"),
    ("trie", 0, {"widths": (1,)}, "takes no setting 'widths'"),
    ("model", 1, {"branch_length": 4}, "takes no setting 'branch_length'"),
    ("none", 0, {"decoding_length": 4}, "takes no draft model and no settings"),
    ("suffix", 1, {}, "takes no draft model"),
    ("suffix", 0, {"branch_length": 4}, "takes no setting 'branch_length'"),
    ("suffix", 0, {"min_token_prob": 2.0}, "min_token_prob"),
    ("lookup", 1, {}, "takes no draft model"),
    ("lookup", 0, {"branch_length": 4}, "takes no setting 'branch_length'"),
    ("lookup", 0, {"match_length": 0}, "match_length"),
])
def test_build_refuses_what_a_drafter_cannot_take(name, models, settings, words):
    with pytest.raises(ValueError, match=words):
        build(name, [tiny_model("llama")] * models, **settings)


def test_a_new_drafter_is_one_registry_line(monkeypatch):
    """Registered once, a drafter is built by name for the engine and the benchmark alike."""
    model = tiny_model("llama")
    prompt = repetitive_prompt(5)
    expected = plain_greedy(model, prompt, 20)
    monkeypatch.setitem(DRAFTERS, "oracle", lambda draft_models, **settings: ScriptedDrafter(
        lambda seq: TokenTree.chain(expected[len(seq) - len(prompt):][:6])))
    engine = Engine(model, drafter=build("oracle"), adaptive=False)
    result = engine.generate(prompt, max_new_tokens=20)
    assert result.token_ids == expected and result.stats.steps <= 4  # 7 tokens a step
    bench = methods.build(methods.parse("oracle:fixed"), model, None)
    assert isinstance(bench.engine.drafter, ScriptedDrafter) and bench.engine.budget is None


def test_the_benchmark_builds_the_products_hybrid():
    """hybrid:dl=N verifies at most N nodes, as Engine.from_pretrained's hybrid does."""
    model = tiny_model("llama")
    bench = methods.build(methods.parse("hybrid:dl=6:fixed"), model, None, tiny_model("llama", seed=1))
    assert bench.engine.drafter.decoding_length == 6


def test_the_engine_refuses_an_object_that_is_not_a_drafter():
    class Duck:
        def begin(self, prompt_ids):
            return None

    with pytest.raises(ValueError, match="is not a drafter"):
        Engine(tiny_model("llama"), drafter=Duck())
    with pytest.raises(ValueError, match="is not a drafter"):
        MergedDrafter([TrieDrafter(), Duck()])
