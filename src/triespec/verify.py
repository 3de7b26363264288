"""Acceptance: which draft tokens the model agrees with.

Terms, used throughout:
- *accepted* tokens: draft tokens on the tree path that the model itself would have produced;
- *bonus* token: the model's own next token after the last accepted one (always produced,
  so a step never yields fewer tokens than plain decoding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tree import TokenTree


@dataclass(frozen=True)
class Verdict:
    nodes: list[int]  # accepted tree nodes, root side first
    tokens: list[int]  # the accepted nodes' tokens followed by the bonus token

    @property
    def num_accepted(self) -> int:
        return len(self.nodes)


def verify_greedy(tree: TokenTree, logits: torch.Tensor) -> Verdict:
    """Accept the deepest tree path that follows the model's argmax.

    logits: [1 + n, V]; row 0 predicts the token after the root (last committed
    token), row 1 + i the token after node i.

    Siblings may repeat a token (parallel branches), so every node is checked rather
    than following the first matching child: a node matches when its token is its
    parent's argmax and its parent matches. The deepest match wins (ties: the first).
    """
    target = logits.argmax(dim=-1).tolist()  # [1 + n]
    matched: list[bool] = []
    best, best_depth = -1, 0
    for i, (token, parent) in enumerate(zip(tree.tokens, tree.parents)):
        ok = token == target[parent + 1] and (parent < 0 or matched[parent])
        matched.append(ok)
        if ok and tree.depths[i] > best_depth:
            best, best_depth = i, tree.depths[i]
    nodes = tree.path(best)
    return Verdict(nodes, [tree.tokens[i] for i in nodes] + [target[best + 1]])
