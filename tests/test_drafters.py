"""The drafter contract and the one builder every entry point uses."""

import pytest

from conftest import ScriptedDrafter, plain_greedy, repetitive_prompt, tiny_model
from triespec import Engine, TokenTree
from triespec.bench import methods
from triespec.drafters import DRAFTERS, MergedDrafter, ModelDrafter, NoDraft, TrieDrafter, build


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


@pytest.mark.parametrize("name, models, settings, words", [
    ("nope", 0, {}, "unknown drafter"),
    ("trie", 1, {}, "needs drafter 'model' or 'hybrid'"),
    ("model", 0, {}, "needs a draft model"),
    ("hybrid", 0, {}, "needs a draft model"),
    ("trie", 0, {"widths": (1,)}, "takes no setting 'widths'"),
    ("model", 1, {"branch_length": 4}, "takes no setting 'branch_length'"),
    ("none", 0, {"decoding_length": 4}, "takes no draft model and no settings"),
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
