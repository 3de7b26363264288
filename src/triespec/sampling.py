"""Decoding settings, and the model's scores at each tree node under them.

Settings mirror `model.generate`: unset ones come from the model's generation config,
and processors run in transformers' order (penalties, the caller's processors, then
temperature, top-k, top-p, min-p), so "the distribution of plain sampling" means the
distribution `model.generate(do_sample=True, ...)` samples from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .tree import TokenTree


@dataclass
class Sampling:
    do_sample: bool
    processors: LogitsProcessorList
    seed: int = 0

    def at(self, position: int) -> torch.Generator:
        """The random stream of the token at `position` (in prompt + output): keyed by
        position, so that what is sampled there does not depend on what was drafted."""
        return torch.Generator().manual_seed(hash((self.seed, position)) & (2**63 - 1))


def sampling_settings(generation_config, do_sample=None, temperature=None, top_k=None, top_p=None, min_p=None,
                      repetition_penalty=None, logits_processor=None, seed=None, generator=None) -> Sampling:
    def pick(value, name):
        return value if value is not None else getattr(generation_config, name, None)

    do_sample = bool(pick(do_sample, "do_sample"))
    temperature, top_k, top_p = pick(temperature, "temperature"), pick(top_k, "top_k"), pick(top_p, "top_p")
    min_p, penalty = pick(min_p, "min_p"), pick(repetition_penalty, "repetition_penalty")
    if do_sample and temperature is not None and not temperature > 0:
        raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be an integer >= 0, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if min_p is not None and not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if penalty is not None and not penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {penalty}")
    if seed is not None and generator is not None:
        raise ValueError("pass seed or generator, not both")

    processors = LogitsProcessorList()
    if penalty is not None and penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty))
    processors.extend(logits_processor or [])
    if do_sample:
        if temperature is not None and temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k:
            processors.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
        if min_p:
            processors.append(MinPLogitsWarper(min_p))
    if seed is None:  # from the caller's generator, else from torch's global one (torch.manual_seed)
        seed = int(torch.randint(0, 2**62, (), generator=generator))
    return Sampling(do_sample, processors, int(seed))


class TreeScores:
    """The model's next-token scores at each row of a verified tree, processed lazily.

    Row 0 is the root (last committed token), row 1 + i is node i. A row is processed
    only when the verifier visits it, with that row's own path as the generated text,
    so a repetition penalty sees exactly what plain decoding would have seen there.
    """

    def __init__(self, logits: torch.Tensor, tree: TokenTree, context: list[int] | None = None,
                 processors: LogitsProcessorList | None = None):
        self.logits = logits  # [1 + n, V], float32
        self.tree = tree
        self.context = context or []
        self.processors = processors or LogitsProcessorList()
        self._scores: dict[int, torch.Tensor] = {}

    def scores(self, row: int) -> torch.Tensor:
        """[V] processed scores of `row`."""
        if row not in self._scores:
            scores = self.logits[row]
            if self.processors:
                path = [self.tree.tokens[i] for i in self.tree.path(row - 1)]
                ids = torch.tensor([self.context + path])
                scores = self.processors(ids, scores[None].clone())[0]
            self._scores[row] = scores
        return self._scores[row]

    def probs(self, row: int) -> torch.Tensor:
        return torch.softmax(self.scores(row), dim=-1)

    def argmax(self, row: int) -> int:
        return int(self.scores(row).argmax())
