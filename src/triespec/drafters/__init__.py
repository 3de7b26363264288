"""Drafters propose token trees; the engine verifies them.

A drafter is shared by all requests (it may keep what it learns across them); for each
request it opens a session:

    session = drafter.begin(prompt_ids)
    tree = session.propose(max_nodes, max_depth)   # what might come next
    session.learn(new_ids)                          # what did come next (accepted + bonus)
    session.end()

A drafter with `accepts_sampling = True` is opened with `begin(prompt_ids, sampling=...)`
(the request's `Sampling`), so that it may draft under the request's own settings.

Drafts never change the output, only how many tokens one forward pass yields.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from ..tree import TokenTree


class DraftSession(Protocol):
    def propose(self, max_nodes: int, max_depth: int) -> TokenTree: ...

    def learn(self, new_ids: Sequence[int]) -> None: ...

    def end(self) -> None: ...


class Drafter(Protocol):
    def begin(self, prompt_ids: Sequence[int]) -> DraftSession: ...


class NoDraft:
    """Plain decoding through the same engine: every tree is empty."""

    def begin(self, prompt_ids):
        return self

    def propose(self, max_nodes, max_depth):
        return TokenTree()

    def learn(self, new_ids):
        pass

    def end(self):
        pass


def begin_session(drafter, prompt_ids: Sequence[int], sampling=None) -> DraftSession:
    """Open a session, handing the request's sampling settings to drafters that take them."""
    if getattr(drafter, "accepts_sampling", False):
        return drafter.begin(prompt_ids, sampling=sampling)
    return drafter.begin(prompt_ids)


from .trie import Trie, TrieDrafter  # noqa: E402
from .model import ModelDrafter  # noqa: E402
from .merged import MergedDrafter, merge  # noqa: E402

__all__ = ["Drafter", "DraftSession", "NoDraft", "Trie", "TrieDrafter", "ModelDrafter", "MergedDrafter", "merge",
           "begin_session"]
