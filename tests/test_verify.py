import torch

from triespec import TokenTree, verify_greedy

V = 20


def logits_for(argmaxes: list[int]) -> torch.Tensor:
    """Logits whose row r has its maximum at argmaxes[r]."""
    logits = torch.randn(len(argmaxes), V)
    logits[torch.arange(len(argmaxes)), argmaxes] = 100.0
    return logits


def test_all_wrong_draft_still_yields_the_bonus_token():
    tree = TokenTree((3, 4, 5), (-1, 0, -1))
    verdict = verify_greedy(tree, logits_for([7, 0, 0, 0]))
    assert verdict.nodes == [] and verdict.tokens == [7]


def test_empty_tree_is_plain_decoding():
    verdict = verify_greedy(TokenTree(), logits_for([9]))
    assert verdict.tokens == [9]


def test_longest_matching_branch_wins():
    # root -> 3 -> 4 -> 5   and   root -> 3 -> 6
    tree = TokenTree((3, 4, 5, 6), (-1, 0, 1, 0))
    # the model says: after root 3, after node0 (3) 4, after node1 (4) 5, after node2 (5) 11
    verdict = verify_greedy(tree, logits_for([3, 4, 5, 11, 0]))
    assert verdict.nodes == [0, 1, 2]
    assert verdict.tokens == [3, 4, 5, 11]


def test_duplicate_siblings_are_all_checked():
    # two parallel branches start with the same token; only the second continues correctly
    tree = TokenTree((3, 8, 3, 4), (-1, 0, -1, 2))
    verdict = verify_greedy(tree, logits_for([3, 4, 0, 4, 12]))
    assert verdict.nodes == [2, 3]
    assert verdict.tokens == [3, 4, 12]


def test_match_requires_the_parent_to_match():
    # node1's token equals the model's choice after node0, but node0 itself is rejected
    tree = TokenTree((3, 4), (-1, 0))
    verdict = verify_greedy(tree, logits_for([5, 4, 0]))
    assert verdict.nodes == [] and verdict.tokens == [5]
