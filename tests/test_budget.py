"""Adaptive draft budget: the cost model, the calibration, the cut, and exactness."""

import time

import pytest
import torch

from conftest import make_model, plain_greedy, repetitive_prompt, tiny_model
import triespec.budget as budget
from triespec import Engine, TokenTree
from triespec.tree import MODEL, TRIE
from triespec.drafters import Drafter, DraftSession, MergedDrafter, ModelDrafter, TrieDrafter
from triespec.budget import Budget, Calibration, CostModel, Gate, Watched, best_size, best_sizes, edges, label


def test_cost_model_interpolates_and_extrapolates():
    cost = CostModel([1, 2, 4], [1.0, 2.0, 2.5])
    assert cost(1) == 1.0 and cost(2) == 2.0
    assert cost(3) == pytest.approx(2.25)
    assert cost(8) == pytest.approx(3.5)  # the last slope, extended
    cost.observe(2, 4.0)
    assert cost(2) == pytest.approx(2.4)  # moved 20% of the way to the observed step
    cost.observe(3, 3.45)  # between 2 and 4: each moves by its share of the 1.0 error
    assert cost(2) == pytest.approx(2.5) and cost(4) == pytest.approx(2.6)
    cost.observe(9, 100.0)  # beyond the largest measured size: nothing to refine
    assert cost.seconds == pytest.approx([1.0, 2.5, 2.6])
    with pytest.raises(ValueError):
        CostModel([2, 1], [1.0, 1.0])


def test_cost_model_refined_by_steps_of_every_size_keeps_its_shape():
    # Real steps run slower than the start-up's best-of-two (longer context, jitter): a
    # refinement that followed only the often-fed sizes would flatten the curve.
    cost = CostModel([1, 2, 4, 8, 16, 32], [0.20, 0.20, 0.21, 0.23, 0.28, 0.42])
    for _ in range(200):
        for tokens in (1, 1, 1, 2, 3, 5, 7, 11, 13, 19, 26):
            cost.observe(tokens, 1.1 * (0.2 + 0.007 * max(tokens - 4, 0)))
    real = [1.1 * (0.2 + 0.007 * max(s - 4, 0)) for s in (1, 2, 4, 8, 16)]
    assert cost.seconds[:5] == pytest.approx(real, rel=0.03)


def test_cost_model_prices_the_context():
    # 1 token: 0.2 s after 64 cached tokens, +0.01 s per 1000 more; 32 tokens: +0.2 s per 1000
    cost = CostModel([1, 32], [0.2, 0.4], context=64, per_context=(0.01e-3 - 0.19e-3 / 31, 0.19e-3 / 31))
    assert cost(1) == cost(1, 64) == pytest.approx(0.2)
    assert cost(1, 1064) == pytest.approx(0.21) and cost(32, 1064) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="per_context"):
        CostModel([1], [1.0], per_context=(-1.0, 0.0))


def test_cost_model_is_measured_on_the_model():
    model = tiny_model("llama")
    cost = CostModel.measure(model, model.config, 9, long_context=256)
    assert cost.sizes == list(range(1, 10)) and cost.context == 64
    assert all(t > 0 for t in cost.seconds) and len(cost.per_context) == 2 and min(cost.per_context) >= 0
    assert CostModel.measure(model, model.config, 4, long_context=64).per_context == (0.0, 0.0)
    coarse = CostModel.measure(model, model.config, 20, every=4, long_context=64)  # timed: 1-4, 8, 16, 20
    assert coarse.sizes == list(range(1, 21))  # every size, for real steps to refine each on its own
    assert coarse(6) == pytest.approx((coarse(4) + coarse(8)) / 2)
    assert coarse(12) == pytest.approx((coarse(8) + coarse(16)) / 2)


def test_a_burst_of_load_in_one_pass_does_not_make_sizes_dear(monkeypatch):
    # Timed in several passes (as the benchmark times its curve), a burst during the first
    # pass over the sizes 2-5 must not stick.
    real, seen = budget.forward, set()

    def bursty(model, packed, cache, logits_to_keep):
        if 2 <= logits_to_keep <= 5 and logits_to_keep not in seen:
            seen.add(logits_to_keep)
            time.sleep(0.3)
        return real(model, packed, cache, logits_to_keep=logits_to_keep)

    monkeypatch.setattr(budget, "forward", bursty)
    model = tiny_model("llama")
    cost = CostModel.measure(model, model.config, 8, long_context=64, repeats=2, every=8)
    assert seen == {2, 3, 4, 5}
    assert max(cost.seconds[1:5]) < 0.3  # each the faster of two passes


def test_the_cut_goes_to_a_cheap_size():
    # fp32 on this machine's CPU: 3 and 7 tokens cost more than 4 and 8 (kernels work in blocks of rows)
    seconds = [0.40, 0.82, 1.25, 0.80, 0.90, 0.95, 1.25, 0.82]
    cost = CostModel(list(range(1, 9)), seconds)
    assert best_size(scored_chain([0.99 ** k for k in range(1, 8)]), 1, cost, Exact()) == 7  # 8 tokens fed
    pair = scored_chain([0.9, 0.81])  # two nodes worth 1.71 tokens: 3 tokens fed, the dear size
    assert best_size(pair, 1, cost, Exact()) == 0
    interpolated = CostModel([1, 2, 4, 8], [seconds[0], seconds[1], seconds[3], seconds[7]])
    assert best_size(pair, 1, interpolated, Exact()) == 2  # what a curve by powers of two would verify


def test_lengthened_cache_is_as_long_as_asked():
    from transformers import DynamicCache

    from triespec.budget import _lengthen
    from triespec.masks import with_cache

    model, cache = tiny_model("llama"), DynamicCache()
    model(input_ids=torch.arange(10)[None], **with_cache(model, cache))
    _lengthen(cache, 25)
    assert cache.get_seq_length() == 25
    assert all(layer.keys.shape[2] == layer.values.shape[2] == 25 for layer in cache.layers)


def scored_chain(scores):
    return TokenTree(tuple(range(1, len(scores) + 1)), tuple(range(-1, len(scores) - 1)), tuple(scores))


def sure() -> Calibration:
    """A calibration that saw 100 trie edges scored 1.0, all accepted."""
    cal = Calibration()
    for _ in range(100):
        cal.observe(1.0, True)
    return cal


class Exact(Calibration):
    """A calibration that believes the drafter."""

    def rate(self, p, kind=TRIE):
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
    cal = Calibration(memory=None)  # every edge counts alike, whatever its order
    for accepted in [True] * 30 + [False] * 70:
        cal.observe(1.0, accepted)
    chain = scored_chain([1.0] * 15)
    jump = CostModel([1, 2, 64], [1.0, 2.2, 4.0])  # Qwen 1.5B fp32 on this machine: 2 tokens cost 2.2
    assert best_size(chain, 1, jump, cal) == 0
    assert best_size(chain, 1, CostModel([1, 64], [1.0, 1.0]), cal) == 15  # free tokens: take them all
    assert best_size(chain, 1, jump, sure()) == 15  # edges that are always right do pay


def test_a_start_that_trusts_the_scores_is_corrected_by_the_trees_cut_in_the_shadow():
    """Before any evidence a cell trusts its bin (a chain of seen-once trie paths, 0.95 per
    edge, is verified even where a second token doubles the forward); a few trees scored
    after they were cut to nothing bring it down, and the cut then verifies nothing."""
    chain = scored_chain([1.0] * 8)
    fp32 = CostModel([1, 2, 4, 8, 16, 32], [0.41, 0.90, 1.0, 1.0, 1.2, 1.6])
    cal = Calibration()
    assert cal.rate(1.0) == pytest.approx(0.95) and best_size(chain, 1, fp32, cal) == 8
    for _ in range(3):  # three proposals, cut or not, whose first edge was wrong
        Watched(0, chain).update(cal, [99], finished=True)
    assert cal.rate(1.0) == pytest.approx(1.9 / 5) and best_size(chain, 1, fp32, cal) == 0


def test_edges_count_a_node_only_where_its_parent_was_accepted():
    tree = TokenTree((5, 6, 7, 9, 6), (-1, 0, 1, -1, 3))
    # 9 (node 3) was rejected at the root, so its child (node 4) says nothing about its own edge
    assert edges(tree, [5, 6, 8]) == [(0, True), (1, True), (2, False), (3, False)]
    assert edges(tree, [9, 6]) == [(0, False), (3, True), (4, True)]


def test_calibration_learns_the_observed_rate():
    assert Calibration().rate(0.55) == pytest.approx(0.55)  # before evidence: the bin's middle
    cal = Calibration(prior=4.0, memory=None)  # counting alone, nothing forgotten
    for _ in range(400):
        cal.observe(0.55, False)
    for _ in range(100):
        cal.observe(0.55, True)
    assert cal.rate(0.55) == pytest.approx(0.2, abs=0.01)
    assert cal.rate(0.95) == pytest.approx(0.95) and cal.rate(0.55, kind=MODEL) == pytest.approx(0.55)  # untouched
    for _ in range(10):
        cal.observe(0.95, False)
    assert cal.rate(0.99) == pytest.approx(3.8 / 14)  # scores 0.9-1.0 share a cell


def test_a_draft_models_cells_and_the_tries_learn_apart():
    """A small model's q and a trie's count ratio mean different things: evidence on one
    kind leaves the other's cells as they were."""
    cal = Calibration(memory=None)  # every edge counts alike, whatever its order
    assert cal.rate(0.85, kind=MODEL) == pytest.approx(0.85) == cal.rate(0.85)
    for _ in range(200):  # the trie's 0.9 edges are wrong nine times in ten
        cal.observe(0.9, False)
    bf16 = CostModel([1, 2, 4, 8, 16], [0.19, 0.20, 0.21, 0.23, 0.29])  # about Qwen 1.5B bf16, AVX512_BF16
    scores = [0.9 ** d for d in range(1, 9)]  # a chain, 0.9 at every edge
    model_chain = TokenTree(tuple(range(1, 9)), tuple(range(-1, 7)), tuple(scores), kinds=(MODEL,) * 8)
    assert best_size(model_chain, 1, bf16, cal) == 8
    assert best_size(scored_chain(scores), 1, bf16, cal) <= 1  # the same chain from the trie: a node at most
    for _ in range(200):  # evidence overrides the prior: this model's 0.9 is right half the time
        cal.observe(0.9, False, kind=MODEL)
        cal.observe(0.9, True, kind=MODEL)
    assert cal.rate(0.9, kind=MODEL) == pytest.approx(0.5, abs=0.01)
    assert cal.rate(0.8, kind=MODEL) == pytest.approx(0.85)  # another score bin: still the prior


def test_a_merged_node_is_of_the_model_kind_when_a_model_proposed_it():
    from triespec.drafters.merged import merge

    trie = TokenTree((5, 6), (-1, 0), (1.0, 1.0))
    model = TokenTree((5, 7, 8), (-1, 0, 0), (0.9, 0.5, 0.3), kinds=(MODEL,) * 3)
    merged = merge([trie, model], max_nodes=8, max_depth=8)
    assert dict(zip(merged.tokens, merged.kinds)) == {5: MODEL, 6: TRIE, 7: MODEL, 8: MODEL}
    assert merged.prefix(max_nodes=2).kinds == merged.kinds[:2]


def test_a_watched_tree_teaches_each_edge_as_soon_as_a_token_decides_it():
    cal = Calibration(prior=4.0)  # 3.8 of 4 pseudo-edges accepted
    chain = scored_chain([1.0, 1.0, 1.0])  # tokens 1, 2, 3 at depths 1, 2, 3
    watched = Watched(start=5, tree=chain)
    seq = [0] * 5
    assert not watched.update(cal, seq + [1])  # depth 1 decided (right), the rest not yet
    assert cal.rate(1.0) == pytest.approx(4.8 / 5)
    assert not watched.update(cal, seq + [1])  # nothing new: nothing learned twice
    assert cal.rate(1.0) == pytest.approx(4.8 / 5)
    assert watched.update(cal, seq + [1, 2, 7])  # depth 2 right, depth 3 wrong: decided
    assert cal.rate(1.0) == pytest.approx(5.8 / 7) and cal.drafted[cal._cell(1.0)] == 7


def test_calibration_follows_a_change_of_traffic():
    # Long after trie edges were mostly wrong (open questions), they become mostly right
    # (questions on a passage): a cell that remembers ~16 edges follows within ~16.
    forgetting, counting = Calibration(), Calibration(memory=None)
    for cal in (forgetting, counting):
        for _ in range(300):
            cal.observe(1.0, False)
        for _ in range(20):
            cal.observe(1.0, True)
    assert forgetting.rate(1.0) > 0.65 and counting.rate(1.0) < 0.1
    assert forgetting.drafted[forgetting._cell(1.0)] == pytest.approx(16.0)
    with pytest.raises(ValueError, match="memory"):
        Calibration(memory=2.0)  # not even the prior and one edge


def test_a_batch_spends_its_budget_on_the_likeliest_nodes_of_any_row():
    sure, unsure = scored_chain([1.0] * 4), scored_chain([0.5, 0.25, 0.125, 0.0625])  # edges 1.0 and 0.5
    cal = Exact()
    flat = CostModel([1, 64], [1.0, 1.0])
    assert best_sizes([sure, unsure], 2, flat, cal) == [4, 4]  # free tokens: every row takes all
    # a compute-bound forward already fed 32 rows' tokens: each more token costs 1/64 more
    loaded = CostModel([1, 32, 96], [1.0, 1.0, 2.0])
    assert best_sizes([sure, unsure], 32, loaded, cal, others=30) == [4, 0]
    # alone, the unsure row's nodes are free on the same curve
    assert best_sizes([unsure], 1, loaded, cal)[0] == 4
    assert best_sizes([unsure], 1, loaded, cal) == [best_size(unsure, 1, loaded, cal)]
    assert best_sizes([TokenTree(), sure], 2, flat, cal) == [0, 4]


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
    assert sum(engine.budget.calibration.drafted) > sum(Calibration().drafted) + 40  # it learned from its trees


def test_adaptive_cut_follows_the_cost_curve():
    model = make_model("llama", seed=2)
    prompt = repetitive_prompt(2)
    expected = plain_greedy(model, prompt, 30)
    engine = Engine(model, decoding_length=16, branch_length=6, adaptive=True)
    engine.generate(prompt, max_new_tokens=30)  # the memory now holds the answer

    # smoothing=0: real steps (a millisecond each) must not reshape the curves under test
    engine.budget.cost = CostModel([1, 64], [1.0, 64.0], smoothing=0.0)  # nothing pays
    never = engine.generate(prompt, max_new_tokens=30)
    assert never.token_ids == expected and set(never.stats.draft_sizes[1:]) == {0}

    engine.budget.cost = CostModel([1, 64], [1.0, 1.0], smoothing=0.0)  # everything pays
    always = engine.generate(prompt, max_new_tokens=30)
    assert always.token_ids == expected and always.stats.steps < never.stats.steps


def test_the_gate_backs_off_a_drafter_that_costs_more_than_it_brings():
    cost = CostModel([1, 64], [1.0, 1.0])
    gate = Gate(cost)
    gate.observe(tokens=1, fed=1, draft_seconds=0.8, model_seconds=1.0)  # 1.8 s for one token
    skipped = []
    for _ in range(4):  # skips 1 step, then drafts and loses again, then skips 2
        n = 0
        while not gate.wanted():
            n += 1
        skipped.append(n)
        gate.observe(tokens=1, fed=1, draft_seconds=0.8, model_seconds=1.0)
    assert skipped == [1, 2, 4, 8]
    for _ in range(8):
        while not gate.wanted():
            pass
        gate.observe(tokens=4, fed=1, draft_seconds=0.8, model_seconds=1.0)  # 1.8 s for 4 tokens pays
    assert gate.wanted() and gate.backoff == 1


def test_only_drafters_that_run_forwards_are_gated():
    model = tiny_model("llama")
    assert Engine(model).budget.gate is None  # the trie: the cut alone decides
    assert Engine(model, drafter=ModelDrafter(model)).budget.gate is not None
    assert Engine(model, drafter=MergedDrafter([TrieDrafter(), ModelDrafter(model)])).budget.gate is not None
    assert Engine(model, drafter=ModelDrafter(model), adaptive=False).budget is None


class SlowWrongDrafter(Drafter, DraftSession):
    """Takes 30 ms to propose a wrong chain."""

    costly = True

    def __init__(self):
        self.calls = 0

    def begin(self, prompt_ids, sampling=None):
        return self

    def propose(self, max_nodes, max_depth, allow_costly=None):
        if allow_costly is not None and not allow_costly(TokenTree()):
            return TokenTree()
        self.calls += 1
        time.sleep(0.03)
        n = min(4, max_depth, max_nodes)
        return TokenTree((1,) * n, tuple(range(-1, n - 1)), (0.9,) * n) if n > 0 else TokenTree()

    def learn(self, new_ids):
        pass

    def end(self):
        pass


def test_an_adaptive_engine_stops_running_a_drafter_that_does_not_pay():
    model = tiny_model("llama")
    prompt = repetitive_prompt(1)
    drafter = SlowWrongDrafter()
    result = Engine(model, drafter=drafter, adaptive=True).generate(prompt, max_new_tokens=40)
    assert result.token_ids == plain_greedy(model, prompt, 40)
    assert drafter.calls < result.stats.steps / 2


def trusted_hybrid():
    """A hybrid engine (a trie whose drafts are trusted, beside a slow wrong draft model),
    the draft model, a prompt and its plain answer."""
    model = tiny_model("llama")
    prompt = repetitive_prompt(1)
    slow = SlowWrongDrafter()
    engine = Engine(model, drafter=MergedDrafter([TrieDrafter(decoding_length=16), slow]))
    engine.budget.calibration = Exact()
    return engine, slow, prompt, plain_greedy(model, prompt, 40)


def test_a_gated_hybrid_still_drafts_from_the_trie():
    engine, slow, prompt, expected = trusted_hybrid()
    engine.budget.gate.skip = 10**6  # the draft model never pays
    result = engine.generate(prompt, max_new_tokens=40)
    assert result.token_ids == expected and slow.calls == 0
    assert max(result.stats.draft_sizes) > 0


def test_the_gate_leaves_the_draft_model_out_where_the_trie_is_worth_as_much():
    gate = Gate(CostModel([1, 64], [0.2, 0.3]))
    assert not gate.enough(20.0)  # nothing seen yet: run the draft models to find out
    gate.observe(tokens=7, fed=1, draft_seconds=0.6, model_seconds=0.3)  # 7 tokens, 3 tokens' worth of drafting
    # 7 tokens in 0.2 + 0.6 s beat the trie's 1.74 in 0.2 s, not its 1.76
    assert gate.enough(1.76) and not gate.enough(1.74)
    for _ in range(gate.longest):  # steps without the draft models: their averages go stale
        assert gate.wanted()
    assert not gate.enough(20.0)  # so they run again, whatever the trie offers
    gate.observe(tokens=7, fed=1, draft_seconds=0.6, model_seconds=0.3)
    assert gate.enough(1.76)


def test_an_adaptive_engine_prices_the_draft_models_expansion():
    model = tiny_model("llama")
    auto, given = ModelDrafter(model), ModelDrafter(model, min_score=0.05)
    Engine(model, drafter=MergedDrafter([TrieDrafter(), auto]))
    Engine(model, drafter=given)
    draft_cost, target_cost = CostModel.of(model, model.config, 3), CostModel.of(model, model.config, 33)
    assert auto.min_score == pytest.approx(min(max(draft_cost(1) / target_cost(1), 0.1), 0.9))
    assert given.min_score == 0.05  # what the user set is kept
    fixed = ModelDrafter(model)
    Engine(model, drafter=fixed, adaptive=False)
    assert fixed.min_score == 0.1


def test_a_hybrid_skips_its_draft_model_while_the_trie_copies():
    engine, slow, prompt, expected = trusted_hybrid()
    engine.drafter.learn_text(expected)  # the trie knows the answer
    engine.budget.gate.observe(tokens=3, fed=1, draft_seconds=0.0, model_seconds=0.1)  # the model's steps gave 3
    engine.budget.gate.wanted = lambda: True  # (the gate's back-off alone would also skip this wrong drafter)
    result = engine.generate(prompt, max_new_tokens=40)
    assert result.token_ids == expected
    assert slow.calls < result.stats.steps / 2  # run only where the trie had less than 3 tokens to offer


def test_an_adaptive_batch_stays_exact():
    model = tiny_model("llama")
    prompts = [repetitive_prompt(seed) for seed in range(3)]
    expected = [plain_greedy(model, p, 30) for p in prompts]
    engine = Engine(model, decoding_length=16, branch_length=6)
    for answer in expected[:2]:
        engine.drafter.learn_text(answer)
    engine.budget.calibration = Exact()  # trust the trie, so that the batch's cut keeps nodes
    results = engine.generate(prompts, max_new_tokens=30)
    assert [r.token_ids for r in results] == expected
    assert max(max(r.stats.draft_sizes) for r in results) > 0


def test_the_gate_learns_from_batches_too():
    """A batch whose rows all ran the draft model teaches the gate what they gave: the
    slow wrong drafter is backed off in a batch as it is alone."""
    model = tiny_model("llama")
    prompts = [repetitive_prompt(seed) for seed in range(2)]
    drafter = SlowWrongDrafter()
    engine = Engine(model, drafter=drafter, cost=CostModel([1, 64], [0.01, 0.01], smoothing=0.0))
    results = engine.generate(prompts, max_new_tokens=30)
    assert [r.token_ids for r in results] == [plain_greedy(model, p, 30) for p in prompts]
    assert engine.budget.gate.seen > 0 and engine.budget.gate.backoff > 1  # it learned drafting loses
    assert drafter.calls < 2 * results[0].stats.steps / 2


def test_a_cold_start_times_only_a_few_sizes(monkeypatch):
    fed, real = [], budget.forward

    def counted(model, packed, cache, logits_to_keep):
        fed.append((logits_to_keep, cache.get_seq_length()))
        return real(model, packed, cache, logits_to_keep=logits_to_keep)

    monkeypatch.setattr(budget, "forward", counted)
    timed = [1, 2, 4, 8, 16, 32, 33]
    for kernels, timings in (("torch", 1), ("auto", 2)):  # auto: the same curve, timed on each kernels
        fed.clear()
        engine = Engine(make_model("llama"), decoding_length=32, kernels=kernels, budget_cache=False)
        assert fed == ([(1, 64)] + [(n, 64) for n in timed]) * timings  # a warm-up, then each size once
        assert engine.budget.cost.sizes == list(range(1, 34))
        assert engine.budget.cost.confirmed == [n in timed for n in range(1, 34)]
        assert engine.budget.cost.stepped == [False] * 33  # timed, but no real step has shown a size yet


def test_a_first_real_step_confirms_a_size_and_takes_a_lower_time_whole():
    cost = CostModel([1, 2, 3, 4, 5], [1.0, 2.0, 3.0, 4.0, 5.0], confirmed=[True, True, False, False, True])
    cost.observe(4, 2.5)  # priced 4.0 on the line: the cut would have avoided it for good
    assert cost.seconds[3] == 2.5 and cost.confirmed[3]
    assert cost.seconds[2] == pytest.approx(2.25)  # still unconfirmed: on the line 2 -> 4
    cost.observe(3, 3.25)  # slower than its line: by smoothing, like any step
    assert cost.seconds[2] == pytest.approx(2.25 + 0.2 * 1.0) and cost.confirmed[2]
    cost.observe(3, 1.0)  # confirmed: smoothing both ways
    assert cost.seconds[2] == pytest.approx(2.45 + 0.2 * (1.0 - 2.45))


def test_a_size_only_timed_at_start_takes_its_first_real_step_whole():
    # the start-up timed 4 tokens in a burst of load: confirmed, but no real step seen
    cost = CostModel([1, 2, 4], [1.0, 1.1, 4.0], stepped=[True, True, False])
    assert cost.unstepped(2, 4) == 4 and cost.unstepped(4, 8) is None and cost.unstepped(1, 3) is None
    cost.observe(4, 1.2)
    assert cost.seconds[2] == pytest.approx(1.2) and cost.stepped[2]
    cost.observe(4, 2.2)  # now like any step: by smoothing
    assert cost.seconds[2] == pytest.approx(1.2 + 0.2 * 1.0)
    assert CostModel([1, 2], [1.0, 1.0]).stepped == [True, True]  # a curve given whole is known
    # what the cut could choose were the unshown sizes too dear: none cheaper than a smaller shown one
    hopeful = CostModel([1, 2, 4, 8], [1.0, 2.0, 4.0, 9.0], stepped=[True, False, True, False]).hopeful()
    assert hopeful.seconds == [1.0, 1.0, 4.0, 4.0]
    with pytest.raises(ValueError, match="stepped"):
        CostModel([1, 2], [1.0, 1.0], confirmed=[True, False], stepped=[True, True])


def test_at_least_grows_a_batch_by_its_likeliest_nodes():
    linear = CostModel([1, 64], [1.0, 64.0])  # no draft pays
    trees = [scored_chain([0.9, 0.9]), scored_chain([0.95, 0.2])]
    assert best_sizes(trees, 2, linear, Exact()) == [0, 0]
    assert best_sizes(trees, 2, linear, Exact(), at_least=5) == [2, 1]  # 0.95, 0.9, 0.81
    assert best_sizes(trees, 2, linear, Exact(), at_least=99) == [2, 2]  # as many as the trees hold


def spend(budget_: Budget, seconds: float) -> None:
    """Plain steps of one token, a second each: what the budget's probes get a share of."""
    for _ in range(round(seconds)):
        budget_.observe(1, 1.0, None)


def test_a_budget_probes_a_size_no_real_step_has_shown():
    # Flat in truth, but the start-up timed 8 tokens in a burst of load: the cut avoids 8
    # and, without a real step of it, would for good.
    cost = CostModel([1, 2, 4, 8], [1.0, 1.0, 1.0, 3.0], stepped=[True, True, True, False])
    budget_ = Budget(cost, calibration=Exact())
    chain = scored_chain([0.9] * 7)
    assert best_sizes([chain], 1, cost, Exact()) == [3]  # 4 tokens fed: the cut alone
    # grown to the 8 tokens no step has shown: at 4 tokens' price it costs nothing more
    assert budget_.plan([chain], 1) == [7]
    budget_.observe(8, 1.0, None)
    assert cost(8) == 1.0 and cost.stepped == [True] * 4
    assert budget_.plan([chain], 1) == [7]  # now by the cut itself
    # Steep, 8 priced 9.0: a probe only where 8 tokens would pay at 4 tokens' price (4.0),
    # and once the share of what decoding spent holds those 3.0 beyond the cut's 1.0
    for score, grown in ((0.2, [0]), (0.99, [7])):
        budget_ = Budget(CostModel([1, 2, 4, 8], [1.0, 2.0, 4.0, 9.0], stepped=[True, True, True, False]),
                         calibration=Exact())
        tree = scored_chain([score] * 7)
        assert best_sizes([tree], 1, budget_.cost, Exact()) == [0]
        spend(budget_, 59.0)
        assert budget_.plan([tree], 1) == [0]
        spend(budget_, 1.0)
        assert budget_.plan([tree], 1) == grown


def test_probes_spend_at_most_their_share_of_the_forwards():
    cost = CostModel([1, 2, 4, 8, 16], [1.0, 1.0, 1.0, 3.0, 6.0], stepped=[True, True, True, False, False])
    budget_ = Budget(cost, calibration=Exact())
    chain = scored_chain([0.99] * 15)
    assert budget_.plan([chain], 1) == [7]  # a probe of 8 tokens, hoped to cost what 4 do
    budget_.observe(8, 3.0, None)  # 8 tokens really cost 3.0: 2.0 beyond the cut's 1.0
    assert budget_.probes_spent == 2.0
    # 16 is hoped to cost what 8 does, 2.0 beyond the cut: it waits for 5% of 80.0 to hold 4.0
    assert budget_.plan([chain], 1) == [3]
    spend(budget_, 76.0)
    assert budget_.plan([chain], 1) == [3]
    spend(budget_, 1.0)
    assert budget_.plan([chain], 1) == [15]
    budget_.observe(16, 6.0, None)
    budget_.observe(64, 50.0, None)  # a prefill is not decoding: it buys no probe
    assert budget_.spent == 86.0 and budget_.probes_spent == 2.0 + 5.0
