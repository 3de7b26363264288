"""Several drafters' trees merged into one token tree (SpecInfer's merge), within one
budget: in particular the trie and a small model together (the *hybrid*): copy-heavy
spans come from the trie, the rest from the model.
"""

from __future__ import annotations

from typing import Sequence

from ..tree import TRIE, TokenTree
from .base import Allow, Drafter, DraftSession, check_drafter


class MergedDrafter(Drafter):
    """Runs every drafter each step and merges their trees.

    decoding_length: most nodes of the merged tree (default: the largest of the drafters').
    confident: the first drafter's nodes whose estimated acceptance is at least this come
        first (the trie's confident copy spans); all other nodes compete by score. When
        the first drafter alone fills the budget with such nodes, the others are not run
        that step (they still learn every token).
    """

    def __init__(self, drafters: Sequence[Drafter], decoding_length: int | None = None, confident: float = 0.5):
        drafters = list(drafters)
        if not drafters:
            raise ValueError("MergedDrafter needs at least one drafter")
        for d in drafters:
            check_drafter(d)
        if decoding_length is not None and (not isinstance(decoding_length, int) or decoding_length < 1):
            raise ValueError(f"decoding_length must be an integer >= 1, got {decoding_length!r}")
        if not 0 <= confident <= 1:
            raise ValueError(f"confident must be in [0, 1], got {confident}")
        self.drafters = drafters
        self.decoding_length = decoding_length or max(d.decoding_length for d in drafters)
        self.confident = confident
        self.costly = any(d.costly for d in drafters)

    @property
    def memory(self):
        """The first merged drafter's memory that there is (the trie's)."""
        return next((d.memory for d in self.drafters if d.memory is not None), None)

    @memory.setter
    def memory(self, trie) -> None:
        keeper = next((d for d in self.drafters if d.memory is not None), None)
        if keeper is None:
            raise ValueError("none of the merged drafters keeps a memory")
        keeper.memory = trie

    def bind(self, model, tokenizer=None, cost=None) -> None:
        for d in self.drafters:
            d.bind(model, tokenizer, cost)

    def learn_text(self, token_ids: Sequence[int], context: Sequence[int] = ()) -> None:
        """Warm the drafters that keep a memory (the trie) with a past answer."""
        learners = [d for d in self.drafters if d.memory is not None]
        if not learners:
            raise ValueError("none of the merged drafters keeps a memory to learn from")
        for d in learners:
            d.learn_text(token_ids, context)

    def begin(self, prompt_ids: Sequence[int], sampling=None) -> MergedSession:
        return MergedSession(self, [d.begin(prompt_ids, sampling) for d in self.drafters])


class MergedSession(DraftSession):
    def __init__(self, drafter: MergedDrafter, sessions: list[DraftSession]):
        self.d, self.sessions = drafter, sessions

    def propose(self, max_nodes: int, max_depth: int, allow_costly: Allow | None = None) -> TokenTree:
        """The merged tree. The drafters that cost no forward (the trie) propose first;
        `allow_costly(tree)` (the engine's budget) may say their tree is worth as much as
        a draft model could add, and the costly drafters are then not run. Without it,
        they are skipped when the first drafter alone fills the budget with confident
        nodes."""
        budget = min(max_nodes, self.d.decoding_length)
        costly = [d.costly for d in self.d.drafters]
        trees = [TokenTree() if c else session.propose(budget, max_depth)
                 for c, session in zip(costly, self.sessions)]
        cheap = merge(trees, budget, max_depth, self.d.confident)
        if not any(costly):
            return cheap
        if allow_costly is None:
            first = trees[0].scores or (1.0,) * len(trees[0])
            run = sum(s >= self.d.confident for s in first) < budget
        else:
            run = allow_costly(cheap)
        if not run:
            return cheap
        trees = [session.propose(budget, max_depth) if c else tree
                 for c, session, tree in zip(costly, self.sessions, trees)]
        return merge(trees, budget, max_depth, self.d.confident)

    def learn(self, new_ids: Sequence[int]) -> None:
        for session in self.sessions:
            session.learn(new_ids)

    def end(self) -> None:
        for session in self.sessions:
            session.end()


def merge(trees: Sequence[TokenTree], max_nodes: int, max_depth: int, confident: float = 0.5) -> TokenTree:
    """One tree from several, shared prefixes merged, cut to `max_nodes` and `max_depth`.

    A merged node's score is the largest of its sources' (None scores count as 1), and its
    kind the largest (MODEL when a draft model proposed it: the budget trusts its q). The
    first tree's nodes scoring at least `confident` are kept first, then the rest by
    score; scores never grow along a path, so the kept nodes form a tree.

    The lossless rule for draft probabilities (q). Multi-step speculative sampling is
    exact only if each child was *drawn* from its recorded q, with nothing about the
    tree's shape depending on that draw. Merging breaks this: whether a sampled node is
    merged into another source's node, and whether the budget keeps it, depend on the
    token it drew. So:
    - when only one tree has nodes, it is returned as it was proposed (its q kept; the
      cut is only a prefix, which the drafters already respect);
    - when several trees have nodes, the merged tree has no q: every node counts as
      one-hot. The one-hot rule ("sample x from p, descend into a child with token x")
      is exact for any tree whose tokens were chosen independently of the verifier's
      random numbers, which holds for every drafter here (deterministic trie and top-k
      expansions, and sampled drafts, which use a random stream of their own).
    """
    contributing = [t for t in trees if len(t)]
    if len(contributing) <= 1:
        return contributing[0].prefix(max_nodes, max_depth) if contributing else TokenTree()
    tokens: list[int] = []
    parents: list[int] = []
    depths: list[int] = []
    scores: list[float] = []
    first: list[bool] = []  # a confident node of the first tree
    kinds: list[int] = []
    index: dict[tuple[int, int], int] = {}  # (merged parent, token) -> merged node
    for k, tree in enumerate(trees):
        tree_scores = tree.scores or (1.0,) * len(tree)
        tree_kinds = tree.kinds or (TRIE,) * len(tree)
        where: dict[int, int] = {}  # this tree's node -> merged node
        for i, (token, parent) in enumerate(zip(tree.tokens, tree.parents)):
            merged_parent = -1 if parent < 0 else where[parent]
            node = index.get((merged_parent, token))
            if node is None:
                node = index[(merged_parent, token)] = len(tokens)
                tokens.append(token)
                parents.append(merged_parent)
                depths.append(1 if merged_parent < 0 else depths[merged_parent] + 1)
                scores.append(tree_scores[i])
                first.append(False)
                kinds.append(TRIE)
            else:
                scores[node] = max(scores[node], tree_scores[i])
            first[node] |= k == 0 and tree_scores[i] >= confident
            kinds[node] = max(kinds[node], tree_kinds[i])
            where[i] = node
    chosen: set[int] = set()
    for i in sorted(range(len(tokens)), key=lambda i: (not first[i], -scores[i], i)):
        if len(chosen) >= max_nodes:
            break
        if depths[i] <= max_depth and (parents[i] < 0 or parents[i] in chosen):
            chosen.add(i)
    keep = sorted(chosen)  # merged nodes are in topological order
    new = {-1: -1, **{old: i for i, old in enumerate(keep)}}
    return TokenTree(tuple(tokens[i] for i in keep), tuple(new[parents[i]] for i in keep),
                     tuple(scores[i] for i in keep), kinds=tuple(kinds[i] for i in keep))
