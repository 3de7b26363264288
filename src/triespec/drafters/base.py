"""The drafter contract: what the engine asks of every source of drafts.

A drafter is shared by all requests (it may keep what it learns across them, its
*memory*); for each request it opens a session:

    drafter.bind(model, tokenizer, cost)            # once, by the engine
    session = drafter.begin(prompt_ids, sampling)   # one request
    tree = session.propose(max_nodes, max_depth)    # what might come next: a scored TokenTree
    session.learn(new_ids)                          # what did come next (accepted + bonus)
    session.end()

Drafts never change the output, only how many tokens one forward pass yields: a
drafter may propose anything. Two capabilities are declared, not probed:
- `costly`: the drafter runs forwards of its own (a draft model), so drafting has a
  price the engine weighs. Its sessions take `allow_costly` in `propose`, a function the
  session calls at most once with the tree of its free part (the trie's, or an empty
  tree): the costly part runs only if it answers True.
- `memory`: the trie of past answers that persists across requests and restarts (None
  for drafters without one); `learn_text` warms it.

Subclass `Drafter` and `DraftSession` (they are Protocols with defaults): the engine
refuses an object that is neither, with the reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol, Sequence, runtime_checkable

from ..tree import TokenTree

if TYPE_CHECKING:
    from ..budget import CostModel
    from ..drafters.trie import Trie
    from ..sampling import Sampling

Allow = Callable[[TokenTree], bool]  # given the free drafters' tree: may the costly ones run?


@runtime_checkable
class DraftSession(Protocol):
    """One request's drafting."""

    def propose(self, max_nodes: int, max_depth: int, allow_costly: Allow | None = None) -> TokenTree:
        """A tree of at most `max_nodes` nodes, none deeper than `max_depth`. Scores
        (the drafter's estimate that each node is accepted) let the adaptive budget cut
        it; nodes are listed likeliest first. `allow_costly`: see the module docstring
        (None: the drafter decides alone)."""
        ...

    def learn(self, new_ids: Sequence[int]) -> None:
        """The tokens that came after the last proposal (accepted drafts + the bonus)."""
        ...

    def end(self) -> None:
        """The request is over: release what it held (not the drafter's memory)."""


@runtime_checkable
class Drafter(Protocol):
    costly: bool = False  # runs forwards of its own
    decoding_length: int = 32  # most nodes of a tree it proposes
    memory: Trie | None = None  # the memory trie that persists across requests (None: none kept)

    def begin(self, prompt_ids: Sequence[int], sampling: Sampling | None = None) -> DraftSession:
        """A session for one request; `sampling`: the request's settings (a draft model
        may draw under them), None for greedy callers that have none."""
        ...

    def bind(self, model, tokenizer=None, cost: CostModel | None = None) -> None:
        """Called once by the engine before any session: check that the drafter fits the
        target (ValueError if not: another vocabulary) and, under an adaptive budget
        (`cost`: the target's forward cost curve), price its own work."""

    def learn_text(self, token_ids: Sequence[int], context: Sequence[int] = ()) -> None:
        """Warm the memory with a past answer (or any text worth drafting from); `context`:
        the prompt it answered, whose last tokens lead into it as they will next time."""
        raise ValueError(f"{type(self).__name__} keeps no memory to learn from")


class NoDraft(Drafter, DraftSession):
    """Plain decoding through the same engine: every tree is empty."""

    decoding_length = 0

    def begin(self, prompt_ids, sampling=None):
        return self

    def propose(self, max_nodes, max_depth, allow_costly=None):
        return TokenTree()

    def learn(self, new_ids):
        pass

    def end(self):
        pass


def check_drafter(drafter) -> None:
    """ValueError unless `drafter` keeps the contract (what the engine relies on)."""
    if not isinstance(drafter, Drafter):
        raise ValueError(f"{type(drafter).__name__} is not a drafter: subclass triespec.drafters.Drafter "
                         "(begin, bind, memory, learn_text, costly, decoding_length)")
