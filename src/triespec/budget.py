"""Adaptive draft budget: verify as many draft tokens as pay off, down to none.

Goodput (SmartSpec, arXiv 2406.14066): a step that feeds k pending tokens and m draft
nodes yields 1 + (expected accepted tokens) tokens and costs cost(k + m) seconds. The
tree is cut to the m that maximises that ratio, m = 0 included.

- `CostModel`: seconds per forward by tokens fed, measured on this machine at start-up
  and refined from real steps (the curve differs by hardware and dtype: on a CPU without
  AMX in fp32, 5 tokens cost 1.7x one token; on a GPU, about 1x).
- `Calibration`: how often a node the drafter gave probability p (given its parent) is
  accepted when its parent is, learned from every proposed tree, including the ones that were cut and never
  verified: a tree is scored afterwards against the tokens that were generated
  ("shadow acceptance"), so the budget can come back up after it has gone to zero.
"""

from __future__ import annotations

import bisect
import time
import weakref

import torch
from transformers import DynamicCache

from .kv import keep_paths
from .masks import Row, forward, pack
from .tree import TokenTree


_MEASURED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {max_tokens: CostModel}


class CostModel:
    def __init__(self, sizes: list[int], seconds: list[float], smoothing: float = 0.2):
        if len(sizes) != len(seconds) or not sizes or sorted(sizes) != sizes:
            raise ValueError("CostModel needs ascending sizes with one time each")
        self.sizes, self.seconds, self.smoothing = list(sizes), list(seconds), smoothing

    def __call__(self, tokens: int) -> float:
        """Seconds for a forward over `tokens` tokens: linear between measured sizes."""
        s, t = self.sizes, self.seconds
        if tokens <= s[0]:
            return t[0]
        i = bisect.bisect_left(s, tokens)
        if i == len(s):  # beyond the largest measured size: extend the last slope
            i -= 1
        lo, hi = i - 1, i
        slope = (t[hi] - t[lo]) / (s[hi] - s[lo])
        return max(t[lo] + slope * (tokens - s[lo]), 1e-9)

    def observe(self, tokens: int, seconds: float) -> None:
        """Move the measured size nearest to `tokens` towards a real step's time."""
        i = min(range(len(self.sizes)), key=lambda j: abs(self.sizes[j] - tokens))
        if self.sizes[i] == tokens:
            self.seconds[i] += self.smoothing * (seconds - self.seconds[i])

    @classmethod
    def of(cls, model, config, max_tokens: int) -> CostModel:
        """The model's cost curve, measured once per process: engines of one model share it
        (the curve belongs to the model and the machine, and is refined by every engine)."""
        curves = _MEASURED.setdefault(model, {})
        if max_tokens not in curves:
            curves[max_tokens] = cls.measure(model, config, max_tokens)
        return curves[max_tokens]

    @classmethod
    @torch.inference_mode()
    def measure(cls, model, config, max_tokens: int, context: int = 64, repeats: int = 2) -> CostModel:
        """Time forwards of 1, 2, 4, ... tokens after `context` cached tokens."""
        sizes = [1]
        while sizes[-1] < max_tokens:
            sizes.append(min(sizes[-1] * 2, max_tokens))
        cache = DynamicCache()
        vocab = model.get_output_embeddings().weight.shape[0]
        ids = torch.arange(context, device=model.device)[None] % vocab
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        seconds = []
        for size in [sizes[0]] + sizes:  # the first run warms up
            best = float("inf")
            for _ in range(repeats):
                packed = pack([Row([1], TokenTree.chain([1] * (size - 1)), context)], context, model.dtype,
                              config, model.device)
                start = time.perf_counter()
                forward(model, packed, cache, logits_to_keep=size)
                best = min(best, time.perf_counter() - start)
                keep_paths(cache, [(context, [])])  # back to the context alone
            seconds.append(best)
        return cls(sizes, seconds[1:])


class Calibration:
    """Observed acceptance rate of draft nodes, by the probability the drafter gave them."""

    def __init__(self, bins: int = 10, prior: float = 4.0):
        self.bins = bins
        # start from trusting the drafter: `prior` pseudo-observations at the bin's centre
        self.drafted = [prior] * bins
        self.accepted = [prior * (b + 0.5) / bins for b in range(bins)]

    def _bin(self, p: float) -> int:
        return min(int(p * self.bins), self.bins - 1)

    def rate(self, p: float) -> float:
        b = self._bin(p)
        return self.accepted[b] / self.drafted[b]

    def observe(self, p: float, accepted: bool) -> None:
        b = self._bin(p)
        self.drafted[b] += 1
        self.accepted[b] += accepted


def edge_score(tree: TokenTree, node: int) -> float:
    """The drafter's probability of `node` given that its parent is right: tree scores
    are path probabilities, so this is the node's score over its parent's."""
    parent = tree.parents[node]
    above = tree.scores[parent] if parent >= 0 else 1.0
    return min(tree.scores[node] / above, 1.0) if above > 0 else 0.0


def best_size(tree: TokenTree, pending: int, cost: CostModel, calibration: Calibration) -> int:
    """How many of the tree's first nodes maximise expected tokens per second.

    A node is accepted only if its parent is, so its chance is the product of the
    calibrated rates of the edges on its path: a chain the drafter is sure of at every
    edge (a trie path seen once) is worth 1 + r + r^2 + ..., not r per node. Drafters
    list nodes likeliest first, so the first m nodes are the best m (and a tree:
    parents come before children)."""
    best, best_rate, gain = 0, 1.0 / cost(pending), 1.0
    reach: list[float] = []  # each node's chance of being accepted
    for m, parent in enumerate(tree.parents, start=1):
        reach.append((reach[parent] if parent >= 0 else 1.0) * calibration.rate(edge_score(tree, m - 1)))
        gain += reach[-1]
        rate = gain / cost(pending + m)
        if rate > best_rate:
            best, best_rate = m, rate
    return best


def label(tree: TokenTree, realized: list[int]) -> list[tuple[int, bool]]:
    """(node, accepted?) for the nodes that `realized` (the tokens generated after the
    tree's root) decides: a node is accepted when its path is a prefix of what was
    generated, rejected when it or an ancestor differs, undecided while too few
    tokens have been generated."""
    state: list[bool | None] = []
    decided = []
    for i, (token, parent, depth) in enumerate(zip(tree.tokens, tree.parents, tree.depths)):
        above = True if parent < 0 else state[parent]
        if above is False:
            ok = False
        elif above is None or depth > len(realized):
            ok = None
        else:
            ok = token == realized[depth - 1]
        state.append(ok)
        if ok is not None:
            decided.append((i, ok))
    return decided


def edges(tree: TokenTree, realized: list[int]) -> list[tuple[int, bool]]:
    """(node, accepted?) for the decided nodes whose parent was accepted (or is the
    root): what the per-edge calibration learns from."""
    decided = label(tree, realized)
    accepted = dict(decided)
    return [(node, ok) for node, ok in decided
            if tree.parents[node] < 0 or accepted.get(tree.parents[node]) is True]
