"""What the harness compares: plain decoding, transformers' own speculation, triespec.

A method is named by a spec string:

    plain              model.generate, greedy, on torch's kernels: the unmodified model
    plain-packed       model.generate, greedy, on packed kernels (triespec.kernels): what the
                       kernels alone give, without speculation
    prompt-lookup[:N]  model.generate(prompt_lookup_num_tokens=N), transformers' n-gram lookup
                       (N: 10, transformers' documented setting, unless given)
    assisted           model.generate(assistant_model=draft), transformers' assisted decoding
    trie[:opts]        triespec with the Lookahead trie
    model[:opts]       triespec with the draft model's token trees (SpecInfer)
    hybrid[:opts]      triespec with the trie and the draft model merged
    suffix[:opts]      SuffixDecoding's drafts (arctic-inference's cache, vLLM's defaults),
                       verified by triespec's forward: drafter meets drafter on equal terms
    lookup[:opts]      transformers' prompt lookup candidates, verified by triespec's forward
                       (`lookup:fixed` verifies each whole, as transformers does; dl=N tokens,
                       ml=N the n-gram matched)

prompt-lookup and assisted run on torch's kernels like plain; triespec's methods (and
suffix) on the kernels the run asks for (`--kernels`, default auto: the faster here).

opts, separated by ':': `warm` (the drafter's memory first learns the model's own answers
to a disjoint split of the workload, the Lookahead paper's protocol), `fixed` (verify
every tree whole instead of the engine's default adaptive cut, as SuffixDecoding in
vLLM does; `adaptive` says the default explicitly), `hierarchical|parallel|single`,
`dl=N` (decoding length, the most nodes a tree may have), `bl=N` (branch length), `ml=N` (match length); for
suffix: `tree` (draft trees, not chains), `factor=X` (max_spec_factor), `prob=X`
(min_token_prob), `depth=N` (max_tree_depth).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..drafters import DRAFTERS, build as build_drafter

PLAIN = "plain"
PLAIN_PACKED = "plain-packed"
TRANSFORMERS = {
    "plain": {},
    PLAIN_PACKED: {},
    "prompt-lookup": {"prompt_lookup_num_tokens": 10},
    "assisted": {},  # assistant_model added when built
}
DEFAULT = ("plain", "plain-packed", "prompt-lookup", "trie", "trie:warm", "trie:fixed", "trie:fixed:warm")
WITH_DRAFT_MODEL = ("assisted", "model", "hybrid", "hybrid:warm")
MODES = ("hierarchical", "parallel", "single")


@dataclass
class Output:
    token_ids: list[int]
    seconds: float  # wall clock of the whole call
    tokens_per_step: list[int]  # tokens each target forward yielded (accepted + bonus)
    draft_seconds: float = 0.0  # time spent drafting, where the method reports it
    fed: list[int] = field(default_factory=list)  # tokens each target forward was fed (the prefill first)
    cached: list[int] = field(default_factory=list)  # tokens cached before each target forward
    forward_seconds: list[float] = field(default_factory=list)  # each target forward's wall clock
    curve: list[tuple[int, float]] | None = None  # an adaptive engine's cost curve after the call: (tokens, seconds)


@dataclass(frozen=True)
class Spec:
    name: str
    base: str
    warm: bool = False
    adaptive: bool = True
    drafter: dict = field(default_factory=dict)  # the drafter's settings (drafters.build)
    generate: dict = field(default_factory=dict)  # model.generate's settings, over TRANSFORMERS[base]

    @property
    def needs_draft_model(self) -> bool:
        return self.base in ("assisted", "model", "hybrid")


NUMBERS = {"dl": ("decoding_length", int), "bl": ("branch_length", int), "ml": ("match_length", int),
           "depth": ("max_tree_depth", int),
           "factor": ("max_spec_factor", float), "prob": ("min_token_prob", float)}  # opt=value -> setting


def parse(name: str) -> Spec:
    base, *opts = name.strip().split(":")
    if base == "prompt-lookup" and len(opts) == 1 and opts[0].isdigit() and int(opts[0]) > 0:
        return Spec(name, base, generate={"prompt_lookup_num_tokens": int(opts[0])})
    if base in TRANSFORMERS:
        if opts:
            usage = " but a number of tokens (prompt-lookup:N)" if base == "prompt-lookup" else ""
            raise ValueError(f"method {name!r}: {base} takes no options{usage}")
        return Spec(name, base)
    if base not in DRAFTERS or base == "none":  # every drafter the product builds is a method
        drafters = [d for d in DRAFTERS if d != "none"]
        raise ValueError(f"unknown method {name!r}; use {', '.join([*TRANSFORMERS, *drafters])} (see triespec bench --help)")
    warm, adaptive = False, None
    drafter: dict = {}
    for opt in opts:
        key, _, value = opt.partition("=")
        if opt == "warm":
            warm = True
        elif opt in ("adaptive", "fixed"):
            if adaptive is not None:
                raise ValueError(f"method {name!r}: give one of 'adaptive' and 'fixed'")
            adaptive = opt == "adaptive"
        elif opt in MODES:
            drafter["mode"] = opt
        elif opt == "tree":
            drafter["use_tree_spec"] = True
        elif key in NUMBERS and _number(value, NUMBERS[key][1]):
            setting, kind = NUMBERS[key]
            drafter[setting] = kind(value)
        else:
            raise ValueError(f"method {name!r}: unknown option {opt!r} (warm, fixed, adaptive, {'|'.join(MODES)}, "
                             f"tree, {', '.join(f'{k}=N' for k in NUMBERS)})")
    return Spec(name, base, warm, adaptive is not False, drafter)


def _number(text: str, kind) -> bool:
    """Whether `text` is a positive number of `kind` (int or float)."""
    try:
        return kind(text) > 0
    except ValueError:
        return False


class Generate:
    """`model.generate`, plain or with transformers' own speculation; `kernels`: what the
    model must run on for it ("packed" for plain-packed, else "torch": the harness puts
    the model on them before each call).

    Steps are counted by a hook on the target's forward: each call after the prefill
    feeds [last token, candidates...] on top of a cache that holds everything before
    the last token, so the cache lengths seen by consecutive calls give the tokens each
    forward yielded.
    """

    def __init__(self, spec: Spec, model, draft_model=None):
        self.spec, self.model = spec, model
        self.kernels = kernels_of(spec, "torch")
        self.kwargs = {**TRANSFORMERS[spec.base], **spec.generate}
        if spec.base == "assisted":
            if draft_model is None:
                raise ValueError("method 'assisted' needs a draft model (--draft-model)")
            self.kwargs["assistant_model"] = draft_model

    def prepare(self, corpus: list[list[int]]) -> None:
        pass  # nothing to warm

    def carry(self, before: Generate) -> None:
        pass  # nothing learned

    @torch.inference_mode()
    def run(self, ids: list[int], max_new_tokens: int) -> Output:
        x = torch.tensor([ids], device=self.model.device)
        with _forwards(self.model) as calls:
            t0 = time.perf_counter()
            out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                      do_sample=False, **self.kwargs)
            seconds = time.perf_counter() - t0
        new = out[0, len(ids):].tolist()
        # known length after each forward: cache + the one pending token; the last: the output
        bounds = [len(ids)] + [c.cached + 1 for c in calls[1:]] + [len(ids) + len(new)]
        steps = [b - a for a, b in zip(bounds, bounds[1:])]
        return Output(new, seconds, [s for s in steps if s > 0], fed=[c.fed for c in calls],
                      cached=[c.cached for c in calls], forward_seconds=[c.seconds for c in calls])


class Triespec:
    """triespec's Engine with one drafter configuration; a fresh drafter memory per workload.
    `kernels`: what the engine chose ("auto") or was told to run on."""

    def __init__(self, spec: Spec, model, tokenizer, draft_model=None, kernels: str = "auto"):
        from ..engine import Engine

        self.spec = spec
        # budget_cache=False: a run starts from nothing kept by earlier runs, so it can be reproduced
        self.engine = Engine(model, tokenizer, drafter=_drafter(spec, draft_model), adaptive=spec.adaptive,
                             budget_cache=False, kernels=kernels)
        self.kernels = self.engine.kernels

    def carry(self, before: Triespec) -> None:
        """Go on from what `before` (this method, on the workload before) learned of what
        pays: the adaptive budget's calibration belongs to the engine and learns from
        everything it serves, as in a server (and it is saved with the trie memory across
        restarts). Only the drafter's memory starts afresh on each workload, so that no
        workload copies another's answers. A calibration started cold on every workload
        verified nothing on the short answers of qa in fp32, before the evidence came."""
        if self.engine.budget is not None and before.engine.budget is not None:
            self.engine.budget.calibration = before.engine.budget.calibration

    def prepare(self, corpus: list[list[int]]) -> None:
        """Warm the memory with past answers (token ids), when the spec says so."""
        if not self.spec.warm:
            return
        try:
            for answer in corpus:
                self.engine.drafter.learn_text(answer)
        except ValueError as e:  # a drafter without memory says so
            raise ValueError(f"method {self.spec.name!r}: {e}") from e

    def run(self, ids: list[int], max_new_tokens: int) -> Output:
        with _forwards(self.engine.model) as calls:
            t0 = time.perf_counter()
            result = self.engine.generate(ids, max_new_tokens=max_new_tokens)
            seconds = time.perf_counter() - t0
        budget = self.engine.budget  # None without the adaptive budget
        curve = None if budget is None else list(zip(budget.cost.sizes, budget.cost.seconds))
        return Output(result.token_ids, seconds, list(result.stats.tokens_per_step), result.stats.draft_time,
                      fed=[c.fed for c in calls], cached=[c.cached for c in calls],
                      forward_seconds=[c.seconds for c in calls], curve=curve)


@dataclass
class _Call:
    cached: int  # tokens cached before the forward
    fed: int  # tokens fed to it
    started: float  # perf_counter() when it began
    seconds: float = 0.0  # its wall clock (start to the hook after it)


@contextmanager
def _forwards(model):
    """Record every forward of `model` while in the block. Hooks on the target alone, so a
    draft model's forwards are not counted."""
    calls: list[_Call] = []

    def before(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # renamed in transformers 5.24
        ids = kwargs.get("input_ids", args[0] if args else None)
        fed = ids.shape[1] if ids is not None else kwargs["inputs_embeds"].shape[1]
        calls.append(_Call(cache.get_seq_length() if cache is not None else 0, fed, time.perf_counter()))

    def after(module, args, kwargs, output):
        calls[-1].seconds = time.perf_counter() - calls[-1].started

    hooks = [model.register_forward_pre_hook(before, with_kwargs=True),
             model.register_forward_hook(after, with_kwargs=True)]
    try:
        yield calls
    finally:
        for hook in hooks:
            hook.remove()


def kernels_of(spec: Spec, triespec_kernels: str) -> str:
    """What `spec`'s runner runs the model on, triespec's methods running on `triespec_kernels`."""
    if spec.base in TRANSFORMERS:
        return "packed" if spec.base == PLAIN_PACKED else "torch"
    return triespec_kernels


def build(spec: Spec, model, tokenizer, draft_model=None, kernels: str = "auto"):
    """The runner of `spec`; `kernels`: what triespec's methods run on (kernels.CHOICES)."""
    if spec.needs_draft_model and draft_model is None:
        raise ValueError(f"method {spec.name!r} needs a draft model (--draft-model)")
    if spec.base in TRANSFORMERS:
        return Generate(spec, model, draft_model)
    return Triespec(spec, model, tokenizer, draft_model, kernels)


class _Checked(Exception):
    """Raised in place of loading a draft model: the settings before it were good."""


def check(spec: Spec) -> None:
    """A ValueError if the drafter of `spec` refuses its settings, found without loading any
    model (drafters.build checks settings before it loads a draft model)."""
    if spec.base in TRANSFORMERS:
        return
    def load(path):
        raise _Checked
    try:
        _drafter(spec, "draft model", load)
    except _Checked:
        pass


def _drafter(spec: Spec, draft_model, load=None):
    """The product's own drafter for the spec (drafters.build, as Engine.from_pretrained)."""
    try:
        return build_drafter(spec.base, [draft_model] if spec.needs_draft_model else [], load, **spec.drafter)
    except ValueError as e:
        raise ValueError(f"method {spec.name!r}: {e}") from e
