"""Lookahead's trie drafter (Ant Group, KDD 2024), written anew.

Two tries of n-gram counts:
- the *context* trie of one request: its prompt and everything generated so far,
  released when the request ends (the paper's per-request prompt counts);
- the *memory* trie, shared by all requests: every generated answer, with the few
  prompt tokens before it, so that later similar requests are drafted from it (the
  paper's global output counts). A node budget bounds it: past the budget all counts
  are halved and nodes that reach zero are dropped (frequency decay), until it is back
  under a low-water mark.

Retrieval matches the last `match_length` tokens (then fewer, longest first), and
grows the draft tree best-first by the estimated probability that a node is accepted.
Each trie estimates it from its own counts, P(node) = P(parent) * count(node) /
(count(parent) + smoothing); the draft takes the larger of the two estimates. A
smoothing of 1 keeps a path seen once from counting as certain at every depth (a
one-off chain decays as 2^-depth); it is off by default because it also discounts an
answer seen once before, the case where copying pays most. Calibrating the estimate
against what is actually accepted is the adaptive-budget work. (The paper ranks by
prompt count + 1e-4 * output count instead; that drowns the memory's estimate
whenever the context also matches, so a confident memory continuation would rank
below a one-off in the prompt.) Because a child is never likelier than its parent,
the best-first nodes always form a tree, the one with the largest expected number of
accepted tokens for the budget, under that estimate.
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import itertools
from typing import Iterator, Sequence

from ..tree import TokenTree
from .base import Drafter, DraftSession

MODES = ("hierarchical", "parallel", "single")


class Node:
    __slots__ = ("count", "children")

    def __init__(self):
        self.count = 0
        self.children: dict[int, Node] | None = None  # None for leaves: most nodes are leaves


class Trie:
    """Counts of token n-grams: a node's count is how often its path was seen."""

    def __init__(self, max_nodes: int | None = None, low_water: float = 0.75):
        if max_nodes is not None and max_nodes < 1:
            raise ValueError(f"max_nodes must be >= 1 or None, got {max_nodes}")
        if not 0 < low_water <= 1:
            raise ValueError(f"low_water must be in (0, 1], got {low_water}")
        self.root = Node()
        self.root.children = {}
        self.num_nodes = 0
        self.max_nodes = max_nodes
        self.low_water = low_water
        self.prunes = 0  # bumped by every prune: n-gram cursors into the trie are stale then

    def __len__(self) -> int:
        return self.num_nodes

    def child(self, node: Node, token: int) -> Node:
        """The child of `node` for `token`, created (with count 0) if missing."""
        if node.children is None:
            node.children = {}
        child = node.children.get(token)
        if child is None:
            child = node.children[token] = Node()
            self.num_nodes += 1
        return child

    def find(self, tokens: Sequence[int]) -> Node | None:
        node = self.root
        for t in tokens:
            if not node.children or (node := node.children.get(t)) is None:
                return None
        return node

    def insert(self, ngram: Sequence[int]) -> None:
        """Count one occurrence of `ngram` (and so of each of its prefixes)."""
        node = self.root
        for t in ngram:
            node = self.child(node, t)
            node.count += 1
        self.enforce_budget()

    def enforce_budget(self) -> None:
        if self.max_nodes is not None and self.num_nodes > self.max_nodes:
            self.prune(int(self.max_nodes * self.low_water))

    def prune(self, target: int) -> None:
        """Halve every count and drop nodes that reach 0, until at most `target` nodes remain."""
        self.prunes += 1
        while self.num_nodes > target:
            self.num_nodes -= _decay(self.root)

    def check(self) -> None:
        """Raise AssertionError unless the counts are consistent and the budget holds."""
        seen = 0
        stack = [self.root]
        while stack:
            node = stack.pop()
            for token, child in (node.children or {}).items():
                seen += 1
                assert child.count >= 1, f"node for token {token} has count {child.count}"
                if node is not self.root:
                    assert child.count <= node.count, f"child count {child.count} > parent count {node.count}"
                stack.append(child)
        assert seen == self.num_nodes, f"num_nodes is {self.num_nodes} but the trie has {seen}"
        if self.max_nodes is not None:
            assert self.num_nodes <= self.max_nodes, f"{self.num_nodes} nodes over the budget {self.max_nodes}"


def _decay(node: Node) -> int:
    """Halve the counts below `node`; return how many nodes were removed."""
    removed = 0
    for token, child in list(node.children.items()):
        child.count //= 2
        if child.count == 0:  # children never outcount their parent: the whole subtree goes
            removed += _size(child)
            del node.children[token]
        elif child.children:
            removed += _decay(child)
    return removed


def _size(node: Node) -> int:
    return 1 + sum(_size(c) for c in (node.children or {}).values())


@contextlib.contextmanager
def gc_paused():
    """Creating nodes by the million triggers the cyclic garbage collector over and over
    (3x the insert time); trie nodes form no cycles, so it has nothing to find there."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class NgramStream:
    """Feeds a growing token stream into a trie: every n-gram of length <= n is counted
    once, as soon as its last token arrives, at O(n) work per token."""

    def __init__(self, trie: Trie, n: int):
        self.trie, self.n = trie, n
        self.open: list[Node] = []  # nodes of the n-grams still growing, longest first
        self.epoch = trie.prunes

    def feed(self, tokens: Sequence[int]) -> None:
        with gc_paused():
            self._feed(tokens)

    def _feed(self, tokens: Sequence[int]) -> None:
        trie = self.trie
        for t in tokens:
            if self.epoch != trie.prunes:  # a prune may have removed the open nodes
                self.open, self.epoch = [], trie.prunes
            grown = []
            for node in self.open + [trie.root]:  # Trie.child, inlined: this is the hot loop
                if node.children is None:
                    node.children = {}
                child = node.children.get(t)
                if child is None:
                    child = node.children[t] = Node()
                    trie.num_nodes += 1
                child.count += 1
                grown.append(child)
            self.open = grown[1:] if len(grown) == self.n else grown
            trie.enforce_budget()


class TrieDrafter(Drafter):
    """Lookahead drafter: multi-branch token trees retrieved from n-gram tries.

    decoding_length: most draft tokens per step (tree nodes).
    branch_length: deepest branch (draft tokens in a row).
    mode: "hierarchical" (branches share prefixes), "parallel" (root-to-leaf branches
        side by side, prefixes repeated) or "single" (the one likeliest branch).
    match_length: longest suffix of the context to match; shorter ones fill the rest.
        A long match finds the one place being copied, where a two-token one finds many.
    (Copied spans, in code most of all, run far past 12 tokens: with branches of 24 and
    matches of 8 a step follows them to the end; both only lengthen the n-grams stored.)
    max_nodes: node budget of the memory trie shared across requests (None: unbounded).
    memory_weight: trust in the memory's estimates, which are scaled by it (1: as much
        as in the request's own context; lower: prefer the context).
    smoothing: added to every parent count in the estimate above.
    min_score: leave out nodes whose estimated acceptance probability is below this;
        each drafted token costs compute, and on hardware where a forward's cost grows
        with the tokens fed, unlikely tokens cost more than they bring.
    """

    def __init__(
        self,
        decoding_length: int = 32,
        branch_length: int = 24,
        mode: str = "hierarchical",
        match_length: int = 8,
        max_nodes: int | None = 500_000,
        memory_weight: float = 1.0,
        max_context_nodes: int | None = 1_000_000,
        min_score: float = 0.0,
        smoothing: float = 0.0,
    ):
        for name, value in (("decoding_length", decoding_length), ("branch_length", branch_length),
                            ("match_length", match_length)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 0 <= memory_weight <= 1:
            raise ValueError(f"memory_weight must be in [0, 1], got {memory_weight}")
        if not 0 <= min_score <= 1:
            raise ValueError(f"min_score must be in [0, 1], got {min_score}")
        if smoothing < 0:
            raise ValueError(f"smoothing must be >= 0, got {smoothing}")
        self.min_score = min_score
        self.smoothing = smoothing
        self.decoding_length = decoding_length
        self.branch_length = branch_length
        self.mode = mode
        self.match_length = match_length
        self.memory_weight = memory_weight
        self.max_context_nodes = max_context_nodes
        self.memory = Trie(max_nodes)

    @property
    def ngram_length(self) -> int:
        # a full match plus a full branch must fit in one stored n-gram
        return self.match_length + self.branch_length

    def begin(self, prompt_ids: Sequence[int], sampling=None) -> TrieSession:
        return TrieSession(self, prompt_ids)

    def learn_text(self, token_ids: Sequence[int], context: Sequence[int] = ()) -> None:
        """Warm the memory trie with a past answer (or any text worth drafting from), with
        the last `match_length` tokens of its prompt, as a session learns it."""
        lead = list(context)[-self.match_length :] if context else []
        NgramStream(self.memory, self.ngram_length).feed(lead + list(token_ids))


class TrieSession(DraftSession):
    def __init__(self, drafter: TrieDrafter, prompt_ids: Sequence[int]):
        self.drafter = drafter
        self.context = Trie(drafter.max_context_nodes)
        self.context_stream = NgramStream(self.context, drafter.ngram_length)
        self.context_stream.feed(prompt_ids)
        self.memory_stream: NgramStream | None = None  # opened with the first output token
        self.recent = list(prompt_ids[-drafter.match_length :])

    def learn(self, new_ids: Sequence[int]) -> None:
        d = self.drafter
        if self.memory_stream is None:
            # The answer's n-grams go to memory together with the prompt tokens just before
            # it, so that the same prompt tail finds this answer next time.
            self.memory_stream = NgramStream(d.memory, d.ngram_length)
            self.memory_stream.feed(self.recent)
        self.memory_stream.feed(new_ids)
        self.context_stream.feed(new_ids)
        self.recent = (self.recent + list(new_ids))[-d.match_length :]

    def end(self) -> None:
        self.context = self.context_stream = self.memory_stream = None

    def propose(self, max_nodes: int, max_depth: int, allow_costly=None) -> TokenTree:
        d = self.drafter
        budget, depth_cap = min(max_nodes, d.decoding_length), min(max_depth, d.branch_length)
        if budget < 1 or depth_cap < 1:
            return TokenTree()
        if d.mode == "single":
            return self._single(budget, depth_cap)
        tree = self._best_first(budget, depth_cap)
        return tree if d.mode == "hierarchical" else _as_branches(tree, budget)

    def _matches(self) -> Iterator[list[tuple[Node, float]]]:
        """For each suffix of the context, longest first: the trie nodes it reaches, each with
        the probability given to that node (the trie's weight)."""
        d = self.drafter
        for m in range(min(d.match_length, len(self.recent)), 0, -1):
            query = self.recent[-m:]
            found = [(trie.find(query), w) for trie, w in ((self.context, 1.0), (d.memory, d.memory_weight))]
            found = [(node, w) for node, w in found if node is not None and w > 0]
            if found:
                yield found

    def _best_first(self, budget: int, depth_cap: int) -> TokenTree:
        tokens: list[int] = []
        parents: list[int] = []
        scores: list[float] = []
        index: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
        tie = itertools.count()  # heap tie-breaker: earlier pushes first
        for sources in self._matches():
            heap = [(-p, next(tie), -1, 1, token, srcs) for token, p, srcs in _children(sources, budget, self.drafter.smoothing)]
            heapq.heapify(heap)
            while heap and len(tokens) < budget:
                neg_p, _, parent, depth, token, srcs = heapq.heappop(heap)
                if -neg_p < self.drafter.min_score:  # the heap is best-first: every other candidate is worse
                    break
                node = index.get((parent, token))
                if node is None:  # not yet drafted from a longer match
                    node = index[(parent, token)] = len(tokens)
                    tokens.append(token)
                    parents.append(parent)
                    scores.append(-neg_p)
                if depth < depth_cap:
                    room = budget - len(tokens)
                    for child_token, p, child_srcs in _children(srcs, room, self.drafter.smoothing):
                        heapq.heappush(heap, (-p, next(tie), node, depth + 1, child_token, child_srcs))
            if len(tokens) >= budget:
                break
        return TokenTree(tuple(tokens), tuple(parents), tuple(scores))

    def _single(self, budget: int, depth_cap: int) -> TokenTree:
        for sources in self._matches():
            tokens, scores = [], []
            while len(tokens) < min(budget, depth_cap):
                best = max(_children(sources, 1, self.drafter.smoothing), key=lambda c: c[1], default=None)
                if best is None or best[1] < self.drafter.min_score:
                    break
                token, p, sources = best
                tokens.append(token)
                scores.append(p)
            if tokens:
                return TokenTree(tuple(tokens), tuple(range(-1, len(tokens) - 1)), tuple(scores))
        return TokenTree()


def _children(sources: list[tuple[Node, float]], most: int, smoothing: float):
    """The likeliest `most` continuations of a node found in one or more tries.

    sources: (trie node, P(node) by that trie). Returns (token, P, sources of the child),
    P being the larger of the tries' estimates.
    """
    merged: dict[int, list[tuple[Node, float]]] = {}
    for node, p in sources:
        for token, child in (node.children or {}).items():
            merged.setdefault(token, []).append((child, p * child.count / (node.count + smoothing)))
    if most < 1:
        return []
    scored = [(token, max(p for _, p in srcs), srcs) for token, srcs in merged.items()]
    if len(scored) > most:
        scored = heapq.nlargest(most, scored, key=lambda c: c[1])
    return scored


def _as_branches(tree: TokenTree, budget: int) -> TokenTree:
    """Parallel mode: the tree's root-to-leaf branches side by side, best expected gain first."""
    has_child = set(tree.parents)
    leaves = [i for i in range(len(tree)) if i not in has_child]
    gain = {leaf: sum(tree.scores[j] for j in tree.path(leaf)) for leaf in leaves}
    tokens, parents, scores = [], [], []
    for leaf in sorted(leaves, key=lambda leaf: -gain[leaf]):
        for depth, j in enumerate(tree.path(leaf)):
            if len(tokens) >= budget:
                break
            parents.append(-1 if depth == 0 else len(tokens) - 1)
            tokens.append(tree.tokens[j])
            scores.append(tree.scores[j])
    return TokenTree(tuple(tokens), tuple(parents), tuple(scores))
