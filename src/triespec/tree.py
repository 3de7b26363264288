"""TokenTree: the one draft type, for chains and trees alike.

A tree holds draft tokens in topological order: node i's parent is `parents[i]`, an
earlier node, or -1 when node i continues the last committed token (the *root*, which
is not part of the tree). A chain is the tree with parents = [-1, 0, 1, ...].
Everything a forward pass needs (depths, which node may attend to which) is derived
here once per tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch


# Kinds of node scores. TRIE: a count ratio (a trie's, or another drafter's that is not a
# probability). MODEL: a draft model's probability of the node's path (the product of q).
TRIE, MODEL = 0, 1
KINDS = (TRIE, MODEL)


@dataclass(frozen=True)
class TokenTree:
    tokens: tuple[int, ...] = ()
    parents: tuple[int, ...] = ()
    # Estimated probability that each node is accepted (drafter's own guess, in [0, 1]).
    # Drafters fill it so that a tree can be cut to its most promising nodes.
    scores: tuple[float, ...] | None = field(default=None, compare=False)
    # [n, V]: the distribution q each node's token was drawn from (a small model's draft);
    # None for drafters without probabilities (the trie), whose choices count as one-hot.
    draft_probs: torch.Tensor | None = field(default=None, compare=False)
    # What each node's score is (TRIE or MODEL; None: all TRIE). The adaptive budget
    # calibrates each kind apart: a trie's count ratio and a draft model's q mean
    # different things.
    kinds: tuple[int, ...] | None = field(default=None, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "tokens", tuple(int(t) for t in self.tokens))
        object.__setattr__(self, "parents", tuple(int(p) for p in self.parents))
        if len(self.tokens) != len(self.parents):
            raise ValueError(f"TokenTree: {len(self.tokens)} tokens but {len(self.parents)} parents")
        for i, p in enumerate(self.parents):
            if not -1 <= p < i:
                raise ValueError(f"TokenTree: node {i} has parent {p}; parents must be -1 or an earlier node")
        if any(t < 0 for t in self.tokens):
            raise ValueError("TokenTree: token ids must be >= 0")
        if self.scores is not None and len(self.scores) != len(self.tokens):
            raise ValueError("TokenTree: scores must have one entry per node")
        if self.draft_probs is not None and (self.draft_probs.ndim != 2 or len(self.draft_probs) != len(self.tokens)):
            raise ValueError("TokenTree: draft_probs must be [nodes, vocab]")
        if self.kinds is not None:
            object.__setattr__(self, "kinds", tuple(int(k) for k in self.kinds))
            if len(self.kinds) != len(self.tokens) or any(k not in KINDS for k in self.kinds):
                raise ValueError(f"TokenTree: kinds must have one of {KINDS} per node")

    @classmethod
    def chain(cls, tokens) -> TokenTree:
        tokens = list(tokens)
        return cls(tuple(tokens), tuple(range(-1, len(tokens) - 1)))

    def __len__(self) -> int:
        return len(self.tokens)

    @cached_property
    def depths(self) -> tuple[int, ...]:
        """Depth of each node; children of the root have depth 1."""
        depths: list[int] = []
        for p in self.parents:
            depths.append(1 if p < 0 else depths[p] + 1)
        return tuple(depths)

    @property
    def depth(self) -> int:
        return max(self.depths, default=0)

    @cached_property
    def children(self) -> dict[int, list[int]]:
        """Children of each node, in tree order; key -1 is the root."""
        children: dict[int, list[int]] = {i: [] for i in range(-1, len(self))}
        for i, p in enumerate(self.parents):
            children[p].append(i)
        return children

    @cached_property
    def ancestors(self) -> torch.Tensor:
        """[n, n] bool: ancestors[i, j] is True when j is i or one of its ancestors."""
        n = len(self)
        mask = torch.zeros(n, n, dtype=torch.bool)
        for i, p in enumerate(self.parents):
            if p >= 0:
                mask[i] = mask[p]
            mask[i, i] = True
        return mask

    def path(self, node: int) -> list[int]:
        """Node indices from the root's child down to `node` (inclusive); [] for the root (-1)."""
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def prefix(self, max_nodes: int | None = None, max_depth: int | None = None) -> TokenTree:
        """The first `max_nodes` nodes that lie at depth <= `max_depth`.

        Nodes are topologically ordered, so any such selection is again a tree (a
        dropped node's descendants are dropped with it).
        """
        keep: list[int] = []
        new_index = {-1: -1}
        for i, (p, d) in enumerate(zip(self.parents, self.depths)):
            if max_nodes is not None and len(keep) >= max_nodes:
                break
            if (max_depth is not None and d > max_depth) or p not in new_index:
                continue
            new_index[i] = len(keep)
            keep.append(i)
        if len(keep) == len(self):
            return self
        return TokenTree(
            tuple(self.tokens[i] for i in keep),
            tuple(new_index[self.parents[i]] for i in keep),
            None if self.scores is None else tuple(self.scores[i] for i in keep),
            None if self.draft_probs is None else self.draft_probs[keep],
            None if self.kinds is None else tuple(self.kinds[i] for i in keep),
        )
