"""Acceptance: which draft tokens the model agrees with.

Terms, used throughout:
- *accepted* tokens: draft tokens on one tree path that the model itself produced there
  (greedy: its argmax; sampling: its sample, by the rule below);
- *bonus* token: the model's own next token after the last accepted one (always
  produced, so a step never yields fewer tokens than plain decoding).

Both verifiers return a Verdict. Logits rows: row 0 predicts the token after the root
(the last committed token), row 1 + i the token after node i.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .sampling import TreeScores
from .tree import TokenTree


@dataclass(frozen=True)
class Verdict:
    nodes: list[int]  # accepted tree nodes, root side first
    tokens: list[int]  # the accepted nodes' tokens followed by the bonus token

    @property
    def num_accepted(self) -> int:
        return len(self.nodes)


def _scores(tree: TokenTree, scores: TreeScores | torch.Tensor) -> TreeScores:
    return scores if isinstance(scores, TreeScores) else TreeScores(scores, tree)


def verify_greedy(tree: TokenTree, scores: TreeScores | torch.Tensor) -> Verdict:
    """Accept the deepest tree path that follows the model's argmax.

    Siblings may repeat a token (parallel branches), so every matching child is
    followed, not just the first: the deepest match wins (ties: the first in tree order).
    """
    scores = _scores(tree, scores)
    best, stack = -1, [-1]
    while stack:
        node = stack.pop()
        target = scores.argmax(node + 1)
        for child in tree.children[node]:
            if tree.tokens[child] == target:
                stack.append(child)
                depth, best_depth = tree.depths[child], tree.depths[best] if best >= 0 else 0
                if depth > best_depth or (depth == best_depth and child < best):
                    best = child
    nodes = tree.path(best)
    return Verdict(nodes, [tree.tokens[i] for i in nodes] + [scores.argmax(best + 1)])


def verify_sampling(tree: TokenTree, scores: TreeScores | torch.Tensor,
                    generator: torch.Generator | Callable[[int], torch.Generator] | None = None) -> Verdict:
    """Multi-step speculative sampling (SpecInfer, Miao et al., ASPLOS 2024, section 4.3).

    At a node with model distribution p, try its children x_1, x_2, ... in tree order;
    child i was drafted from distribution q_i (`tree.draft_probs[i]`):
        accept x_i with probability min(1, p(x_i) / q_i(x_i)) and descend into it;
        else p <- normalise(max(0, p - q_i)) and try the next child.
    When no child is accepted, the bonus token is drawn from what is left of p. The
    output is distributed exactly as sampling from the model token by token, whatever
    the drafts.

    A drafter without probabilities (the trie) drafts deterministically: q_i is one-hot,
    and the rule becomes "sample x from p; descend into a child whose token is x, else x
    is the bonus". That takes one uniform number per output token, so when `generator`
    maps the depth of the token (0: the token after the root) to a generator seeded by
    its output position, the sampled text depends on the seed alone, never on the drafts.
    """
    scores = _scores(tree, scores)
    rng = generator if callable(generator) else (lambda depth: generator)
    q = tree.draft_probs  # [n, V] or None
    nodes, node = [], -1
    while True:
        p = scores.probs(node + 1)  # [V]
        g = rng(len(nodes))
        if q is None:
            x = _inverse_cdf(p, float(torch.rand((), generator=g)))
            accepted = next((c for c in tree.children[node] if tree.tokens[c] == x), None)
            if accepted is None:
                return Verdict(nodes, [tree.tokens[i] for i in nodes] + [x])
        else:
            accepted, p = _multi_step(tree, node, p, q, g)
            if accepted is None:
                bonus = int(torch.multinomial(p, 1, generator=g))
                return Verdict(nodes, [tree.tokens[i] for i in nodes] + [bonus])
        nodes.append(accepted)
        node = accepted


def _multi_step(tree: TokenTree, node: int, p: torch.Tensor, q: torch.Tensor, g) -> tuple[int | None, torch.Tensor]:
    """Try the children of `node` in order; return (accepted child or None, residual p)."""
    for child in tree.children[node]:
        x = tree.tokens[child]
        q_x = float(q[child, x])
        if q_x > 0 and float(torch.rand((), generator=g)) * q_x < float(p[x]):  # u < p(x) / q(x)
            return child, p
        residual = (p - q[child]).clamp_min_(0.0)
        total = float(residual.sum())
        if total <= 1e-12:  # p <= q everywhere: p == q up to rounding, so x would be accepted
            return child, p
        p = residual / total
    return None, p


def _inverse_cdf(p: torch.Tensor, u: float) -> int:
    """The token x with P(X < x) <= u < P(X <= x)."""
    cdf = p.cumsum(0)  # [V]
    x = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=cdf.dtype), right=True))
    if x >= len(p) or p[x] <= 0:  # rounding at the top end: the last token that can occur
        x = int(p.nonzero().max())
    return x
