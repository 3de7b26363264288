"""Adaptive draft budget: verify as many draft tokens as pay off, down to none.

Goodput (SmartSpec, arXiv 2406.14066): a step that feeds k pending tokens and m draft
nodes yields 1 + (expected accepted tokens) tokens and costs cost(k + m) seconds. The
tree is cut to the m that maximises that ratio, m = 0 included; in a batch, the rows'
nodes compete for one forward (`best_sizes`).

- `CostModel`: seconds per forward by tokens fed, timed on this machine at a cold start
  (a few sizes), refined by real steps and kept on disk (budget_store): the curve
  differs by hardware and dtype by several times over.
- `Calibration`: how often a node is accepted when its parent is, by the drafter's
  edge probability and the kind of score, learned from every proposed
  tree, the cut ones included: a tree is scored afterwards against the tokens that were
  generated ("shadow acceptance"), so the budget can come back up after it has gone to
  zero.
- `Gate`: whether running a draft model pays at all, its forwards included.

Each part is here because removing it costs speed on some workload: docs/budget.md has
the ablation (scripts/ablate_budget.py).
"""

from __future__ import annotations

import bisect
import heapq
import logging
import time
import weakref
from typing import Callable

import numpy as np
import torch
from transformers import DynamicCache

from .kernels import current as current_kernels, warm
from .kv import KVCache, keep_paths
from .masks import Row, context_length, forward, pack, with_cache
from .tree import KINDS, TRIE, TokenTree


log = logging.getLogger(__name__)
_MEASURED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(max_tokens, kernels): CostModel}


class CostModel:
    """Seconds per forward by tokens fed, linear between the sizes it holds.

    The curve holds every size up to the largest, each refined by real steps of that
    size alone: matrix kernels work in blocks of rows, so a size between two timed ones
    can cost more than both, and only its own steps show it. `confirmed`: the size's
    time comes from a forward of exactly that size; the others lie on the line between
    the confirmed ones around them. `stepped`: a real step of that size has been seen. A
    start-up timing is one forward, at the mercy of the load in that second; a size it
    priced too dear is one the cut avoids, so only a real step of it can bring it down
    (the budget probes the timed sizes no step has shown: `unstepped`). A curve given
    whole (no flags) is taken as known: every size confirmed and stepped.

    A forward after more cached tokens than `context` costs `per_context` = (a, b) more
    per cached token, a per forward and b per token fed (attention reads every cached
    entry once per query): the benchmark prices forwards with it. The budget's cut does
    not, and an engine's curve measures none.
    """

    def __init__(self, sizes: list[int], seconds: list[float], smoothing: float = 0.2, context: int = 0,
                 per_context: tuple[float, float] = (0.0, 0.0), confirmed: list[bool] | None = None,
                 stepped: list[bool] | None = None):
        if len(sizes) != len(seconds) or not sizes or sorted(sizes) != sizes:
            raise ValueError("CostModel needs ascending sizes with one time each")
        if len(per_context) != 2 or min(per_context) < 0:
            raise ValueError(f"per_context must be two seconds per cached token >= 0, got {per_context}")
        if confirmed is not None and len(confirmed) != len(sizes):
            raise ValueError(f"confirmed needs one flag per size ({len(sizes)}), got {len(confirmed)}")
        self.sizes, self.seconds, self.smoothing = list(sizes), list(seconds), smoothing
        self.context, self.per_context = context, tuple(per_context)
        if stepped is not None and len(stepped) != len(sizes):
            raise ValueError(f"stepped needs one flag per size ({len(sizes)}), got {len(stepped)}")
        self.confirmed = [True] * len(sizes) if confirmed is None else [bool(c) for c in confirmed]
        self.stepped = list(self.confirmed) if stepped is None else [bool(c) for c in stepped]
        if any(st and not c for st, c in zip(self.stepped, self.confirmed)):
            raise ValueError("stepped sizes must be confirmed: a real step gave their time")

    def __call__(self, tokens: int, context: int | None = None) -> float:
        """Seconds for a forward over `tokens` tokens after `context` cached tokens (None:
        the measured context); beyond the largest size, the last slope goes on."""
        s, t = self.sizes, self.seconds
        if tokens <= s[0]:
            base = t[0]
        else:
            hi = min(bisect.bisect_left(s, tokens), len(s) - 1)
            base = t[hi - 1] + (t[hi] - t[hi - 1]) / (s[hi] - s[hi - 1]) * (tokens - s[hi - 1])
        if context is not None:
            a, b = self.per_context
            base += (context - self.context) * (a + b * tokens)
        return max(base, 1e-9)

    def observe(self, tokens: int, seconds: float) -> None:
        """Move the curve towards a real step's time by `smoothing`: the size itself, or
        the two around it, each by its share of the interpolation. The first real step of
        a size (interpolated, or only timed at start-up) confirms it and, if faster than
        its price, takes its time whole: a size priced too dear is one the cut avoids, so
        nothing else would bring it down. Unconfirmed sizes then follow the line between
        their confirmed neighbours."""
        s = self.sizes
        if tokens > s[-1]:
            return
        hi = bisect.bisect_left(s, tokens)
        w = 1.0 if tokens <= s[0] else (tokens - s[hi - 1]) / (s[hi] - s[hi - 1])
        error = seconds - self(tokens)
        if s[hi] == tokens and not self.stepped[hi]:
            self.seconds[hi] += error if error < 0 else self.smoothing * error
            self.confirmed[hi] = self.stepped[hi] = True
        else:
            for i, share in ((hi - 1, 1.0 - w), (hi, w)):
                if share > 0:
                    self.seconds[i] += self.smoothing * share * error
        known = [i for i, c in enumerate(self.confirmed) if c]
        for lo, hi in zip(known, known[1:]):
            for i in range(lo + 1, hi):
                w = (s[i] - s[lo]) / (s[hi] - s[lo])
                self.seconds[i] = self.seconds[lo] + w * (self.seconds[hi] - self.seconds[lo])

    def unstepped(self, above: int, most: int) -> int | None:
        """The smallest size in (`above`, `most`] timed but not shown by a real step yet, if
        any: the sizes between follow the line between such sizes, and come down with them."""
        return next((n for n, c, st in zip(self.sizes, self.confirmed, self.stepped)
                     if above < n <= most and c and not st), None)

    def hopeful(self) -> CostModel:
        """This curve with each size no real step has shown priced at most as the largest
        smaller size one has: what the cut could choose were the start-up's timings too
        dear (a forward over more tokens costs no less)."""
        seconds, floor = list(self.seconds), None
        for i, stepped in enumerate(self.stepped):
            if stepped:
                floor = seconds[i]
            elif floor is not None:
                seconds[i] = min(seconds[i], floor)
        return CostModel(self.sizes, seconds, context=self.context, per_context=self.per_context)

    @classmethod
    def from_timings(cls, sizes: list[int], seconds: list[float], most: int, context: int = 0,
                     per_context: tuple[float, float] = (0.0, 0.0)) -> CostModel:
        """The curve a cold start holds: every size up to `most`, the timed `sizes`
        confirmed at their `seconds`, the others on the line between them, no size
        stepped yet."""
        timed = cls(sizes, seconds, context=context, per_context=per_context)
        every = list(range(1, most + 1))
        return cls(every, [timed(n) for n in every], context=context, per_context=per_context,
                   confirmed=[n in sizes for n in every], stepped=[False] * most)

    @classmethod
    def of(cls, model, config, max_tokens: int, saved: CostModel | None = None) -> CostModel:
        """The model's cost curve, one per process, kernels (kernels.current) and size:
        the curve belongs to the model and the machine, and every engine of the model
        refines it. The first engine takes the curve `saved` on disk, else measures it."""
        curves = _MEASURED.setdefault(model, {})
        key = (max_tokens, current_kernels(model))
        if key not in curves:
            curves[key] = saved if saved is not None else cls.measure(model, config, max_tokens)
        return curves[key]

    @classmethod
    @torch.inference_mode()
    def measure(cls, model, config, max_tokens: int, context: int = 64, repeats: int = 1,
                long_context: int = 0, every: int = 2) -> CostModel:
        """Time forwards of 1, 2, ... `every` tokens, then of doubling sizes up to
        `max_tokens`, after `context` cached tokens, each the fastest of `repeats` passes
        over all the sizes (passes, so that a burst of load inflates different sizes each
        time); and, if `long_context` > `context`, of 1 and `max_tokens` tokens after
        `long_context` (`per_context`). The curve holds every size up to `max_tokens`: the
        timed ones confirmed, the others on the line between them for real steps to
        confirm; no size stepped yet. The defaults are an engine's cold start: a few
        forwards, not one per size.
        Every linear shape is first run once at each size (kernels.warm), so that no
        kernel's first-call cost is timed."""
        sizes = timed_sizes(max_tokens, every)
        log.info("triespec: timing forwards of %s tokens (%s kernels)", ", ".join(map(str, sizes)),
                 current_kernels(model))
        warm(model, sizes)
        cache = KVCache()  # the engine's own
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
            # the per-cached-token cost is the difference of two timings, the long one the fastest of two at least
            steady, ends = max(repeats, 2), (1, sizes[-1])
            _lengthen(cache, long_context)
            timed(1, long_context, 1)
            extra = [(timed(n, long_context, steady) - seconds[sizes.index(n)]) / (long_context - context)
                     for n in ends]
            b = max(extra[1] - extra[0], 0.0) / max(sizes[-1] - 1, 1)  # extra = a + b * tokens
            per_context = (max(extra[0] - b, 0.0), b)
        return cls.from_timings(sizes, seconds, max_tokens, context, per_context)


def timing(model, max_tokens: int) -> Callable[[], list[float]]:
    """What kernels.use times to choose a model's kernels: the cold cost curve of the
    kernels the model is on (`CostModel.of`, so the chosen kernels' curve is the one the
    engine's budget then starts from, and a cold start times each kernel once)."""
    config = model.config.get_text_config()
    sizes = timed_sizes(max_tokens)
    # priced at the sizes a cold curve times: a curve real steps refined holds more, and
    # both kernels must be summed over the same ones
    return lambda: [CostModel.of(model, config, max_tokens)(n) for n in sizes]


def timed_sizes(max_tokens: int, every: int = 2) -> list[int]:
    """The forward sizes `CostModel.measure` times: 1 .. `every`, then doubling up to
    `max_tokens` itself."""
    sizes = list(range(1, min(every, max_tokens) + 1))
    while sizes[-1] < max_tokens:
        sizes.append(min(sizes[-1] * 2, max_tokens))
    return sizes


def _lengthen(cache: DynamicCache, length: int) -> None:
    """Grow every layer's cached entries to `length` positions by repeating them: what a
    forward costs depends on how many entries it attends to, not on what they hold, and
    a real prefill that long would take longer than the timing itself."""
    for layer in cache.layers:
        if layer.is_initialized and layer.keys.numel():
            # keys, values: [B, H, S, D] -> [B, H, length, D]
            times = -(-length // layer.keys.shape[2])
            layer.keys = layer.keys.repeat(1, 1, times, 1)[:, :, :length].contiguous()
            layer.values = layer.values.repeat(1, 1, times, 1)[:, :, :length].contiguous()


class Calibration:
    """Observed acceptance rate of draft nodes given their parent's, in cells by the
    probability the drafter gave the edge (`bins`) and by the kind of score (tree.KINDS):
    a trie's count ratio and a draft model's q mean different things, and each sorts
    its edges even where it is not their rate.

    Each cell starts at its bin's middle, worth `prior` edges, and learns from every
    proposed tree, the ones cut to nothing included (scored in the shadow, which costs
    no forward), so a wrong start is corrected within a few steps. A cell remembers
    about `memory` edges: past that, its counts shrink so that each new edge keeps its
    weight, since one engine serves every kind of request and what pays changes with
    them."""

    def __init__(self, bins: int = 10, prior: float = 2.0, memory: float | None = 16.0):
        if memory is not None and memory < prior + 1:
            raise ValueError(f"memory must hold the prior and an observation (>= {prior + 1}), got {memory}")
        self.bins, self.memory = bins, memory
        self.drafted = [prior] * (len(KINDS) * bins)
        self.accepted = [prior * (c % bins + 0.5) / bins for c in range(len(self.drafted))]

    def _cell(self, p: float, kind: int = TRIE) -> int:
        return kind * self.bins + min(int(max(p, 0.0) * self.bins), self.bins - 1)

    def rate(self, p: float, kind: int = TRIE) -> float:
        c = self._cell(p, kind)
        return self.accepted[c] / self.drafted[c]

    def observe(self, p: float, accepted: bool, kind: int = TRIE) -> None:
        """One edge seen, accepted or not."""
        c = self._cell(p, kind)
        drafted, accepted = self.drafted[c] + 1, self.accepted[c] + accepted
        keep = 1.0 if self.memory is None or drafted <= self.memory else self.memory / drafted
        self.drafted[c], self.accepted[c] = drafted * keep, accepted * keep

    def node_rate(self, tree: TokenTree, node: int) -> float:
        kind = TRIE if tree.kinds is None else tree.kinds[node]
        return self.rate(edge_score(tree, node), kind)

    def reach(self, tree: TokenTree) -> list[float]:
        """Each node's chance of being accepted: a node is accepted only if its parent
        is, so it is the product of the calibrated rates of its path's edges."""
        reach: list[float] = []
        for node, parent in enumerate(tree.parents):
            reach.append((reach[parent] if parent >= 0 else 1.0) * self.node_rate(tree, node))
        return reach

    def state(self) -> np.ndarray:
        """Everything learned, flat (saved with the trie and the budget, so a restart keeps it)."""
        return np.array([*self.drafted, *self.accepted], dtype=np.float64)

    def restore(self, state: np.ndarray) -> None:
        """Take back a `state()`; ValueError if it is not one of this calibration's shape."""
        cells = len(self.drafted)
        state = np.asarray(state, dtype=np.float64)
        if state.shape != (2 * cells,) or not np.isfinite(state).all() or (state < 0).any() \
                or (state[cells:] > state[:cells]).any():
            raise ValueError(f"not a calibration of {cells} cells")
        self.drafted, self.accepted = state[:cells].tolist(), state[cells:].tolist()


class Watched:
    """A proposed tree (verified or cut) that the calibration learns from edge by edge,
    as the generated tokens decide them: a depth-1 edge is decided by the next token, so
    a cold start learns within a step, not once the tree's whole depth is generated."""

    def __init__(self, start: int, tree: TokenTree):
        self.start, self.tree = start, tree  # start: where the tree's root token sits in the sequence
        self.learned: set[int] = set()

    def update(self, calibration: Calibration, seq: list[int], finished: bool = False) -> bool:
        """Teach `calibration` the edges that `seq` newly decides; True once the tree is
        decided (or the generation `finished`) and it can be dropped."""
        realized, tree = seq[self.start :], self.tree
        for node, accepted in edges(tree, realized):
            if node not in self.learned:
                self.learned.add(node)
                calibration.observe(edge_score(tree, node), accepted, TRIE if tree.kinds is None else tree.kinds[node])
        return finished or len(realized) >= tree.depth


def edge_score(tree: TokenTree, node: int) -> float:
    """The drafter's probability of `node` given that its parent is right: tree scores
    are path probabilities, so this is the node's score over its parent's."""
    parent = tree.parents[node]
    above = tree.scores[parent] if parent >= 0 else 1.0
    return min(tree.scores[node] / above, 1.0) if above > 0 else 0.0


def best_size(tree: TokenTree, pending: int, cost: CostModel, calibration: Calibration) -> int:
    """How many of the tree's first nodes maximise expected tokens per second, `pending`
    tokens being fed anyway (`best_sizes` for one row)."""
    return best_sizes([tree], pending, cost, calibration)[0]


def best_sizes(trees: list[TokenTree], fed: int, cost: CostModel, calibration: Calibration,
               others: int = 0, at_least: int = 0) -> list[int]:
    """For a batch sharing one forward: how many of each tree's first nodes to verify so
    that the forward yields the most expected tokens per second, `fed` tokens (every
    row's pending tokens, and any tree that is not cut) being fed anyway, and `others`
    rows without a tree to cut yielding their one token too; `at_least` tokens fed in
    all where the trees hold that many (the likeliest nodes added first, as always).

    Nodes are added one at a time, the likeliest next node of any row first, and the
    best prefix of that order is kept: under load (many rows already feeding a
    compute-bound forward) only near-certain drafts still pay. Drafters list nodes
    likeliest first, parents before children, so for one row this is the tree's order."""
    reach = [calibration.reach(tree) for tree in trees]
    gain, tokens = float(len(trees) + others), fed  # every row yields at least its bonus token
    best_rate, best_steps = gain / cost(tokens), 0
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
        rate = gain / cost(tokens)
        if rate > best_rate:
            best_rate, best_steps = rate, len(order)
    best_steps = max(best_steps, min(len(order), at_least - fed))
    sizes = [0] * len(trees)
    for b in order[:best_steps]:
        sizes[b] += 1
    return sizes


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
        token's forward t. They pay when tokens / (t + drafting) > cheap_tokens / t: a
        trie that already copies leaves little for a draft model's forwards to add. Never
        before a drafted step, nor after `longest` steps without one: the averages come
        only from steps that ran them, and a bad start must not keep them out for good."""
        if self.seen == 0 or self.since >= self.longest:
            return False
        return self.tokens <= cheap_tokens * (1 + self.drafting / self.cost(1))


class Budget:
    """An engine's adaptive budget, behind the calls its decode step makes: before the
    forward, `allow_costly` (whether draft models run this step) and `plan` (how many of
    each row's tree nodes to verify); after it, `observe` (what the step cost and gave).
    `cost` is the machine's forward cost curve; `costly`: the drafter runs forwards of
    its own, which the gate weighs.

    A probe: where the cut would keep more nodes if the sizes no real step has shown cost
    no more than the largest smaller one that has (`CostModel.hopeful`), the forward is
    grown to the smallest size above the cut that was timed but never stepped
    (`CostModel.unstepped`). Each size is probed once at most, so that a start-up timing
    caught by a burst of load cannot keep a size out for good, and only where its price
    is what keeps it out. What probes cost beyond the cut's own price is kept under
    `probe_share` of the time of the forwards the curve prices, one probe's excess at
    most: a probe waits until the share holds what probes spent and its own hopeful
    price beyond the cut's."""

    probe_share = 0.05

    def __init__(self, cost: CostModel, costly: bool = False, calibration: Calibration | None = None):
        self.cost = cost
        self.calibration = calibration if calibration is not None else Calibration()
        self.gate = Gate(cost) if costly else None
        self.spent = self.probes_spent = 0.0  # seconds of the priced forwards; what probes added to their cuts
        self.probed: int | None = None  # the size this step's cut chose, when the step probes

    def allow_costly(self) -> Callable[[TokenTree], bool] | None:
        """This step's rule for the drafters that cost forwards, one decision for every
        row (drafters.base.Allow); None when the drafter has none."""
        gate = self.gate
        if gate is None:
            return None
        if not gate.wanted():
            return lambda cheap: False
        return lambda cheap: not gate.enough(1 + sum(self.calibration.reach(cheap)))

    def plan(self, trees: list[TokenTree], fed: int, others: int = 0) -> list[int]:
        """How many of each tree's first nodes to verify in one forward (`best_sizes`),
        grown now and then to a size no real step has shown (the class's docstring)."""
        sizes = best_sizes(trees, fed, self.cost, self.calibration, others=others)
        self.probed = None
        chosen = fed + sum(sizes)
        probe = self.cost.unstepped(chosen, fed + sum(len(tree) for tree in trees))
        if probe is not None:
            hopeful = self.cost.hopeful()
            hoped = fed + sum(best_sizes(trees, fed, hopeful, self.calibration, others=others))
            # what probes spent, and this one at its hopeful price beyond the cut's, within the share
            if hoped >= probe and self.probes_spent + max(hopeful(probe) - self.cost(chosen), 0.0) \
                    <= self.probe_share * self.spent:
                self.probed = chosen
                sizes = best_sizes(trees, fed, self.cost, self.calibration, others=others, at_least=probe)
        return sizes

    def observe(self, fed: int, seconds: float, drafted: tuple[int, int, float, int] | None) -> None:
        """A step fed `fed` tokens in `seconds`; `drafted`: (tokens yielded, pending tokens
        fed, drafting seconds, rows) when every row's costly drafters ran, for the gate
        (None otherwise)."""
        if self.probed is not None:
            self.probes_spent += max(seconds - self.cost(self.probed), 0.0)
            self.probed = None
        if fed <= self.cost.sizes[-1]:  # a forward the curve prices (not a prefill)
            self.spent += seconds
        self.cost.observe(fed, seconds)
        if self.gate is not None and drafted is not None:
            tokens, pending, draft_seconds, rows = drafted
            self.gate.observe(tokens, pending, draft_seconds, seconds, rows)
