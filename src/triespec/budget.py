"""Adaptive draft budget: verify as many draft tokens as pay off, down to none.

Goodput (SmartSpec, arXiv 2406.14066): a step that feeds k pending tokens and m draft
nodes yields 1 + (expected accepted tokens) tokens and costs cost(k + m) seconds. The
tree is cut to the m that maximises that ratio, m = 0 included; in a batch, the rows'
nodes compete for one forward (`best_sizes`).

- `CostModel`: seconds per forward by tokens fed, measured on this machine at a cold
  start (a few sizes), refined from real steps and kept on disk (budget_store; the curve
  differs by hardware and dtype: on a CPU without AMX in fp32, 2 tokens cost 2.2x one
  token; on a GPU, about 1x).
- `Calibration`: how often a node is accepted when its parent is, by the drafter's
  edge probability and the node's depth, learned from every proposed tree, including
  the ones that were cut and never verified: a tree is scored afterwards against the
  tokens that were generated ("shadow acceptance"), so the budget can come back up
  after it has gone to zero. A scale (accepted over expected tokens of trees as cut)
  corrects what per-edge rates miss.
- `Gate`: whether running a draft model pays at all, its forwards included.
"""

from __future__ import annotations

import bisect
import heapq
import time
import weakref
from typing import Callable

import numpy as np
import torch
from transformers import DynamicCache

from .kernels import current as current_kernels
from .kv import keep_paths
from .masks import Row, context_length, forward, pack, with_cache
from .tree import KINDS, MODEL, TRIE, TokenTree


_MEASURED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(max_tokens, kernels): CostModel}


class CostModel:
    """Seconds per forward by tokens fed and by tokens cached.

    The curve by tokens fed is measured after `context` cached tokens; each cached token
    beyond them adds `per_context` = (a, b) seconds, a per forward and b per token fed
    (attention reads every cached entry once per forward and scores it against every
    query token). On this machine in bf16 each 1000 cached tokens add 2 ms to a one-token
    forward of Qwen2.5-Coder-1.5B (184 ms) and 127 ms to a 64-token one (614 ms): a curve
    measured after a short context alone undercharges the large trees of long prompts.

    The curve holds every size, each refined by the real steps of that size alone: in
    fp32 on this machine's CPU, forwards of 3, 7 and 11 tokens cost 1.25-1.45 s and ones
    of 4, 8 and 12 tokens 0.8-1.05 s (the matrix kernels work in blocks of rows), so a
    curve interpolated between powers of two undercharged most trees by 30%, and real
    steps of 11 tokens, refining the sizes 8 and 16 around them, made those look dear.
    With the real sizes the cut goes to the cheap ones by itself: replaying a run's code
    outputs with every step charged by a curve timed at every size, a cut deciding by that
    curve got 3.08x plain decoding, one deciding by the interpolated curve 2.82x."""

    def __init__(self, sizes: list[int], seconds: list[float], smoothing: float = 0.2, context: int = 0,
                 per_context: tuple[float, float] = (0.0, 0.0), confirmed: list[bool] | None = None,
                 explore_every: int = 16):
        if len(sizes) != len(seconds) or not sizes or sorted(sizes) != sizes:
            raise ValueError("CostModel needs ascending sizes with one time each")
        if len(per_context) != 2 or min(per_context) < 0:
            raise ValueError(f"per_context must be two seconds per cached token >= 0, got {per_context}")
        if confirmed is not None and len(confirmed) != len(sizes):
            raise ValueError(f"confirmed needs one flag per size ({len(sizes)}), got {len(confirmed)}")
        if explore_every < 1:
            raise ValueError(f"explore_every must be >= 1, got {explore_every}")
        self.sizes, self.seconds, self.smoothing = list(sizes), list(seconds), smoothing
        self.context, self.per_context = context, tuple(per_context)
        # confirmed: the size's time comes from a forward of exactly that size (timed, or a real
        # step); the others are the line between the confirmed sizes around them
        self.confirmed = [True] * len(sizes) if confirmed is None else [bool(c) for c in confirmed]
        self.explore_every, self.unexplored = explore_every, 0  # unexplored: cuts since the last exploration

    def __call__(self, tokens: int, context: int | None = None) -> float:
        """Seconds for a forward over `tokens` tokens after `context` cached tokens (None:
        the measured context): linear between measured sizes, and in the context."""
        s, t = self.sizes, self.seconds
        if tokens <= s[0]:
            base = t[0]
        else:
            i = bisect.bisect_left(s, tokens)
            if i == len(s):  # beyond the largest measured size: extend the last slope
                i -= 1
            lo, hi = i - 1, i
            base = t[lo] + (t[hi] - t[lo]) / (s[hi] - s[lo]) * (tokens - s[lo])
        if context is not None:
            a, b = self.per_context
            base += (context - self.context) * (a + b * tokens)
        return max(base, 1e-9)

    def observe(self, tokens: int, seconds: float, context: int | None = None) -> None:
        """Move the curve towards a real step's time: the measured size itself (curves of
        `measure` hold every size), else the two around `tokens`, each by its share of the
        interpolation (a least-squares step). With a curve timed at powers of two only,
        refining just a size fed exactly let the sizes real steps hit often (1 and 2
        tokens) take their real, longer times while the larger sizes kept their start-up
        times (in bf16, 32 tokens at 1.8x one token against 2.2x timed best of five). The step's
        `context` is priced by `per_context` first, so a long prompt's steps do not make
        the short ones look slow. Beyond the largest measured size there is nothing to
        refine.

        The first real step of a size not confirmed yet confirms it, and takes its time
        whole where it is faster than the line said: a size priced too dear is one the cut
        avoids, so nothing else would ever bring it down. Where it is slower, it moves by
        `smoothing` like any other (the cut keeps feeding a size that looks cheap, and the
        steps that follow bring it up; one slow step must not make it dear for good). The
        sizes still unconfirmed then follow the line between their confirmed neighbours."""
        s = self.sizes
        if tokens <= s[0]:
            shares = [(0, 1.0)]
        elif tokens > s[-1]:
            return
        else:
            hi = bisect.bisect_left(s, tokens)
            w = (tokens - s[hi - 1]) / (s[hi] - s[hi - 1])
            shares = [(hi - 1, 1.0 - w), (hi, w)]
        error = seconds - self(tokens, context)
        exact = shares[-1][0] if s[shares[-1][0]] == tokens else None
        if exact is not None and not self.confirmed[exact]:
            self.seconds[exact] += error if error < 0 else self.smoothing * error
            self.confirmed[exact] = True
        else:
            for i, share in shares:
                self.seconds[i] += self.smoothing * share * error
        if not all(self.confirmed):
            self._fill()

    def _is_confirmed(self, tokens: int) -> bool:
        """Whether a forward of `tokens` tokens is priced by a confirmed size, or by none that
        a step could confirm (beyond the curve, between the sizes of a sparse one)."""
        i = bisect.bisect_left(self.sizes, tokens)
        return i == len(self.sizes) or self.sizes[i] != tokens or self.confirmed[i]

    def _fill(self) -> None:
        """Put every unconfirmed size between two confirmed ones on the line between them."""
        known = [i for i, c in enumerate(self.confirmed) if c]
        for lo, hi in zip(known, known[1:]):
            for i in range(lo + 1, hi):
                w = (self.sizes[i] - self.sizes[lo]) / (self.sizes[hi] - self.sizes[lo])
                self.seconds[i] = self.seconds[lo] + w * (self.seconds[hi] - self.seconds[lo])

    def explore(self, fed: int, chosen: int, most: int) -> int:
        """How many draft nodes a cut verifies: `chosen` (the best by the curve) out of
        `most` available, `fed` tokens being fed besides; except that once every
        `explore_every` cuts, if the chosen size is confirmed and a size the curve has not
        confirmed lies within reach (fed .. fed + most), as many as make the forward that
        size, the one nearest the chosen size (the smaller of two as near).

        Real steps correct only the sizes the cut feeds, and the cut avoids the sizes
        priced dear, so a size priced by a line drawn between two timed sizes (a cold start
        times a few: `measure`) would never be tried where the line is wrong. Such a step
        yields the same tokens as any other (verification keeps exactly what the model
        computes, whatever is verified), and what it may cost is bounded: at most one cut
        in `explore_every`, a size next to the best one among those not confirmed, and,
        since a step of exactly that size confirms it (`observe`), at most one exploring
        step per unconfirmed size over the curve's life (which goes on on disk:
        budget_store); none once every size within reach is confirmed."""
        self.unexplored += 1
        target, best = fed + chosen, None
        if self.unexplored < self.explore_every or not self._is_confirmed(target):
            return chosen  # not yet, or an unconfirmed choice, which its own step confirms
        for size, confirmed in zip(self.sizes, self.confirmed):
            if not confirmed and fed <= size <= fed + most \
                    and (best is None or abs(size - target) < abs(best - target)):
                best = size
        if best is None:
            return chosen
        self.unexplored = 0
        return best - fed

    @classmethod
    def of(cls, model, config, max_tokens: int, saved: CostModel | None = None) -> CostModel:
        """The model's cost curve, once per process: engines of one model share it (the
        curve belongs to the model and the machine, and is refined by every engine). The
        first engine takes the curve `saved` on disk (budget_store) if there is one, else
        measures it. A curve belongs to the kernels the model ran on (kernels.current): a
        model moved to others gets its own."""
        curves = _MEASURED.setdefault(model, {})
        key = (max_tokens, current_kernels(model))
        if key not in curves:
            curves[key] = saved if saved is not None else cls.measure(model, config, max_tokens)
        return curves[key]

    @classmethod
    @torch.inference_mode()
    def measure(cls, model, config, max_tokens: int, context: int = 64, repeats: int = 1,
                long_context: int = 1024, every: int = 2) -> CostModel:
        """Time forwards of 1, 2, ... `every` tokens and then of doubling sizes up to
        `max_tokens`, after `context` cached tokens, each the fastest of `repeats` passes
        over all the sizes; and of 1 and `max_tokens` tokens after `long_context` (the
        per-cached-token cost; none measured if `long_context` <= `context`). The curve
        returned holds every size up to `max_tokens`, those timed marked confirmed and the
        others on the line between them, for real steps to refine and confirm each on its
        own (`observe`, `explore`).

        The defaults are a cold start, for an engine with nothing saved: 1, 2, 4, 8, 16, 32
        and 33 tokens, one pass, and the long-context pair, the fastest of two (13 forwards
        with the warm-ups). Every size, twice, takes 39 s in fp32 on Qwen2.5-Coder-1.5B here
        (12 s in bf16), and would at every start; the sizes between the timed ones are
        confirmed by the real steps that feed them, the cut trying them now and then
        (`explore`), and the curve is kept on disk (budget_store), so that the next start
        times nothing. With `repeats` > 1 (the benchmark times every size three times),
        each pass goes over all the sizes rather than timing one size back to back, so
        that a burst of load inflates different sizes each time."""
        sizes = list(range(1, min(every, max_tokens) + 1))
        while sizes[-1] < max_tokens:
            sizes.append(min(sizes[-1] * 2, max_tokens))
        cache = DynamicCache()
        vocab = model.get_output_embeddings().weight.shape[0]
        ids = torch.arange(context, device=model.device)[None] % vocab
        model(input_ids=ids, **with_cache(model, cache))

        def timed(size: int, cached: int, repeats: int) -> float:
            best = float("inf")
            for _ in range(repeats):
                packed = pack([Row([1], TokenTree.chain([1] * (size - 1)), cached)], cached, model.dtype,
                              config, model.device)
                start = time.perf_counter()
                forward(model, packed, cache, logits_to_keep=size)
                best = min(best, time.perf_counter() - start)
                keep_paths(cache, [(cached, [])])  # back to the context alone
            return best

        timed(sizes[0], context, 1)  # warms up
        seconds = [float("inf")] * len(sizes)
        for _ in range(repeats):
            seconds = [min(best, timed(size, context, 1)) for best, size in zip(seconds, sizes)]
        per_context = (0.0, 0.0)
        long_context = min(long_context, context_length(config) - max_tokens)  # positions the model has
        if long_context > context:
            # the per-cached-token cost is the difference of two timings; the long one the fastest of two at
            # least (real steps refine the curve, never this)
            steady, ends = max(repeats, 2), (1, sizes[-1])
            _lengthen(cache, long_context)
            timed(1, long_context, 1)
            extra = [(timed(n, long_context, steady) - seconds[sizes.index(n)]) / (long_context - context)
                     for n in ends]
            b = max(extra[1] - extra[0], 0.0) / max(sizes[-1] - 1, 1)  # extra = a + b * tokens
            per_context = (max(extra[0] - b, 0.0), b)
        timed_curve = cls(sizes, seconds, context=context, per_context=per_context)
        every_size = list(range(1, max_tokens + 1))
        return cls(every_size, [timed_curve(n) for n in every_size], context=context, per_context=per_context,
                   confirmed=[n in sizes for n in every_size])


def _lengthen(cache: DynamicCache, length: int) -> None:
    """Grow every layer's cached entries to `length` positions by repeating them: what a
    forward costs depends on how many entries it attends to, not on what they hold, and
    a real prefill of 1024 tokens takes 25 s in fp32 here."""
    for layer in cache.layers:
        if layer.is_initialized and layer.keys.numel():
            # keys, values: [B, H, S, D] -> [B, H, length, D]
            times = -(-length // layer.keys.shape[2])
            layer.keys = layer.keys.repeat(1, 1, times, 1)[:, :, :length].contiguous()
            layer.values = layer.values.repeat(1, 1, times, 1)[:, :, :length].contiguous()


class Calibration:
    """Observed acceptance rate of draft nodes given their parent's, by the probability
    the drafter gave the edge, by the node's depth and by the kind of score.

    Depth matters as much as the score: a trie edge out of the root continues a match of
    a token or two and is often wrong, while one deep in an accepted path continues a
    long copied span (on summaries, 1.0-scored edges were right 87% of the time overall
    but far less at depth 1, and one rate for both tripled the expected tokens).

    The kind matters because the scores mean different things (tree.KINDS). A trie's
    score is a count ratio (a path seen once scores 1.0), so its cells start cautious:
    `prior` pseudo-observations at `trie_mean` (0.2), whatever the score, until trees
    scored in the shadow (which costs no forward) show how nodes like it fare. Trie edges
    out of the root, the most numerous, were right 13% of the time on the benchmark's
    warm split (24% at depth 2, 68-77% deeper, where a copy is under way). A trusting
    prior (the trie's 1.0) lost 10-15% in fp32 on workloads with nothing to copy; a
    chain at 0.2 per edge is worth 0.25 tokens, which pays only where draft tokens are
    nearly free: there (bf16 on an AVX512_BF16 CPU) a prior of nothing verified no draft
    until evidence came, and on short answers that start was most of the answer (qa in
    bf16: 0.85 of the best fixed size, modelled, and 0.92 with 0.2; in replays under an
    fp32 curve nothing lost more than 0.05). Two pseudo-observations were the best of
    1, 2 and 4 in replays of the benchmark's outputs (scripts/replay_budget.py), with the
    earlier prior of nothing. Trie nodes drafted while a copy is going on (COPYING) have
    cells of their own: out of a fresh match, many wrong siblings keep a depth-1 edge's
    rate low, which then also cut the continuation of a copy that had just given 12 tokens.
    A draft model's score is its probability q of the edge, already an estimate of
    acceptance, and its forwards are spent before the cut: a pessimistic start threw its
    trees away (the first ~10 steps of every MT-Bench answer verified nothing, while
    transformers' assistant got 7.8 tokens per step from the same model). Its cells
    start at q itself, `prior` pseudo-observations at the bin's middle.

    Cells and scale forget (`memory`, `scale_memory`): one engine serves every kind of
    request, and what pays changes with them (`observe`)."""

    depths = (1, 2, 3, 5)  # a cell per depth class: 1, 2, 3-4, 5 and deeper

    def __init__(self, bins: int = 10, prior: float = 2.0, trie_mean: float = 0.2, scale_prior: float = 4.0,
                 memory: float | None = 16.0, scale_memory: float | None = 50.0):
        if memory is not None and memory < prior + 1:
            raise ValueError(f"memory must hold the prior and an observation (>= {prior + 1}), got {memory}")
        self.bins, self.scale_prior = bins, scale_prior
        self.memory, self.scale_memory = memory, scale_memory
        per_kind = bins * len(self.depths)
        self.drafted = [prior] * (len(KINDS) * per_kind)
        self.accepted = [prior * ((c % bins + 0.5) / bins if c // per_kind == MODEL else trie_mean)
                         for c in range(len(self.drafted))]
        self.expected = self.realized = 0.0  # tokens of the trees as cut, expected and accepted

    def _cell(self, p: float, depth: int, kind: int = TRIE) -> int:
        depth_class = bisect.bisect_right(self.depths, max(depth, 1)) - 1
        return (kind * len(self.depths) + depth_class) * self.bins + min(int(max(p, 0.0) * self.bins), self.bins - 1)

    def rate(self, p: float, depth: int = 1, kind: int = TRIE) -> float:
        c = self._cell(p, depth, kind)
        return self.accepted[c] / self.drafted[c]

    def observe(self, p: float, accepted: bool, depth: int = 1, kind: int = TRIE) -> None:
        """One edge seen, accepted or not. A cell remembers about `memory` edges: past
        that, its counts shrink so that each new edge keeps its weight, since what pays
        changes with the traffic. Trie drafts were right about half the time on questions
        about a passage and rarely on open questions; in replays of the benchmark's
        outputs with one calibration over every workload (as in a server), counts kept
        without end went on verifying trees on the open questions that followed: 0.92x
        plain decoding in fp32, against 1.00x with a memory of 16 edges."""
        c = self._cell(p, depth, kind)
        self.drafted[c] += 1
        self.accepted[c] += accepted
        self.drafted[c], self.accepted[c] = _remember(self.drafted[c], self.accepted[c], self.memory)

    def tally(self, expected: float, realized: float) -> None:
        """A verified tree: `expected` tokens by the rates, `realized` accepted (the scale).
        The scale remembers about `scale_memory` expected tokens, for the same reason."""
        self.expected, self.realized = _remember(self.expected + expected, self.realized + realized,
                                                 self.scale_memory)

    def node_rate(self, tree: TokenTree, node: int) -> float:
        return self.rate(edge_score(tree, node), tree.depths[node], _kind(tree, node))

    def reach(self, tree: TokenTree, scaled: bool = True) -> list[float]:
        """Each node's chance of being accepted: the calibrated rates of its path's edges,
        multiplied (and corrected by the scale), siblings sharing their parent's chance."""
        reach: list[float] = []
        for node, parent in enumerate(tree.parents):
            reach.append((reach[parent] if parent >= 0 else 1.0) * self.node_rate(tree, node))
        scale = self.scale if scaled else 1.0
        return _exclusive(tree, [min(r * scale, 1.0) for r in reach])

    def state(self) -> np.ndarray:
        """Everything learned, flat (saved with the trie, so a restart keeps it)."""
        return np.array([*self.drafted, *self.accepted, self.expected, self.realized], dtype=np.float64)

    def restore(self, state: np.ndarray) -> None:
        """Take back a `state()`; ValueError if it is not one of this calibration's shape.
        A state saved before the kinds other than TRIE existed restores the TRIE cells."""
        cells = len(self.drafted)
        state = np.asarray(state, dtype=np.float64)
        trie = cells // len(KINDS)
        if state.shape == (2 * trie + 2,):
            state = np.concatenate([state[:trie], self.drafted[trie:], state[trie : 2 * trie],
                                    self.accepted[trie:], state[-2:]])
        if state.shape != (2 * cells + 2,) or not np.isfinite(state).all() or (state < 0).any() \
                or (state[cells : 2 * cells] > state[:cells]).any():
            raise ValueError(f"not a calibration of {cells} cells")
        self.drafted, self.accepted = state[:cells].tolist(), state[cells : 2 * cells].tolist()
        self.expected, self.realized = float(state[-2]), float(state[-1])

    @property
    def scale(self) -> float:
        """Accepted over expected tokens of the trees as cut: the per-edge rates multiply
        as if edges were independent, and siblings from several matches compete; this
        corrects what remains. It starts at 1 with `scale_prior` expected tokens all
        accepted: with one, the first verified tree that failed (2 tokens expected, none
        accepted) cut every estimate to a third, and where a second token doubles the
        forward (fp32 here) nothing paid again before a short answer ended (qa in fp32:
        nothing verified, 0.74-0.82 of the best fixed size; 0.875 with four, in replays
        of that run, which left bf16 within 0.03 and raised the worst replayed ratio
        over four other output sets and curves from 0.952 to 0.955)."""
        return (self.realized + self.scale_prior) / (self.expected + self.scale_prior)

    def learn(self, tree: TokenTree, realized: list[int], size: int = 0, expected: float = 0.0) -> None:
        """Score a proposed tree (verified or not) against the tokens generated after it;
        `size` nodes of it were to be verified, worth `expected` tokens by the rates."""
        Watched(0, tree, size, expected).update(self, realized, finished=True)


def _remember(total: float, part: float, memory: float | None) -> tuple[float, float]:
    """A count and the part of it that succeeded, shrunk alike to at most `memory`: older
    evidence weighs less, and the ratio stays."""
    if memory is None or total <= memory:
        return total, part
    keep = memory / total
    return memory, part * keep


class Watched:
    """A proposed tree (verified or cut) that the calibration learns from edge by edge,
    as the generated tokens decide them. A depth-1 edge is decided by the next token, so
    the evidence of a cold start comes within a step, not once the tree's whole depth has
    been generated (12 steps for a 12-deep branch that was cut to nothing: on code, a
    third of a 96-token answer went by undrafted)."""

    def __init__(self, start: int, tree: TokenTree, size: int = 0, expected: float = 0.0):
        self.start, self.tree = start, tree  # start: where the tree's root token sits in the sequence
        self.size, self.expected = size, expected  # nodes verified, and the tokens they were worth
        self.learned: set[int] = set()

    def update(self, calibration: Calibration, seq: list[int], finished: bool = False) -> bool:
        """Teach `calibration` the edges that `seq` newly decides; True once the tree is
        decided (or the generation `finished`) and it can be dropped."""
        realized = seq[self.start :]
        tree = self.tree
        for node, accepted in edges(tree, realized):
            if node not in self.learned:
                self.learned.add(node)
                calibration.observe(edge_score(tree, node), accepted, tree.depths[node], _kind(tree, node))
        done = finished or len(realized) >= tree.depth
        if done and self.size:
            calibration.tally(self.expected, sum(ok for node, ok in label(tree, realized) if node < self.size))
        return done


def edge_score(tree: TokenTree, node: int) -> float:
    """The drafter's probability of `node` given that its parent is right: tree scores
    are path probabilities, so this is the node's score over its parent's."""
    parent = tree.parents[node]
    above = tree.scores[parent] if parent >= 0 else 1.0
    return min(tree.scores[node] / above, 1.0) if above > 0 else 0.0


def _kind(tree: TokenTree, node: int) -> int:
    return TRIE if tree.kinds is None else tree.kinds[node]


def best_size(tree: TokenTree, pending: int, cost: CostModel, calibration: Calibration,
              context: int | None = None) -> int:
    """How many of the tree's first nodes maximise expected tokens per second, `pending`
    tokens being fed anyway. A node is accepted only if its parent is, so its chance is
    the product of the calibrated rates of the edges on its path: a chain the drafter is
    sure of at every edge (a trie path seen once) is worth 1 + r + r^2 + ..., not r per
    node. Drafters list nodes likeliest first, so the first m nodes are the best m (and
    a tree: parents come before children)."""
    return best_sizes([tree], pending, cost, calibration, context=context)[0]


def best_sizes(trees: list[TokenTree], fed: int, cost: CostModel, calibration: Calibration,
               others: int = 0, context: int | None = None) -> list[int]:
    """For a batch sharing one forward: how many of each tree's first nodes to verify so
    that the forward yields the most expected tokens per second, `fed` tokens (every
    row's pending tokens, and any tree that is not cut) being fed anyway, and `others`
    rows without a tree to cut yielding their one token too, after `context` cached
    tokens (the batch's cache width).

    Nodes are added one at a time, the likeliest next node of any row first, and the
    best prefix of that order is kept: under load (many rows already feeding many
    tokens into a compute-bound forward) only near-certain drafts still pay. For one row
    this is the tree's own order. Once in a while the prefix kept is another, one that
    feeds a size the cost curve has not confirmed (`CostModel.explore`)."""
    reach = [calibration.reach(tree) for tree in trees]
    gain, tokens = float(len(trees) + others), fed  # every row yields at least its bonus token
    best_rate, best_steps = gain / cost(tokens, context), 0
    order: list[int] = []  # the row of each added node
    taken = [0] * len(trees)
    heap = [(-r[0], b) for b, r in enumerate(reach) if r]
    heapq.heapify(heap)
    while heap:
        neg, b = heapq.heappop(heap)
        order.append(b)
        taken[b] += 1
        if taken[b] < len(reach[b]):
            heapq.heappush(heap, (-reach[b][taken[b]], b))
        gain, tokens = gain - neg, tokens + 1
        rate = gain / cost(tokens, context)
        if rate > best_rate:
            best_rate, best_steps = rate, len(order)
    best_steps = cost.explore(fed, best_steps, len(order))
    sizes = [0] * len(trees)
    for b in order[:best_steps]:
        sizes[b] += 1
    return sizes


def expected_tokens(tree: TokenTree, size: int, calibration: Calibration) -> float:
    """Accepted tokens the first `size` nodes are worth by the per-edge rates alone."""
    return sum(calibration.reach(tree, scaled=False)[:size])


def _exclusive(tree: TokenTree, reach: list[float]) -> list[float]:
    """Siblings are different tokens at one position, so at most one of them is accepted:
    their chances add up to at most their parent's. Where the estimates add up to more,
    the siblings listed first (drafters list the likeliest first) keep theirs and the
    later ones get what is left, their subtrees scaled alike. Without this, a scale
    above 1 (copies longer than the rates expect) gave two equally scored branches a
    chance near 1 each: in bf16 on code, 24 nodes verified on steps where the first
    branch's 12 were accepted and the fixed 16-node size verified 12-16."""
    fitted = list(reach)
    for parent, kids in tree.children.items():  # parents come before their children
        above = 1.0 if parent < 0 else fitted[parent]
        shrink = 1.0 if parent < 0 or reach[parent] <= 0 else fitted[parent] / reach[parent]
        for kid in kids:
            fitted[kid] = min(reach[kid] * shrink, above)
            above -= fitted[kid]
    return fitted


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


class Gate:
    """Whether running the costly drafters (draft models: a forward per depth) pays at
    all. The cut sees what a tree is worth, not what it cost to draft; the gate compares
    drafted steps' time, drafting included, with what plain decoding would have spent
    on the same tokens (the cost curve) and, while drafting loses, skips it for 1, 2, 4,
    ... up to `longest` steps before trying again. The trie costs no forward and is
    never gated: the cut alone decides, and it keeps learning in the shadow."""

    def __init__(self, cost: CostModel, smoothing: float = 0.3, longest: int = 16):
        self.cost, self.smoothing, self.longest = cost, smoothing, longest
        self.spent = self.plain = 0.0  # moving averages over drafted steps
        self.tokens = self.drafting = 0.0  # and of their tokens and drafting seconds
        self.seen = 0
        self.skip, self.backoff = 0, 1
        self.since = 0  # steps since the draft models last ran

    def wanted(self) -> bool:
        """Whether this step should draft (counts a skipped step)."""
        self.since += 1
        if self.skip > 0:
            self.skip -= 1
            return False
        return True

    def observe(self, tokens: int, fed: int, draft_seconds: float, model_seconds: float, rows: int = 1) -> None:
        """A drafted step of `rows` rows: `tokens` yielded in all, `fed` pending tokens fed
        besides the trees. Plain decoding would have spent the pending tokens' forward,
        then a forward of `rows` tokens for every `rows` more tokens."""
        plain = self.cost(fed) + (tokens - rows) * self.cost(rows) / rows  # plain decoding, the same tokens
        a = 1.0 if self.seen == 0 else self.smoothing
        self.seen += 1
        self.since = 0
        self.plain += a * (plain - self.plain)
        self.spent += a * (draft_seconds + model_seconds - self.spent)
        self.tokens += a * (tokens / rows - self.tokens)  # per row, as `enough` compares them
        self.drafting += a * (draft_seconds / rows - self.drafting)
        if self.spent <= self.plain:
            self.backoff = 1
        else:
            self.skip, self.backoff = self.backoff, min(2 * self.backoff, self.longest)

    def enough(self, cheap_tokens: float) -> bool:
        """Whether a step whose cheap drafters (the trie) alone are worth `cheap_tokens`
        (bonus included) should leave the draft models out. With them, a step yielded
        `tokens` on average and took `drafting` seconds more; without, it takes about a
        token's forward t. They pay when tokens / (t + drafting) > cheap_tokens / t, so
        they are left out unless tokens > cheap_tokens * (1 + drafting / t): a trie that
        already offers 4 tokens leaves little for a draft model's 8 forwards to add (on an
        MT-Bench second turn that the trie copies, the hybrid ran the draft model at every
        step and took 12.4 s against the pure trie's 8.6 s). Never
        before a drafted step, nor after `longest` steps without one: the averages come
        only from steps that ran them, and a bad start must not keep them out for good."""
        if self.seen == 0 or self.since >= self.longest:
            return False
        return self.tokens <= cheap_tokens * (1 + self.drafting / self.cost(1))


def worth(tree: TokenTree, calibration: Calibration) -> float:
    """Expected accepted tokens of the whole tree, by the calibrated (and scaled) rates."""
    return sum(calibration.reach(tree))


class Budget:
    """An engine's adaptive budget, behind the calls its decode step makes: before the
    forward, `allow_costly` (whether draft models run this step) and `plan` (how many of
    each row's tree nodes to verify); after it, `observe` (what the step cost and gave).
    `cost` is the machine's forward cost curve; `costly`: the drafter runs forwards of
    its own, which the gate weighs."""

    def __init__(self, cost: CostModel, costly: bool = False, calibration: Calibration | None = None):
        self.cost = cost
        self.calibration = calibration if calibration is not None else Calibration()
        self.gate = Gate(cost) if costly else None

    def allow_costly(self) -> Callable[[TokenTree], bool] | None:
        """This step's rule for the drafters that cost forwards, one decision for every
        row (drafters.base.Allow); None when the drafter has none."""
        gate = self.gate
        if gate is None:
            return None
        if not gate.wanted():
            return lambda cheap: False
        return lambda cheap: not gate.enough(1 + worth(cheap, self.calibration))

    def plan(self, trees: list[TokenTree], fed: int, others: int = 0, context: int | None = None) -> list[int]:
        """How many of each tree's first nodes to verify in one forward (`best_sizes`)."""
        return best_sizes(trees, fed, self.cost, self.calibration, others=others, context=context)

    def observe(self, fed: int, seconds: float, context: int, drafted: tuple[int, int, float, int] | None) -> None:
        """A step fed `fed` tokens in `seconds` after `context` cached ones; `drafted`:
        (tokens yielded, pending tokens fed, drafting seconds, rows) when every row's
        costly drafters ran, for the gate (None otherwise)."""
        self.cost.observe(fed, seconds, context)
        if self.gate is not None and drafted is not None:
            tokens, pending, draft_seconds, rows = drafted
            self.gate.observe(tokens, pending, draft_seconds, seconds, rows)
