import random
from collections import Counter

import pytest

from triespec import Trie, TrieDrafter
from triespec.drafters.trie import NgramStream


def substring_counts(seq, n):
    counts = Counter()
    for i in range(len(seq)):
        for j in range(i + 1, min(i + n, len(seq)) + 1):
            counts[tuple(seq[i:j])] += 1
    return counts


def test_stream_counts_every_ngram_once():
    rng = random.Random(0)
    seq = [rng.randrange(6) for _ in range(300)]
    trie = Trie()
    stream = NgramStream(trie, 4)
    for i in range(0, len(seq), 7):  # fed in uneven chunks, as outputs arrive
        stream.feed(seq[i : i + 7])
    expected = substring_counts(seq, 4)
    assert len(trie) == len(expected)
    for gram, count in expected.items():
        assert trie.find(gram).count == count
    assert trie.find([99]) is None
    trie.check()


def test_insert_counts_prefixes():
    trie = Trie()
    trie.insert([1, 2, 3])
    trie.insert([1, 2, 4])
    assert trie.find([1]).count == 2 and trie.find([1, 2]).count == 2
    assert trie.find([1, 2, 3]).count == 1 and len(trie) == 4
    trie.check()


def test_checker_catches_inconsistent_counts():
    trie = Trie()
    trie.insert([1, 2])
    trie.find([1, 2]).count = 5  # a child seen more often than its parent: impossible
    with pytest.raises(AssertionError):
        trie.check()
    trie.find([1, 2]).count = 1
    trie.num_nodes = 7
    with pytest.raises(AssertionError):
        trie.check()


def test_prune_keeps_frequent_ngrams_and_respects_the_budget():
    trie = Trie(max_nodes=200)
    frequent = [7, 8, 9, 10]
    rng = random.Random(1)
    for i in range(2000):
        trie.insert(frequent if i % 3 == 0 else [rng.randrange(50, 5000) for _ in range(4)])
        assert len(trie) <= 200
    trie.check()
    assert trie.prunes > 0
    assert trie.find(frequent) is not None  # decayed, but far above the one-off n-grams


def test_memory_bound_after_a_million_tokens():
    drafter = TrieDrafter(decoding_length=8, branch_length=3, match_length=1, max_nodes=20_000)
    rng = random.Random(2)
    phrase = [1, 2, 3, 4, 5]
    fed = 0
    while fed < 1_000_000:
        answer = [rng.randrange(10, 30_000) for _ in range(995)] + phrase
        session = drafter.begin([rng.randrange(10, 30_000) for _ in range(3)])
        session.learn(answer)
        session.end()
        fed += len(answer)
        assert len(drafter.memory) <= 20_000
    drafter.memory.check()
    # the phrase recurs in every answer: it survives the decay and is drafted
    tree = drafter.begin([1, 2]).propose(8, 3)
    assert tree.tokens[:3] == (3, 4, 5)


def test_retrieval_follows_the_context():
    drafter = TrieDrafter(decoding_length=16, branch_length=4)
    prompt = [50, 1, 2, 3, 4, 5, 6, 60, 1, 2]
    tree = drafter.begin(prompt).propose(16, 8)
    assert tree.tokens[:4] == (3, 4, 5, 6)
    assert tree.parents[:4] == (-1, 0, 1, 2)
    assert tree.depth <= 4 and len(tree) <= 16


def test_hierarchical_branches_share_prefixes_and_scores_fall_along_paths():
    # after "1 2" the context continued with "3 4" twice and "3 5" once
    prompt = [1, 2, 3, 4, 9, 1, 2, 3, 4, 8, 1, 2, 3, 5, 7, 1, 2]
    tree = TrieDrafter(decoding_length=16, branch_length=3).begin(prompt).propose(16, 3)
    first = [i for i, p in enumerate(tree.parents) if p == -1]
    assert [tree.tokens[i] for i in first] == [3]  # one shared node for "3"
    children = {tree.tokens[i]: i for i, p in enumerate(tree.parents) if p == first[0]}
    assert set(children) == {4, 5}
    assert tree.scores[children[4]] > tree.scores[children[5]]
    for i, p in enumerate(tree.parents):
        assert 0 < tree.scores[i] <= (1.0 if p < 0 else tree.scores[p])


def test_parallel_and_single_modes():
    prompt = [1, 2, 3, 4, 9, 1, 2, 3, 4, 8, 1, 2, 3, 5, 7, 1, 2]
    parallel = TrieDrafter(decoding_length=16, branch_length=3, mode="parallel").begin(prompt).propose(16, 3)
    starts = [i for i, p in enumerate(parallel.parents) if p == -1]
    assert len(starts) >= 2
    for i, p in enumerate(parallel.parents):  # every branch is a chain
        assert p == -1 or p == i - 1
    assert all(parallel.tokens[i] == 3 for i in starts)  # prefixes repeated per branch

    single = TrieDrafter(decoding_length=16, branch_length=3, mode="single").begin(prompt).propose(16, 3)
    assert single.tokens == (3, 4, 9) or single.tokens == (3, 4, 8)
    assert single.parents == (-1, 0, 1)


def test_budget_and_depth_limits():
    prompt = list(range(40)) * 3
    session = TrieDrafter(decoding_length=10, branch_length=5).begin(prompt[:-5])
    assert len(session.propose(100, 100)) <= 10
    assert session.propose(100, 2).depth <= 2
    assert len(session.propose(3, 100)) <= 3
    assert len(session.propose(0, 5)) == 0 and len(session.propose(5, 0)) == 0


def test_memory_persists_across_requests_and_context_does_not():
    drafter = TrieDrafter(decoding_length=16, branch_length=6)
    prompt = list(range(100, 100 + 2 * drafter.match_length))
    first = drafter.begin(prompt)
    first.learn([7, 8, 9, 10, 11, 12])
    first.end()
    # a new request ending with the same tokens is drafted from the first answer
    tree = drafter.begin([55] + prompt[-2:]).propose(16, 6)
    assert tree.tokens[:6] == (7, 8, 9, 10, 11, 12)
    # prompt-only n-grams (more than match_length tokens before the answer) are not kept after the request
    assert drafter.memory.find([100]) is None and drafter.memory.find(prompt[-drafter.match_length:]) is not None


def test_learn_text_warms_the_memory():
    drafter = TrieDrafter(decoding_length=8, branch_length=4)
    drafter.learn_text([5, 6, 7, 8, 9])
    assert drafter.begin([1, 5, 6]).propose(8, 4).tokens[:3] == (7, 8, 9)


@pytest.mark.parametrize("kwargs", [
    {"decoding_length": 0}, {"branch_length": 0}, {"match_length": 0}, {"mode": "wide"},
    {"memory_weight": -1.0}, {"max_nodes": 0}, {"decoding_length": 2.5}, {"min_score": 1.5}, {"smoothing": -1},
])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        TrieDrafter(**kwargs)


def test_min_score_leaves_out_unlikely_nodes():
    # after "1 2": "3" four times, "4" once
    prompt = [1, 2, 3, 9, 1, 2, 3, 8, 1, 2, 3, 7, 1, 2, 3, 6, 1, 2, 4, 5, 1, 2]
    everything = TrieDrafter(decoding_length=16, branch_length=2).begin(prompt).propose(16, 2)
    assert 4 in everything.tokens
    confident = TrieDrafter(decoding_length=16, branch_length=2, min_score=0.5, smoothing=1.0).begin(prompt).propose(16, 2)
    assert confident.tokens == (3,)  # P(3) = 4 / (5 + 1): the fifth "1 2" is the one being continued
    assert all(s >= 0.5 for s in confident.scores)


def test_memory_estimate_is_not_drowned_by_the_context():
    drafter = TrieDrafter(decoding_length=8, branch_length=3, min_score=0.4, smoothing=1.0)
    for _ in range(3):
        drafter.learn_text([1, 2, 7, 8, 9])
    # the context has seen "1 2" once before, followed by 5 (P = 1/3); memory says 7 8 9
    # every time (P = 3/4, 9/16, 27/64)
    tree = drafter.begin([1, 2, 5, 0, 1, 2]).propose(8, 3)
    assert tree.tokens[:3] == (7, 8, 9)
