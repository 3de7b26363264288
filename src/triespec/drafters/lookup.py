"""Prompt lookup's drafts (transformers' `PromptLookupCandidateGenerator`), under our contract.

Prompt lookup decoding (Saxena, 2023; in transformers as `prompt_lookup_num_tokens`)
drafts one chain: the tokens that followed the first earlier occurrence of the last
`match_length` tokens (then fewer) in the prompt and the output so far. It keeps no
memory across requests. Wrapping transformers' own candidate generator as a drafter
lets the benchmark's replays verify its drafts with the same engine step as the trie's
(`lookup:fixed` verifies each chain whole, as transformers does), and lets anyone serve
with it (`--drafter lookup`). The benchmark's `prompt-lookup` method is transformers'
`generate` itself.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..tree import TRIE, TokenTree
from .base import Drafter, DraftSession


class PromptLookupDrafter(Drafter):
    """decoding_length: tokens per draft (transformers' `prompt_lookup_num_tokens`, 10 by
    its documentation); match_length: longest n-gram matched (its
    `max_matching_ngram_size`, 2 by default)."""

    def __init__(self, decoding_length: int = 10, match_length: int = 2):
        for name, value in (("decoding_length", decoding_length), ("match_length", match_length)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.decoding_length, self.match_length = decoding_length, match_length

    def begin(self, prompt_ids: Sequence[int], sampling=None) -> PromptLookupSession:
        return PromptLookupSession(self, list(prompt_ids))


class PromptLookupSession(DraftSession):
    def __init__(self, drafter: PromptLookupDrafter, prompt_ids: list[int]):
        from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

        self.ids = prompt_ids  # the prompt and every token since
        self.generator = PromptLookupCandidateGenerator(
            num_output_tokens=drafter.decoding_length, max_matching_ngram_size=drafter.match_length,
            max_length=2**62)  # the engine bounds the output, not the drafter

    def propose(self, max_nodes: int, max_depth: int, allow_costly=None) -> TokenTree:
        most = min(max_nodes, max_depth)
        if most < 1 or len(self.ids) < 2:
            return TokenTree()
        candidates, _ = self.generator.get_candidates(torch.tensor([self.ids]))
        draft = candidates[0, len(self.ids):].tolist()[:most]
        # a chain seen once: scored as the trie scores a path seen once
        return TokenTree(tuple(draft), tuple(range(-1, len(draft) - 1)), (1.0,) * len(draft),
                         kinds=(TRIE,) * len(draft))

    def learn(self, new_ids: Sequence[int]) -> None:
        self.ids.extend(new_ids)

    def end(self) -> None:
        self.ids = []
