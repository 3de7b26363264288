"""SuffixDecoding's drafts (Oliaro et al., 2024), from its own package, under our contract.

SuffixDecoding is the strongest model-free peer: suffix trees over each request's
prompt and over every past answer (the *global* tree), a draft grown from the longest
match of the sequence's last tokens, as long as `max_spec_factor * match length +
max_spec_offset` tokens and pruned below `min_token_prob`. Its authors ship it as
`arctic_inference.suffix_decoding.SuffixDecodingCache` (the `arctic-inference` package
on PyPI, `pip install triespec[peers]`); vLLM runs that same cache. Wrapping it as a
drafter lets the benchmark verify its drafts with the same forward as the trie's, so
drafter meets drafter on equal terms, and lets anyone serve with it (`--drafter suffix`).

The defaults are vLLM's (`suffix_decoding_max_tree_depth=24`, factor 1, offset 0,
`min_token_prob=0.1`, at most 10,000 answers cached, chains not trees).
"""

from __future__ import annotations

import itertools
from typing import Sequence

from ..tree import TRIE, TokenTree
from .base import Drafter, DraftSession


class SuffixDrafter(Drafter):
    """SuffixDecoding's global cache of answers, shared by every request.

    max_tree_depth: the deepest suffix kept, and the longest match looked for.
    max_spec_factor, max_spec_offset: a draft has at most factor * match length + offset tokens.
    min_token_prob: drop continuations the cache estimates below this probability.
    use_tree_spec: draft a tree (several continuations) instead of one chain.
    max_cached_requests: answers kept in the global tree, oldest dropped first (-1: all).
    decoding_length: most nodes a draft may have.
    """

    def __init__(self, max_tree_depth: int = 24, max_spec_factor: float = 1.0, max_spec_offset: float = 0.0,
                 min_token_prob: float = 0.1, use_tree_spec: bool = False, max_cached_requests: int = 10_000,
                 decoding_length: int = 24):
        try:
            from arctic_inference.suffix_decoding import SuffixDecodingCache
        except ImportError as e:
            raise ValueError("drafter 'suffix' needs SuffixDecoding's package: pip install arctic-inference "
                             "(or triespec[peers])") from e
        if max_tree_depth < 1 or decoding_length < 1:
            raise ValueError(f"max_tree_depth and decoding_length must be >= 1, got {max_tree_depth}, {decoding_length}")
        if max_spec_factor < 0 or max_spec_offset < 0 or not 0 <= min_token_prob <= 1:
            raise ValueError("max_spec_factor and max_spec_offset must be >= 0, min_token_prob in [0, 1]")
        if max_cached_requests == 0 or max_cached_requests < -1:
            raise ValueError(f"max_cached_requests must be >= 1 or -1 (all), got {max_cached_requests}")
        self.cache = SuffixDecodingCache(max_tree_depth=max_tree_depth, max_cached_requests=max_cached_requests)
        self.max_tree_depth = max_tree_depth
        self.spec = dict(max_spec_factor=max_spec_factor, max_spec_offset=max_spec_offset,
                         min_token_prob=min_token_prob, use_tree_spec=use_tree_spec)
        self.decoding_length = decoding_length
        self._ids = itertools.count()  # the cache names requests; a fresh name for each

    def begin(self, prompt_ids: Sequence[int], sampling=None) -> SuffixSession:
        return SuffixSession(self, next(self._ids), list(prompt_ids))

    def learn_text(self, token_ids: Sequence[int], context: Sequence[int] = ()) -> None:
        """An answer enters the global tree, as a finished request's does."""
        name = next(self._ids)
        self.cache.start_request(name, list(context))
        self.cache.add_active_response(name, list(token_ids))
        self.cache.stop_request(name)


class SuffixSession(DraftSession):
    def __init__(self, drafter: SuffixDrafter, name: int, prompt_ids: list[int]):
        self.drafter, self.name = drafter, name
        self.context = prompt_ids  # the prompt and every token since: the match is at its end
        drafter.cache.start_request(name, prompt_ids)

    def propose(self, max_nodes: int, max_depth: int, allow_costly=None) -> TokenTree:
        d = self.drafter
        most = min(max_nodes, d.decoding_length)
        if most < 1 or max_depth < 1 or not self.context:
            return TokenTree()
        draft = d.cache.speculate(self.name, self.context[-d.max_tree_depth:], max_spec_tokens=most, **d.spec)
        tree = TokenTree(draft.token_ids, draft.parents, tuple(min(max(p, 0.0), 1.0) for p in draft.probs),
                         kinds=(TRIE,) * len(draft.token_ids))
        return tree.prefix(max_nodes=most, max_depth=max_depth)

    def learn(self, new_ids: Sequence[int]) -> None:
        new_ids = list(new_ids)
        self.context.extend(new_ids)
        self.drafter.cache.add_active_response(self.name, new_ids)

    def end(self) -> None:
        self.drafter.cache.stop_request(self.name)
