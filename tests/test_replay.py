"""Replaying recorded greedy outputs through the engine's own step, an oracle for the model."""

import copy

import pytest

import triespec.engine
from conftest import EOS, ScriptedDrafter, plain_greedy, repetitive_prompt, tiny_model
from triespec import TokenTree
from triespec.budget import CostModel
from triespec.kv import keep_paths
from triespec.replay import Oracle, ReplayEngine, replay

FLAT = CostModel([1, 64], [1.0, 1.0])  # a forward costs the same whatever it is fed: every draft pays
LINEAR = CostModel([1, 64], [1.0, 64.0], smoothing=0.0)  # every token fed costs a forward's worth: none pays


@pytest.fixture(scope="module")
def recorded():
    """Plain greedy outputs of the tiny model, each prompt twice: the second time the
    drafter's memory holds the first answer, so drafts are accepted."""
    model = tiny_model("llama")
    generations = []
    for seed in range(3):
        prompt = repetitive_prompt(seed)
        generations.append((prompt, plain_greedy(model, prompt, 40)))
    return generations + generations


@pytest.mark.parametrize("adaptive", [False, True])
def test_replayed_outputs_are_the_recorded_ones(recorded, adaptive):
    engine = ReplayEngine(Oracle(recorded, FLAT), adaptive=adaptive, decoding_length=8)
    for prompt, output in recorded:
        assert engine.generate(prompt, max_new_tokens=len(output)).token_ids == output
    result = replay(recorded, FLAT, adaptive=adaptive, decoding_length=8)  # raises if an output differs
    assert sum(s.new_tokens for s in result.stats) == sum(len(output) for _, output in recorded)


def test_a_batch_replays_every_row():
    """Rows of different lengths leave the batch at different steps: the oracle follows
    each through the cache."""
    model = tiny_model("llama")
    prompts = [repetitive_prompt(seed, length) for seed, length in ((3, 12), (4, 30), (5, 20))]
    outputs = [plain_greedy(model, p, n) for p, n in zip(prompts, (10, 30, 20))]
    engine = ReplayEngine(Oracle(zip(prompts, outputs), FLAT), decoding_length=8)
    rows = engine.generate(prompts, max_new_tokens=[len(o) for o in outputs])
    assert [r.token_ids for r in rows] == outputs


@pytest.mark.parametrize("adaptive", [False, True])
def test_where_every_draft_pays_the_replay_takes_fewer_steps_than_tokens(recorded, adaptive):
    result = replay(recorded, FLAT, adaptive=adaptive, decoding_length=8)
    assert len(result.tokens_per_step) < sum(len(output) for _, output in recorded)
    assert result.speedup > 1


def test_where_no_draft_pays_the_replay_takes_one_step_per_token(recorded):
    result = replay(recorded, LINEAR, decoding_length=8)
    for stats in result.stats:  # the prefill's forward feeds the prompt: a node can pay there
        assert stats.tokens_per_step[1:] == [1] * (stats.steps - 1)
        assert stats.draft_sizes[1:] == [0] * (stats.steps - 1)
    assert result.seconds == pytest.approx(result.plain_seconds)


@pytest.mark.parametrize("adaptive", [False, True])
def test_charged_seconds_are_the_curve_at_each_step(recorded, adaptive):
    charge = CostModel([1, 2, 4, 8, 16], [1.0, 1.5, 1.7, 2.5, 4.0], context=10, per_context=(0.01, 0.002))
    pristine = copy.deepcopy(charge)
    result = replay(recorded, charge, adaptive=adaptive, cost=copy.deepcopy(charge), decoding_length=8)
    seconds = plain = 0.0
    for (prompt, output), stats in zip(recorded, result.stats):
        done = stats.tokens_per_step[0]  # after the prefill: one pending token and the tree verified
        for tokens, nodes in zip(stats.tokens_per_step[1:], stats.draft_sizes[1:]):
            seconds += pristine(1 + nodes, len(prompt) + done - 1)  # cached: all but the pending token
            plain += sum(pristine(1, len(prompt) + i - 1) for i in range(done, done + tokens))
            done += tokens
    assert result.seconds == pytest.approx(seconds)
    assert result.plain_seconds == pytest.approx(plain)
    assert max(result.tokens_per_step) > 1  # the steps differ from plain decoding's


def test_the_engine_refines_its_own_copy_of_the_charge(recorded):
    """Without a `cost`, the budget decides by the charge's curve but refines a copy: the
    prices of the replay (and of the next replay given the same charge) do not move."""
    charge = CostModel([1, 2, 4, 8, 16], [1.0, 1.5, 1.7, 2.5, 4.0], context=10, per_context=(0.01, 0.002))
    before = list(charge.seconds)
    first = replay(recorded, charge, decoding_length=8)
    assert charge.seconds == before
    assert replay(recorded, charge, decoding_length=8).speedup == pytest.approx(first.speedup)


def test_the_oracle_checks_that_the_cache_keeps_the_accepted_path(recorded, monkeypatch):
    """Trees with a wrong sibling before every right token: accepted nodes are never the
    first ones, so a commit that kept the first entries would keep wrong tokens."""
    prompt, output = recorded[0]
    sequence = prompt + output

    def wrong_first(seq):
        truth = sequence[len(seq) : len(seq) + 4]
        tokens, parents, parent = [], [], -1
        for token in truth:
            tokens += [(token + 1) % EOS, token]
            parents += [parent, parent]
            parent = len(tokens) - 1
        return TokenTree(tuple(tokens), tuple(parents))

    engine = ReplayEngine(Oracle([(prompt, output)], FLAT), adaptive=False, drafter=ScriptedDrafter(wrong_first))
    assert engine.generate(prompt, max_new_tokens=len(output)).token_ids == output

    def first_entries(cache, rows):  # a broken commit: the first entries, not the accepted path's
        return keep_paths(cache, [(past, list(range(past, past + len(path)))) for past, path in rows])

    monkeypatch.setattr(triespec.engine, "keep_paths", first_entries)
    with pytest.raises(RuntimeError, match="cache does not hold its recorded tokens"):
        engine.generate(prompt, max_new_tokens=len(output))


def test_replay_input_errors(recorded):
    prompt, output = recorded[0]
    with pytest.raises(ValueError, match="differ"):
        Oracle([(prompt, output), (prompt, [output[0] + 1])], FLAT)
    with pytest.raises(ValueError, match="non-empty"):
        Oracle([(prompt, [])], FLAT)
    with pytest.raises(ValueError, match="nothing to replay"):
        Oracle([], FLAT)
    with pytest.raises(ValueError, match="vocab_size"):
        Oracle([(prompt, output)], FLAT, vocab_size=max(prompt + output))
    engine = ReplayEngine(Oracle([(prompt, output[:10]), recorded[1]], FLAT), adaptive=False)
    with pytest.raises(ValueError, match="was not recorded"):
        engine.generate(prompt[1:], max_new_tokens=4)
    with pytest.raises(ValueError, match="past its recorded output"):
        engine.generate(prompt, max_new_tokens=11)
    with pytest.raises(ValueError, match="needs the adaptive budget"):
        replay([(prompt, output)], FLAT, calibration=object(), adaptive=False)


def test_a_start_up_timing_caught_by_load_does_not_stick(recorded):
    """Forwards cost the same at every size, but the start-up timed 4 tokens and more ten
    times dearer (a burst of load): the cut alone would never feed them again (9 tokens
    for the price of 10), so their price would stay. The budget's probes show each size
    once, and the curve comes down."""
    timed = [1, 2, 4, 8, 9]  # what a cold start times for decoding_length=8
    dear = CostModel(timed, [1.0, 1.0, 10.0, 10.0, 10.0])
    start = CostModel(list(range(1, 10)), [dear(n) for n in range(1, 10)],
                      confirmed=[n in timed for n in range(1, 10)], stepped=[False] * 9)
    engine = ReplayEngine(Oracle(recorded, FLAT), cost=start, decoding_length=8)
    for prompt, output in recorded * 3:  # the probes wait for 5% of decoding's time to hold their prices
        assert engine.generate(prompt, max_new_tokens=len(output)).token_ids == output
    assert engine.budget.cost.seconds == pytest.approx([1.0] * 9)
    assert all(engine.budget.cost.stepped[n - 1] for n in timed)  # the sizes between follow the line
    decoding = [fed for fed, _, _ in engine.oracle.charged if fed <= 9]
    assert max(decoding[-50:]) > 4  # and the cut feeds the sizes it avoided
