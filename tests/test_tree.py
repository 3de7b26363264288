import pytest
import torch

from triespec import TokenTree


def test_chain_is_a_tree_with_consecutive_parents():
    tree = TokenTree.chain([5, 6, 7])
    assert tree.parents == (-1, 0, 1)
    assert tree.depths == (1, 2, 3)
    assert tree.depth == 3
    assert torch.equal(tree.ancestors, torch.ones(3, 3, dtype=torch.bool).tril())


def test_ancestors_cover_exactly_the_path():
    #        root
    #       /    \
    #      0(a)   1(b)
    #     /  \      \
    #   2(c) 3(d)   4(e)
    tree = TokenTree((10, 11, 12, 13, 14), (-1, -1, 0, 0, 1))
    assert tree.depths == (1, 1, 2, 2, 2)
    assert tree.path(3) == [0, 3]
    assert tree.path(-1) == []
    expected = torch.tensor([
        [1, 0, 0, 0, 0],
        [0, 1, 0, 0, 0],
        [1, 0, 1, 0, 0],
        [1, 0, 0, 1, 0],
        [0, 1, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(tree.ancestors, expected)


def test_prefix_drops_descendants_of_dropped_nodes():
    tree = TokenTree((10, 11, 12, 13, 14), (-1, 0, 1, -1, 3), scores=(0.9, 0.8, 0.7, 0.5, 0.4))
    cut = tree.prefix(max_depth=2)
    assert cut.tokens == (10, 11, 13, 14)
    assert cut.parents == (-1, 0, -1, 2)
    assert cut.scores == (0.9, 0.8, 0.5, 0.4)
    assert tree.prefix(max_nodes=2).tokens == (10, 11)
    assert len(tree.prefix(max_nodes=0)) == 0
    assert tree.prefix() is tree


@pytest.mark.parametrize("tokens,parents", [
    ((1, 2), (-1,)),          # lengths differ
    ((1, 2), (-1, 1)),        # a node is its own parent
    ((1, 2), (-1, 5)),        # parent after the child
    ((1,), (-2,)),            # parent below -1
    ((-3,), (-1,)),           # negative token
])
def test_malformed_trees_are_rejected(tokens, parents):
    with pytest.raises(ValueError):
        TokenTree(tokens, parents)
