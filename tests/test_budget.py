"""Adaptive draft budget: the cost model, the calibration, the cut, and exactness."""

import pytest

from conftest import make_model, plain_greedy, repetitive_prompt, tiny_model
from triespec import Engine, TokenTree
from triespec.budget import Calibration, CostModel, best_size, edges, label


def test_cost_model_interpolates_and_extrapolates():
    cost = CostModel([1, 2, 4], [1.0, 2.0, 2.5])
    assert cost(1) == 1.0 and cost(2) == 2.0
    assert cost(3) == pytest.approx(2.25)
    assert cost(8) == pytest.approx(3.5)  # the last slope, extended
    cost.observe(2, 4.0)
    assert cost(2) == pytest.approx(2.4)  # moved 20% of the way to the observed step
    cost.observe(3, 100.0)  # no measured size 3: nothing to refine
    assert cost(3) == pytest.approx(2.45)
    with pytest.raises(ValueError):
        CostModel([2, 1], [1.0, 1.0])


def test_cost_model_is_measured_on_the_model():
    cost = CostModel.measure(tiny_model("llama"), tiny_model("llama").config, 9)
    assert cost.sizes == [1, 2, 4, 8, 9]
    assert all(t > 0 for t in cost.seconds)


def scored_chain(scores):
    return TokenTree(tuple(range(1, len(scores) + 1)), tuple(range(-1, len(scores) - 1)), tuple(scores))


class Exact(Calibration):
    """A calibration that believes the drafter."""

    def rate(self, p):
        return p


def test_flat_cost_takes_every_node_that_can_be_accepted():
    flat = CostModel([1, 64], [1.0, 1.0])  # a GPU: more tokens cost nothing
    assert best_size(scored_chain([0.9, 0.5, 0.1]), 1, flat, Exact()) == 3


def test_linear_cost_takes_nothing_unless_drafts_are_near_certain():
    linear = CostModel([1, 64], [1.0, 64.0])  # every token costs a full forward
    assert best_size(scored_chain([0.9, 0.5, 0.1]), 1, linear, Exact()) == 0
    assert best_size(scored_chain([1.0, 1.0]), 1, linear, Exact()) == 0  # (1+1)/2 ties plain: not worth it


def test_a_cost_jump_needs_enough_expected_tokens_to_pay():
    jump = CostModel([1, 2, 64], [1.0, 1.7, 1.8])  # this CPU in fp32: the second token costs 0.7
    assert best_size(scored_chain([0.5, 0.3]), 1, jump, Exact()) == 2  # 1.8 tokens for ~1.7
    assert best_size(scored_chain([0.4, 0.1]), 1, jump, Exact()) == 0  # 1.5 tokens for 1.7
    # a long prompt still to prefill: the tree's marginal cost is small
    assert best_size(scored_chain([0.2]), 40, CostModel([1, 64], [1.0, 2.0]), Exact()) == 1


def test_a_sure_chain_is_worth_the_product_of_its_edge_rates():
    """A trie path seen once scores 1.0 at every depth; if such edges are right 30% of
    the time, 15 of them are worth 0.3 + 0.09 + ... ~ 0.43 tokens, not 15 x 0.3."""
    cal = Calibration()
    for accepted in [True] * 30 + [False] * 70:
        cal.observe(1.0, accepted)
    chain = scored_chain([1.0] * 15)
    jump = CostModel([1, 2, 64], [1.0, 2.2, 4.0])  # Qwen 1.5B fp32 on this machine: 2 tokens cost 2.2
    assert best_size(chain, 1, jump, cal) == 0
    assert best_size(chain, 1, CostModel([1, 64], [1.0, 1.0]), cal) == 15  # free tokens: take them all
    sure = Calibration()
    for _ in range(100):
        sure.observe(1.0, True)
    assert best_size(chain, 1, jump, sure) == 15  # edges that are always right do pay


def test_edges_count_a_node_only_where_its_parent_was_accepted():
    tree = TokenTree((5, 6, 7, 9, 6), (-1, 0, 1, -1, 3))
    # 9 (node 3) was rejected at the root, so its child (node 4) says nothing about its own edge
    assert edges(tree, [5, 6, 8]) == [(0, True), (1, True), (2, False), (3, False)]
    assert edges(tree, [9, 6]) == [(0, False), (3, True), (4, True)]


def test_calibration_learns_the_observed_rate():
    cal = Calibration()
    assert cal.rate(0.55) == pytest.approx(0.55)  # the prior trusts the drafter
    for _ in range(400):
        cal.observe(0.55, False)
    for _ in range(100):
        cal.observe(0.55, True)
    assert cal.rate(0.55) == pytest.approx(0.2, abs=0.01)
    assert cal.rate(0.95) == pytest.approx(0.95)  # other bins untouched


def test_label_scores_a_tree_against_what_was_generated():
    #   root -> 5 -> 6 -> 7       nodes 0, 1, 2
    #        -> 9 -> 6            nodes 3, 4
    tree = TokenTree((5, 6, 7, 9, 6), (-1, 0, 1, -1, 3))
    assert label(tree, [5, 6]) == [(0, True), (1, True), (3, False), (4, False)]  # node 2 not decided yet
    assert label(tree, [5, 6, 8]) == [(0, True), (1, True), (2, False), (3, False), (4, False)]
    assert label(tree, []) == []


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_adaptive_engine_stays_exact(arch):
    model = tiny_model(arch)
    engine = Engine(model, decoding_length=16, branch_length=6, adaptive=True)
    for seed in range(3):
        prompt = repetitive_prompt(seed)
        expected = plain_greedy(model, prompt, 40)
        assert engine.generate(prompt, max_new_tokens=40).token_ids == expected
        assert engine.generate(prompt, max_new_tokens=40).token_ids == expected
    assert sum(engine.calibration.drafted) > 10 * 4  # it learned from what it proposed


def test_adaptive_cut_follows_the_cost_curve():
    model = make_model("llama", seed=2)
    prompt = repetitive_prompt(2)
    expected = plain_greedy(model, prompt, 30)
    engine = Engine(model, decoding_length=16, branch_length=6, adaptive=True)
    engine.generate(prompt, max_new_tokens=30)  # the memory now holds the answer

    engine.cost = CostModel([1, 64], [1.0, 64.0])  # nothing pays
    never = engine.generate(prompt, max_new_tokens=30)
    assert never.token_ids == expected and set(never.stats.draft_sizes[1:]) == {0}

    engine.cost = CostModel([1, 64], [1.0, 1.0])  # everything pays
    always = engine.generate(prompt, max_new_tokens=30)
    assert always.token_ids == expected and always.stats.steps < never.stats.steps
