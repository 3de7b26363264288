"""Drafters propose token trees; the engine verifies them (the contract: base.py).

`build(name, draft_models, **settings)` is the one place a drafter is made from a spec:
`Engine.from_pretrained`, the command line, the server and the benchmark all call it.
A new drafter is one file with a class keeping the contract, and one line in `DRAFTERS`:
its name and a function (draft models, settings) -> drafter that refuses, with a
ValueError, what it cannot take.
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

from .base import Drafter, DraftSession, NoDraft, check_drafter
from .merged import MergedDrafter, merge
from .model import ModelDrafter
from .lookup import PromptLookupDrafter
from .suffix import SuffixDrafter
from .trie import Trie, TrieDrafter


def _settings(name: str, cls, settings: dict) -> dict:
    """The settings `cls` takes, or a ValueError naming the ones it does not."""
    known = set(inspect.signature(cls.__init__).parameters) - {"self", "draft_model", "drafters", "tokenizer"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"drafter {name!r} takes no setting {', '.join(map(repr, unknown))}; "
                         f"it takes {', '.join(sorted(known))}")
    return settings


def _none(draft_models: Sequence, **settings) -> Drafter:
    if draft_models or settings:
        raise ValueError("drafter 'none' (plain decoding) takes no draft model and no settings")
    return NoDraft()


def _trie(draft_models: Sequence, **settings) -> Drafter:
    if draft_models:
        raise ValueError("a draft model needs drafter 'model' or 'hybrid'")
    return TrieDrafter(**_settings("trie", TrieDrafter, settings))


def _models(name: str, draft_models: Sequence, settings: dict) -> list[ModelDrafter]:
    """Draft models are loaded (each entry called) only once the settings are known good."""
    if not draft_models:
        raise ValueError(f"drafter {name!r} needs a draft model")
    settings = _settings(name, ModelDrafter, settings)
    return [ModelDrafter(model, tokenizer=tokenizer, **settings) for model, tokenizer in (m() for m in draft_models)]


def _model(draft_models: Sequence, **settings) -> Drafter:
    models = _models("model", draft_models, settings)
    return models[0] if len(models) == 1 else MergedDrafter(models)


def _hybrid(draft_models: Sequence, widths=None, **trie_settings) -> Drafter:
    """The trie's confident copy spans first, the draft models' nodes fill the rest, all
    within the trie's decoding_length."""
    trie = _trie((), **trie_settings)
    models = _models("hybrid", draft_models, {} if widths is None else {"widths": widths})
    return MergedDrafter([trie, *models], decoding_length=trie.decoding_length)


def _suffix(draft_models: Sequence, **settings) -> Drafter:
    """SuffixDecoding's cache (arctic-inference), a peer verified by the same forward."""
    if draft_models:
        raise ValueError("drafter 'suffix' takes no draft model")
    return SuffixDrafter(**_settings("suffix", SuffixDrafter, settings))


def _lookup(draft_models: Sequence, **settings) -> Drafter:
    """Prompt lookup's drafts (transformers' candidate generator), a peer verified by the same forward."""
    if draft_models:
        raise ValueError("drafter 'lookup' takes no draft model")
    return PromptLookupDrafter(**_settings("lookup", PromptLookupDrafter, settings))


# name -> (draft models, **settings) -> Drafter. Each draft model comes as a function returning
# (model, tokenizer or None), to be called only after the settings were checked: a caller
# loading models from paths learns of a mistake before anything is loaded.
DRAFTERS: dict[str, Callable[..., Drafter]] = {
    "none": _none,
    "trie": _trie,
    "model": _model,
    "hybrid": _hybrid,
    "suffix": _suffix,
    "lookup": _lookup,
}


def build(name: str, draft_models: Sequence = (), load: Callable | None = None, **settings) -> Drafter:
    """The drafter `name` (a key of DRAFTERS) with its settings, over `draft_models`:
    loaded models, (model, tokenizer) pairs (so the vocabulary can be checked), or, with
    `load` (path -> (model, tokenizer)), paths, loaded once the settings are known good."""
    if name not in DRAFTERS:
        raise ValueError(f"unknown drafter {name!r}; one of {', '.join(DRAFTERS)}")
    if load is not None:
        sources = [lambda path=path: load(path) for path in draft_models]
    else:
        sources = [lambda m=m: m if isinstance(m, tuple) else (m, None) for m in draft_models]
    return DRAFTERS[name](sources, **{k: v for k, v in settings.items() if v is not None})


__all__ = ["Drafter", "DraftSession", "NoDraft", "Trie", "TrieDrafter", "ModelDrafter", "MergedDrafter", "SuffixDrafter", "PromptLookupDrafter", "merge",
           "DRAFTERS", "build", "check_drafter"]
