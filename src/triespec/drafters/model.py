"""SpecInfer's small-model drafter (Miao et al., ASPLOS 2024, section 3): a small causal
LM of the same vocabulary grows a token tree by expansion, `widths[d]` children for every
node at depth d (their experiments: widths (1, 1, 3, 1, 1, 1, 1, 1)).

One draft forward per depth: the first feeds the tokens committed since the last step
(the KV cache follows the accepted path, so the context is never re-read), each later
one feeds a whole level of the tree with a tree attention mask over the cache.

How children are chosen, and why the result stays lossless:
- by default, the top-`width` tokens of the draft's distribution. The tree is then a
  deterministic function of the context: its proposal law is one-hot, so the tree
  carries no `draft_probs` (attaching the draft's softmax to top-k picks would bias
  multi-step speculative sampling, which assumes each child was *drawn* from its q);
- with `sample=True` and a sampling request, children are drawn from the draft's
  distribution under the request's own processors (temperature, top-k, top-p, ...),
  siblings without replacement: child i is drawn from q with the earlier siblings'
  tokens removed and renormalised, and that distribution is recorded as its q. The
  tree's slots are fixed before anything is drawn; a slot stays empty only when q has no
  mass left or its parent is not expanded (below `min_score`), so whether a node exists
  depends on its ancestors' values, never on its own or its siblings': exactly the
  premise of multi-step speculative sampling, which decides among siblings from their
  tokens and q alone. The draws use their own random stream, independent of the
  verifier's.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch

from ..budget import CostModel
from ..kv import KVCache, keep_path
from ..masks import Packed, Row, attention_mask, check_tree_attention, context_length, forward, pack
from ..tree import MODEL, TokenTree
from .base import Drafter, DraftSession


class ModelDrafter(Drafter):
    """Token trees from a small causal LM sharing the target's vocabulary.

    draft_model: a loaded Hugging Face causal LM (eval mode, any dtype).
    widths: children per node at each depth; len(widths) is the deepest branch.
    tokenizer: the draft model's tokenizer, checked against the target's when given.
    max_nodes: most nodes per tree (default: the full expansion, 20 for the default widths).
    sample: draw children from the draft distribution (recording q) when the request
        samples; otherwise, and always for greedy requests, take the top-k.
    min_score: expand only nodes whose path is at least this likely under the draft (the
        product of draft probabilities along it, also the node's `score`); the draft stops
        early when no node of a level is, so an unsure draft costs fewer forwards (as
        transformers' assisted generation stops at its assistant_confidence_threshold).
        None (the default): 0.1, or under an adaptive engine what a draft forward costs in
        target forwards (`bind`): expanding a node costs a draft forward and is worth at
        most its path's chance of a token that plain decoding pays a target forward for.
    """

    costly = True  # a forward per depth: the engine's gate may skip it while it does not pay

    def __init__(self, draft_model, widths: Sequence[int] = (1, 1, 3, 1, 1, 1, 1, 1), tokenizer=None,
                 max_nodes: int | None = None, sample: bool = False, min_score: float | None = None):
        widths = tuple(widths)
        if not widths or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"widths must be a non-empty sequence of integers >= 1, got {widths!r}")
        if max_nodes is not None and (not isinstance(max_nodes, int) or max_nodes < 1):
            raise ValueError(f"max_nodes must be an integer >= 1 or None, got {max_nodes!r}")
        if min_score is not None and not 0 <= min_score <= 1:
            raise ValueError(f"min_score must be in [0, 1] or None, got {min_score}")
        if not hasattr(draft_model, "get_output_embeddings") or draft_model.get_output_embeddings() is None:
            raise ValueError(f"draft model {type(draft_model).__name__} is not a causal LM with an output layer")
        check_tree_attention(draft_model)
        self.model = draft_model.eval()
        self.tokenizer = tokenizer
        self.widths = widths
        self.sample = sample
        self.priced = min_score is None  # set by bind() under an adaptive engine
        self.min_score = 0.1 if min_score is None else min_score
        self.config = draft_model.config.get_text_config()
        self.vocab_size = draft_model.get_output_embeddings().weight.shape[0]
        self.target_vocab_size = self.vocab_size  # set by bind()
        full = sum(_level_sizes(widths))
        self.decoding_length = min(max_nodes or full, full)
        self.branch_length = len(widths)
        self.context_length = context_length(self.config)
        self._logits_to_keep = "logits_to_keep" in inspect.signature(draft_model.forward).parameters

    def bind(self, model, tokenizer=None, cost=None) -> None:
        """Check that this draft model speaks the target's vocabulary (ValueError if not).
        Under an adaptive engine (`cost`: the target's budget.CostModel), expand only nodes
        whose path is likelier than a draft forward's cost in target forwards, unless
        min_score was given: a path the draft gives 20% pays for a draft forward that
        costs a third of a target one for a fifth of a token at best."""
        check_same_vocabulary(self.model, self.tokenizer, model, tokenizer)
        self.target_vocab_size = model.get_output_embeddings().weight.shape[0]
        if cost is not None and self.priced:
            own = CostModel.of(self.model, self.config, max(self.widths))
            self.min_score = min(max(own(1) / cost(1), 0.1), 0.9)

    def begin(self, prompt_ids: Sequence[int], sampling=None) -> ModelSession:
        return ModelSession(self, prompt_ids, sampling)


def check_same_vocabulary(draft_model, draft_tokenizer, model, tokenizer) -> None:
    """ValueError unless the draft and target share one vocabulary: the same tokenizer
    vocabulary when both tokenizers are known, else the same embedding size."""
    name = getattr(draft_model.config, "name_or_path", "") or type(draft_model).__name__
    if draft_tokenizer is not None and tokenizer is not None:
        if len(draft_tokenizer) != len(tokenizer) or draft_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"draft model {name!r} has a different tokenizer from the target model "
                             f"({len(draft_tokenizer)} vs {len(tokenizer)} tokens, or different ids): "
                             "a draft model must share the target's tokenizer")
        return
    draft_rows = draft_model.get_input_embeddings().weight.shape[0]
    rows = model.get_input_embeddings().weight.shape[0]
    if draft_rows != rows:
        raise ValueError(f"draft model {name!r} has a vocabulary of {draft_rows} tokens, the target {rows}: "
                         "a draft model must share the target's tokenizer")


def _level_sizes(widths: Sequence[int]) -> list[int]:
    sizes, n = [], 1
    for w in widths:
        n *= w
        sizes.append(n)
    return sizes


def tree_shape(widths: Sequence[int], budget: int, depth_cap: int) -> list[int]:
    """Parents of the expansion's slots in breadth-first order, cut at `budget` slots.

    Fixed before any token is chosen, so which slots exist never depends on what fills them.
    """
    parents: list[int] = []
    frontier = [-1]
    for depth in range(min(depth_cap, len(widths))):
        nxt = []
        for p in frontier:
            for _ in range(widths[depth]):
                if len(parents) >= budget:
                    return parents
                nxt.append(len(parents))
                parents.append(p)
        frontier = nxt
    return parents


class ModelSession(DraftSession):
    """One request. The draft cache holds `past` committed tokens; `pending` committed
    tokens wait to be fed; after propose() the cache also holds the tree's fed nodes,
    which learn() reduces to the accepted path (and propose() drops, if not)."""

    def __init__(self, drafter: ModelDrafter, prompt_ids: Sequence[int], sampling=None):
        self.d = drafter
        self.cache = KVCache()
        self.past = 0
        self.seq = list(prompt_ids)  # every committed token
        self.pending = list(prompt_ids)
        self.root_logits: torch.Tensor | None = None  # [V] after the last committed token
        self.sampling = sampling if drafter.sample and sampling is not None and sampling.do_sample else None
        self.generator = None
        if self.sampling is not None:
            # a stream of its own, seeded by the request: drafts must not depend on the verifier's draws
            self.generator = torch.Generator().manual_seed(hash((self.sampling.seed, 0x5EED)) & (2**63 - 1))
        self.tree: TokenTree | None = None  # the last proposal
        self.slot: dict[int, int] = {}  # its fed nodes -> cache position

    # --- the protocol ---------------------------------------------------------------

    @torch.inference_mode()
    def propose(self, max_nodes: int, max_depth: int, allow_costly=None) -> TokenTree:
        self._drop_speculative()
        d = self.d
        depth_cap = min(max_depth, d.branch_length, d.context_length - len(self.seq))
        shape = tree_shape(d.widths, min(max_nodes, d.decoding_length), depth_cap)
        if not shape or (allow_costly is not None and not allow_costly(TokenTree())):
            return TokenTree()
        root = self._feed_pending()  # [V]
        children: dict[int, list[int]] = {}
        for i, p in enumerate(shape):
            children.setdefault(p, []).append(i)
        # slot -> (token, q or None, score); a slot stays empty when q has no mass left
        filled: dict[int, tuple[int, torch.Tensor | None, float]] = {}
        g = self.generator
        frontier, logits = [-1], root[None]  # logits: [len(frontier), V]
        while frontier:
            paths = [self._path(filled, shape, s) for s in frontier]
            picks = self._choose(logits, paths, [len(children.get(s, [])) for s in frontier], g)
            for s, row_picks in zip(frontier, picks):
                parent_score = 1.0 if s < 0 else filled[s][2]
                for slot, (token, q, prob) in zip(children.get(s, []), row_picks):
                    filled[slot] = (token, q, parent_score * prob)
            # the next level: filled slots with child slots of their own, likely enough to pay
            # for expanding (this looks at the parents' values only, never at a child's own)
            frontier = [c for s in frontier for c in children.get(s, [])
                        if c in filled and c in children and filled[c][2] >= d.min_score]
            if frontier:
                logits = self._feed_level(frontier, filled, shape)
        tree = self._as_tree(shape, filled)
        self.tree = tree
        return tree

    @torch.inference_mode()
    def learn(self, new_ids: Sequence[int]) -> None:
        new_ids = [int(t) for t in new_ids]
        self.seq += new_ids
        if self.tree is None:
            self.pending += new_ids
            return
        # keep the fed entries of the accepted path (the same tokens at the same positions);
        # the last new token is always fed again: its logits are the next root's
        kept, node = [], -1
        for t in new_ids[:-1]:
            child = next((c for c in self.tree.children[node] if self.tree.tokens[c] == t and c in self.slot), None)
            if child is None:
                break
            kept.append(self.slot[child])
            node = child
        keep_path(self.cache, self.past, kept)
        self.past += len(kept)
        self.pending = new_ids[len(kept):]
        self.tree, self.slot = None, {}
        if self.pending:
            self.root_logits = None

    def end(self) -> None:
        self.cache = self.tree = self.root_logits = None
        self.slot = {}

    # --- internals ----------------------------------------------------------------

    def _drop_speculative(self) -> None:
        if self.tree is not None:  # proposed, never learned from: forget the tree's entries
            keep_path(self.cache, self.past, [])
            self.tree, self.slot = None, {}

    def _feed_pending(self) -> torch.Tensor:
        """Feed the committed tokens not yet cached; return the logits after the last one."""
        if self.pending:
            d = self.d
            packed = pack([Row(self.pending, TokenTree(), self.past)], self.past, d.model.dtype, d.config, d.model.device)
            kwargs = {"logits_to_keep": 1} if d._logits_to_keep else {}
            out = forward(d.model, packed, self.cache, **kwargs)
            self.root_logits = out.logits[0, -1].float()
            self.past += len(self.pending)
            self.pending = []
        return self.root_logits

    def _feed_level(self, nodes: list[int], filled, shape) -> torch.Tensor:
        """Feed one level's nodes at once; each sees the committed cache, its ancestors'
        entries (fed at earlier levels) and itself. Returns their logits [m, V]."""
        d = self.d
        m, start = len(nodes), self.past + len(self.slot)  # start: where this level goes in the cache
        depths = [len(self._path(filled, shape, s)) for s in nodes]
        positions = torch.tensor([self.past - 1 + depth for depth in depths])  # [m]
        kv_positions = torch.zeros(start + m, dtype=torch.long)  # [S + m]
        kv_positions[: self.past] = torch.arange(self.past)
        allowed = torch.zeros(m, start + m, dtype=torch.bool)  # [m, S + m]
        allowed[:, : self.past] = True
        for slot, cache_pos in self.slot.items():
            kv_positions[cache_pos] = self.past - 1 + len(self._path(filled, shape, slot))
        for r, s in enumerate(nodes):
            for ancestor in self._ancestors(shape, s):
                allowed[r, self.slot[ancestor]] = True
            allowed[r, start + r] = True
            kv_positions[start + r] = positions[r]
        mask = attention_mask(allowed[None], positions[None], kv_positions[None], d.config, d.model.dtype,
                              d.model.device)  # [1, 1, m, S + m]
        ids = torch.tensor([[filled[s][0] for s in nodes]], device=d.model.device)
        packed = Packed(ids, positions[None].to(d.model.device), mask, [0])
        out = forward(d.model, packed, self.cache)
        for r, s in enumerate(nodes):
            self.slot[s] = start + r
        return out.logits[0].float()  # [m, V]

    def _choose(self, logits: torch.Tensor, paths: list[list[int]], ks: list[int], g) -> list[list[tuple]]:
        """Up to ks[r] children of each node r of a level (logits [m, V], paths all of one
        length): [(token, q it was drawn from or None, draft probability), ...] per node."""
        V = self.d.target_vocab_size
        if logits.shape[1] >= V:  # the draft's padding rows beyond the target's vocabulary never count
            logits = logits[:, :V]
        else:
            logits = torch.cat([logits, logits.new_full((len(logits), V - logits.shape[1]), -float("inf"))], 1)
        if self.sampling is None:
            probs = torch.softmax(logits, -1)  # [m, V]
            top = torch.topk(logits, min(max(ks), V), dim=-1)
            return [[(int(t), None, float(probs[r, t])) for t, v in zip(top.indices[r, :k], top.values[r, :k])
                     if v > -float("inf")] for r, k in enumerate(ks)]
        ids = torch.tensor([self.seq + path for path in paths])  # [m, context + depth]
        qs = torch.softmax(self.sampling.processors(ids, logits.clone()), -1)  # [m, V]
        out = []
        for q, k in zip(qs, ks):
            chosen = []
            for _ in range(k):
                total = float(q.sum())
                if not total > 0:
                    break
                q = q / total
                x = int(torch.multinomial(q, 1, generator=g))
                chosen.append((x, q, float(q[x])))
                q = q.clone()
                q[x] = 0.0  # the next sibling is drawn without replacement
            out.append(chosen)
        return out

    @staticmethod
    def _ancestors(shape: list[int], slot: int) -> list[int]:
        out = []
        while (slot := shape[slot]) >= 0:
            out.append(slot)
        return out

    def _path(self, filled, shape, slot: int) -> list[int]:
        """Tokens from the root's child down to `slot` ([] for the root)."""
        if slot < 0:
            return []
        return [filled[s][0] for s in reversed(self._ancestors(shape, slot))] + [filled[slot][0]]

    def _as_tree(self, shape: list[int], filled) -> TokenTree:
        keep = [s for s in range(len(shape)) if s in filled]  # breadth-first: a topological order
        index = {-1: -1, **{s: i for i, s in enumerate(keep)}}
        tokens = tuple(filled[s][0] for s in keep)
        parents = tuple(index[shape[s]] for s in keep)
        scores = tuple(filled[s][2] for s in keep)
        q = None
        if self.sampling is not None and keep:
            q = torch.stack([filled[s][1] for s in keep])  # [n, V]
        # the fed entries were keyed by slot: re-key them by node
        self.slot = {index[s]: pos for s, pos in self.slot.items()}
        return TokenTree(tokens, parents, scores, q, kinds=(MODEL,) * len(tokens))
