"""The decode loop: draft, forward, verify, commit, emit, learn."""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from transformers import DynamicCache, StopStringCriteria

from .budget import Budget, CostModel, Watched, timing
from .budget_store import BudgetStore, KernelStore, directory
from .drafters import Drafter, NoDraft, TrieDrafter, build, check_drafter
from .kernels import check as check_kernels, use as use_kernels
from .kv import KVCache, keep_paths
from .masks import Row, check_tree_attention, context_length, forward, pack
from .tree import TokenTree
from .sampling import Sampling, TreeScores, sampling_settings
from .verify import Verdict, verify_greedy, verify_sampling

DRAFT_TOKENS = 4  # a draft model's forwards: the tokens committed since its last step, or one level of its tree
SAMPLING_ARGS = {"do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "logits_processor",
                 "seed", "generator"}


@dataclass
class Stats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    tokens_per_step: list[int] = field(default_factory=list)  # tokens each forward yielded (accepted + bonus)
    draft_sizes: list[int] = field(default_factory=list)  # tree nodes verified by each forward
    draft_time: float = 0.0  # seconds spent proposing and learning
    model_time: float = 0.0  # seconds in the model's forward (prefill included)
    total_time: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.tokens_per_step)

    @property
    def mean_tokens_per_step(self) -> float:
        return self.new_tokens / max(self.steps, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_time if self.total_time > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "steps": self.steps,
            "mean_tokens_per_step": round(self.mean_tokens_per_step, 3),
            "tokens_per_step": self.tokens_per_step,
            "draft_sizes": self.draft_sizes,
            "draft_time": round(self.draft_time, 4),
            "model_time": round(self.model_time, 4),
            "total_time": round(self.total_time, 4),
            "tokens_per_second": round(self.tokens_per_second, 2),
        }


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max_new_tokens or the context), "abort"
    stats: Stats


class Engine:
    """Lossless speculative generation for a Hugging Face causal LM.

    Engine(model, tokenizer, decoding_length=32, branch_length=24, mode="hierarchical", ...)
    builds a TrieDrafter from the keyword arguments; pass `drafter=` for another one
    (anything keeping the contract of drafters.Drafter; `drafters.build` makes one by name).
    adaptive (the default) measures this machine's forward cost at start-up and cuts each
    tree to the size with the best expected tokens per second, down to none (budget.py);
    adaptive=False verifies every tree whole, `decoding_length` nodes at most. `cost`: a
    cost curve to use instead of measuring one (tests, or a curve measured elsewhere; one
    given whole is taken as known at every size: budget.CostModel).
    budget_cache: where the adaptive budget is kept between runs (budget_store.py): True,
    the default folder; a folder; False or None, nowhere (measured at every start).
    kernels: what the model's linear layers run on (kernels.py): "torch", torch's own;
    "packed", oneDNN on weights packed once (CPU; torch's, with a warning, where it cannot
    run); "auto" (the default), the faster of the two for this engine's forward sizes,
    timed once per model and machine and kept with the budget. The engine sets them on
    the model it is given (every user of that model then runs on them); `self.kernels`
    says which it got. Draft models inside a given `drafter` are left as they are
    (`from_pretrained` sets theirs).
    """

    def __init__(self, model, tokenizer=None, drafter: Drafter | None = None, adaptive: bool = True,
                 cost: CostModel | None = None, budget_cache: str | os.PathLike | bool | None = True,
                 kernels: str = "auto", **drafter_config):
        directory(budget_cache)  # ValueError for anything but a folder, True, False or None
        check_kernels(kernels)
        if drafter is not None and drafter_config:
            raise ValueError(f"pass either drafter= or drafter settings, not both (got {sorted(drafter_config)})")
        self.model = model
        self.tokenizer = tokenizer
        self.drafter = drafter if drafter is not None else TrieDrafter(**drafter_config)
        check_drafter(self.drafter)
        self.config = model.config.get_text_config()
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.context_length = context_length(self.config)
        self.eos_ids = _eos_ids(model)
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        check_tree_attention(model)  # before any tree forward, timings included
        # the kernels next: the cost curve and the budget's key belong to them
        most = self.drafter.decoding_length + 1
        store = KernelStore.open(budget_cache, model, tokenizer, most) if kernels == "auto" else None
        self.kernels = use_kernels(model, kernels, store, timing(model, most))
        # adaptive: cut each tree to the size that pays on this machine (needs drafter scores)
        self.budget: Budget | None = None
        self.budget_store: BudgetStore | None = None  # where the budget is kept between runs (None: nowhere)
        if adaptive and not isinstance(self.drafter, NoDraft):
            saved = None  # (cost curve, calibration) from an earlier run on this model and machine
            if cost is None:
                self.budget_store = BudgetStore.open(budget_cache, model, tokenizer, most)
                saved = self.budget_store.load() if self.budget_store is not None else None
                cost = CostModel.of(model, self.config, most, saved=saved[0] if saved else None)
            self.budget = Budget(cost, costly=self.drafter.costly, calibration=saved[1] if saved else None)
        # the draft models: same vocabulary as the target (or ValueError), priced by the curve
        self.drafter.bind(model, tokenizer, None if self.budget is None else self.budget.cost)

    @classmethod
    def from_pretrained(cls, name_or_path, dtype="auto", device: str = "cpu", gguf_file: str | None = None,
                        draft_model=None, drafter: str | None = None, widths=None, adaptive: bool = True,
                        budget_cache: str | os.PathLike | bool | None = True, kernels: str = "auto",
                        **trie_config):
        """Load a model (hub id, folder or .gguf) and build its drafter.

        draft_model: None, or a path / hub id (or a list of them) of small models sharing
            the target's tokenizer, loaded with the same dtype and device.
        drafter: "trie" (the default without a draft model), "model" (the draft models'
            token trees, merged when several) or "hybrid" (the default with a draft model:
            the trie and the draft models in one tree, within the trie's decoding_length).
        widths: the draft models' expansion widths per depth (default: SpecInfer's).
        budget_cache: where the adaptive budget is kept between runs (see Engine).
        kernels: "auto", "torch" or "packed", for the model and the draft models (see Engine;
            a draft model's "auto" is timed for its own forwards, of up to 4 tokens).
        trie_config: TrieDrafter settings (decoding_length, branch_length, mode, ...).
        """
        from .loading import load

        check_kernels(kernels)

        def load_draft(path):
            draft, draft_tokenizer = load(path, dtype=dtype, device=device)
            store = KernelStore.open(budget_cache, draft, draft_tokenizer, DRAFT_TOKENS) if kernels == "auto" else None
            use_kernels(draft, kernels, store, timing(draft, DRAFT_TOKENS))
            return draft, draft_tokenizer

        paths = [] if draft_model is None else [draft_model] if isinstance(draft_model, (str, bytes)) or not \
            isinstance(draft_model, Sequence) else list(draft_model)
        # the drafter first: its settings are checked before any model is loaded
        chosen = build(drafter or ("hybrid" if paths else "trie"), paths,
                       load_draft, widths=widths, **trie_config)
        model, tokenizer = load(name_or_path, dtype=dtype, device=device, gguf_file=gguf_file)
        return cls(model, tokenizer, drafter=chosen, adaptive=adaptive, budget_cache=budget_cache, kernels=kernels)

    def encode(self, prompt) -> list[int]:
        """A string, a list of token ids, or chat messages ([{"role": ..., "content": ...}])."""
        if isinstance(prompt, str):
            self.require_tokenizer("a text prompt")
            ids = self.tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
            self.require_tokenizer("chat messages")
            ids = chat_ids(self.tokenizer, prompt)
        elif isinstance(prompt, (Sequence, torch.Tensor)):
            ids = [int(t) for t in (prompt.flatten().tolist() if isinstance(prompt, torch.Tensor) else prompt)]
        else:
            raise ValueError(f"prompt must be text, token ids or chat messages, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        if len(ids) >= self.context_length:
            raise ValueError(f"prompt has {len(ids)} tokens; the model's context is {self.context_length}")
        return ids

    def generate(self, prompt, max_new_tokens: int = 128, stop: str | Sequence[str] | None = None, *,
                 streamer=None, **sampling) -> Generation | list[Generation]:
        """Generate exactly what `model.generate` would, in fewer forward passes.

        `prompt`: text, token ids or chat messages; or a list of those, which are then
        generated together, every row's tree verified in one shared forward per step
        (returns a list, in order; each row's output is what it would be alone).
        Greedy by default (as the model's generation config says); `do_sample=True`
        with `temperature`, `top_k`, `top_p`, `min_p`, `repetition_penalty`,
        `logits_processor` and `seed` or `generator` samples from exactly the
        distribution `model.generate` samples from. Stops on EOS, after
        `max_new_tokens`, at the end of the context, or on a stop string (where
        transformers' `stop_strings` stops; the text is cut before the stop string, the
        token ids are not); `max_new_tokens` may be a list, one per prompt of a batch.
        `streamer`: a transformers streamer (`put`/`end`), given the new tokens after
        every step (single prompts only).
        """
        batch = _is_batch(prompt)
        if batch and streamer is not None:
            raise ValueError("a streamer takes one prompt, not a batch")
        prompts = prompt if batch else [prompt]
        limits = max_new_tokens if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(prompts)
        if len(limits) != len(prompts):
            raise ValueError(f"{len(limits)} max_new_tokens for {len(prompts)} prompts")
        rows = [self.row(p, n, stop, **sampling) for p, n in zip(prompts, limits)]
        for step in Batch(self, rows):
            if streamer is not None:
                streamer.put(torch.tensor(step[0][1]))
        if streamer is not None:
            streamer.end()
        results = [row.result() for row in rows]
        return results if batch else results[0]

    def stream(self, prompt, max_new_tokens: int = 128, stop: str | Sequence[str] | None = None,
               **sampling) -> Stream:
        """Iterate over the text as it is accepted (several tokens per step).

        Never splits a character, and holds back text that may be the start of a stop
        string; the pieces join to exactly `generate(...).text`. Arguments are checked
        here, before the first piece; `.result()` gives the Generation afterwards.
        """
        self.require_tokenizer("streaming text")
        if _is_batch(prompt):
            raise ValueError("stream takes one prompt, not a batch")
        return Stream(self.row(prompt, max_new_tokens, stop, **sampling))

    def row(self, prompt, max_new_tokens: int = 128, stop: str | Sequence[str] | None = None,
            **sampling) -> BatchRow:
        """One prompt's generation, its arguments checked (ValueError), not started: what
        `generate` runs, and what a server hands to a `Batch` of its own."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        unknown = set(sampling) - SAMPLING_ARGS
        if unknown:
            raise ValueError(f"unknown generation arguments {sorted(unknown)}; supported: {sorted(SAMPLING_ARGS)}")
        settings = sampling_settings(self.model.generation_config, **sampling)
        stops = _StopChecker(self.eos_ids, stop, self.tokenizer)
        return BatchRow(self, self.encode(prompt), max_new_tokens, stops, settings)

    def forward(self, rows: list[Row], width: int,
                cache: DynamicCache) -> tuple[list[torch.Tensor], list[int], float]:
        """One forward over every row's pending tokens and tree: the one place the decode
        step runs the model (kernels, masks, positions), so that it can be swapped whole.

        Returns each row's logits [1 + n, V], where its new entries start in the cache
        (the layout `pack` chose), and the seconds the forward took."""
        t0 = time.perf_counter()
        packed = pack(rows, width, self.model.dtype, self.config, self.model.device)
        keep = max(len(r.tree) for r in rows) + 1  # the rows are right-aligned: their logits are last
        kwargs = {"logits_to_keep": keep} if self._logits_to_keep else {}
        out = forward(self.model, packed, cache, **kwargs)
        logits = out.logits[:, -keep:].float()  # [B, keep, V]
        starts = [width + offset for offset in packed.offsets]
        return [logits[b, keep - len(r.tree) - 1 :] for b, r in enumerate(rows)], starts, time.perf_counter() - t0

    def require_tokenizer(self, what: str) -> None:
        if self.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer: pass one to Engine, or give token ids")


class BatchRow:
    """One prompt's generation: its tokens, KV length, drafting session and stats."""

    def __init__(self, engine: Engine, ids: list[int], max_new_tokens: int, stops: _StopChecker, sampling: Sampling):
        self.engine, self.ids, self.stops, self.sampling = engine, ids, stops, sampling
        self.limit = min(max_new_tokens, engine.context_length - len(ids))
        self.out: list[int] = []
        self.seq = list(ids)  # prompt + output
        self.pending = list(ids)  # committed tokens not yet in the KV cache
        self.past = 0  # tokens in the KV cache
        self.finish: str | None = None
        self.stats = Stats(prompt_tokens=len(ids))
        self.session = None
        self.tree = TokenTree()
        self.watch: list[Watched] = []  # proposed trees the calibration still learns from
        self.cancelled = False  # set by Batch.cancel: leave at the next step
        self.drafted, self.step_draft = False, 0.0  # this step: whether the drafter ran, and its time
        self.started = time.perf_counter()  # when the row joined its batch

    def draft(self, allow_costly=None) -> None:
        """Propose this step's tree; `allow_costly` (the budget's gate, drafters.base.Allow)
        says whether drafters that cost forwards (draft models) run."""
        t0 = time.perf_counter()
        engine = self.engine
        if self.session is None:
            self.session = engine.drafter.begin(self.ids, self.sampling)
        ran = []  # whether the costly drafters were let run

        def allow(cheap: TokenTree) -> bool:
            ran.append(allow_costly(cheap))
            return ran[-1]

        # every token past the limit would be thrown away
        self.tree = self.session.propose(engine.context_length, self.limit - len(self.out) - 1,
                                         None if allow_costly is None else allow)
        self.drafted = engine.drafter.costly and (allow_costly is None or any(ran))
        if self.cuttable:
            self.watch.append(Watched(len(self.seq), self.tree))
        self.step_draft = time.perf_counter() - t0
        self.stats.draft_time += self.step_draft

    @property
    def cuttable(self) -> bool:
        """Whether the adaptive budget may cut this step's tree (it needs the drafter's scores)."""
        return self.engine.budget is not None and self.tree.scores is not None and len(self.tree) > 0

    def cut(self, size: int) -> None:
        cut = self.tree.prefix(max_nodes=size)
        if cut.draft_probs is not None:
            # The cut looked at the scores of the drawn tokens, so whatever it kept (the whole
            # tree included: keeping it depended on the draws too) is no longer a plain draw
            # from q. One-hot verification is exact for any tree whose tokens were chosen
            # independently of the verifier's random numbers; q is dropped whatever the size.
            cut = TokenTree(cut.tokens, cut.parents, cut.scores, kinds=cut.kinds)
        self.tree = cut

    def _score_watched(self) -> None:
        """Teach the calibration what became of every proposed tree, verified or cut."""
        finished = self.finish is not None
        self.watch = [w for w in self.watch if not w.update(self.engine.budget.calibration, self.seq, finished)]

    def verify(self, logits: torch.Tensor) -> Verdict:
        """logits: [1 + n, V] for the root and the tree's nodes."""
        scores = TreeScores(logits, self.tree, self.seq, self.sampling.processors)
        if not self.sampling.do_sample:
            return verify_greedy(self.tree, scores)
        base = len(self.seq)  # output position of the step's first token
        return verify_sampling(self.tree, scores, lambda depth: self.sampling.at(base + depth))

    def emit(self, verdict: Verdict) -> list[int]:
        """Append the step's tokens one by one, stopping exactly where plain decoding stops."""
        new = []
        for token in verdict.tokens:
            new.append(token)
            self.seq.append(token)
            if self.stops(self.seq):
                self.finish = "stop"
                break
            if len(self.out) + len(new) >= self.limit:
                self.finish = "length"
                break
        self.out += new
        t0 = time.perf_counter()
        if self.watch:
            self._score_watched()
        self.session.learn(new)
        self.stats.draft_time += time.perf_counter() - t0
        self.stats.tokens_per_step.append(len(new))
        self.stats.draft_sizes.append(len(self.tree))
        self.stats.new_tokens = len(self.out)
        return new

    def end(self) -> None:
        if self.session is not None:
            self.session.end()
            self.session = None
        if self.finish is None:
            self.finish = "abort"

    def result(self) -> Generation:
        return Generation(self.stops.text(self.engine.tokenizer, self.out), self.out, self.finish, self.stats)


class Batch:
    """Rows decoded together: iterating runs one step (one forward) at a time and yields
    each row's new tokens [(row, tokens), ...]; rows leave the batch when they finish.

    A server drives the steps itself: `add` lets a row join between steps (it feeds its
    whole prompt at its first step), `cancel` makes one leave at the next step, and
    `step` runs one forward over whoever is in.
    """

    def __init__(self, engine: Engine, rows: Sequence[BatchRow] = ()):
        self.engine, self.rows = engine, list(rows)
        self.active: list[BatchRow] = []
        self.cache, self.width = KVCache(), 0  # width: cache length shared by the rows
        for row in rows:
            self.add(row)
        self._steps = self._run()  # one run, however it is consumed

    def __iter__(self) -> Iterator[list[tuple[BatchRow, list[int]]]]:
        return self._steps

    def __len__(self) -> int:
        return len(self.active)

    @torch.inference_mode()
    def add(self, row: BatchRow) -> None:
        """Join between steps, with nothing cached: one more cache row, all hole (zeros the
        mask hides, since `pack` lets a row see only its own first `past` entries)."""
        if row.past or row.finish is not None or row in self.active:
            raise ValueError("only a new row can join a batch")
        for layer in self.cache.layers:
            if layer.is_initialized and layer.keys.numel():
                # keys, values: [B, H, width, D] -> [B + 1, H, width, D]
                layer.keys = torch.cat([layer.keys, layer.keys.new_zeros((1, *layer.keys.shape[1:]))])
                layer.values = torch.cat([layer.values, layer.values.new_zeros((1, *layer.values.shape[1:]))])
        row.stats.total_time, row.started = 0.0, time.perf_counter()
        self.active.append(row)
        if row not in self.rows:
            self.rows.append(row)

    def cancel(self, row: BatchRow) -> None:
        """The row leaves at the next step (as "abort"), whatever it was doing."""
        row.cancelled = True

    @torch.inference_mode()
    def step(self) -> list[tuple[BatchRow, list[int]]]:
        """One forward for every active row; returns each row's new tokens."""
        self._leave([b for b, row in enumerate(self.active) if row.cancelled])
        active, engine = self.active, self.engine
        if not active:
            return []
        budget = engine.budget
        # 1. draft, per row (whether draft models run: one decision per step, for every row)
        allow_costly = None if budget is None else budget.allow_costly()
        for row in active:
            row.draft(allow_costly)
        # 2. cut each tree to what pays, given what the whole batch feeds
        if budget is not None:
            self._cut()
        # 3. forward every row's pending tokens and tree together
        logits, starts, model_time = engine.forward([Row(r.pending, r.tree, r.past) for r in active], self.width,
                                                    self.cache)
        # 4. verify: accepted draft tokens + the bonus token, per row
        verdicts = [row.verify(row_logits) for row, row_logits in zip(active, logits)]
        # 5. the budget learns what the step cost and gave
        if budget is not None:
            self._observe(verdicts, model_time)
        # 6. commit the accepted paths' KV, drop the rest
        self._commit(verdicts, starts)
        # 7. emit, stopping where plain decoding stops; 8. the drafters learn
        step = [(row, row.emit(verdict)) for row, verdict in zip(active, verdicts)]
        for row in active:
            row.stats.model_time += model_time
            row.stats.total_time = time.perf_counter() - row.started
        self._leave([b for b, row in enumerate(active) if row.finish is not None])
        return step

    def _observe(self, verdicts: list[Verdict], seconds: float) -> None:
        """The step's cost refines the curve; where every row ran its draft models, what
        they gave teaches the gate."""
        active, drafted = self.active, None
        if all(row.drafted for row in active):
            drafted = (sum(len(v.tokens) for v in verdicts), sum(len(r.pending) for r in active),
                       sum(r.step_draft for r in active), len(active))
        self.engine.budget.observe(sum(len(r.pending) + len(r.tree) for r in active), seconds, drafted)

    def _commit(self, verdicts: list[Verdict], starts: list[int]) -> None:
        """Keep each row's pending tokens and accepted nodes in the cache, drop the rest."""
        kept = []
        for row, verdict, first in zip(self.active, verdicts, starts):  # first: the row's first new entry
            kept.append((row.past, [first + i for i in range(len(row.pending))]
                         + [first + len(row.pending) + i for i in verdict.nodes]))
            row.past += len(row.pending) + len(verdict.nodes)
            row.pending = verdict.tokens[-1:]
        self.width = keep_paths(self.cache, kept)

    def _cut(self) -> None:
        """The adaptive budget, over the whole batch: one forward feeds every row, so each
        tree is cut to what pays given all the tokens the others feed."""
        t0 = time.perf_counter()
        engine, rows = self.engine, [row for row in self.active if row.cuttable]
        if not rows:
            return
        fed = sum(len(r.pending) + (0 if r in rows else len(r.tree)) for r in self.active)
        sizes = engine.budget.plan([row.tree for row in rows], fed, others=len(self.active) - len(rows))
        for row, size in zip(rows, sizes):
            row.cut(size)
        spent = (time.perf_counter() - t0) / len(rows)
        for row in rows:
            row.stats.draft_time += spent

    def _leave(self, gone: list[int]) -> None:
        if not gone:
            return
        for b in gone:
            self.active[b].end()
        stay = [b for b in range(len(self.active)) if b not in gone]
        self.active = [self.active[b] for b in stay]
        if stay:
            self.cache.batch_select_indices(torch.tensor(stay))
            self.width = keep_paths(self.cache, [(row.past, []) for row in self.active])  # trim to the longest row
        else:
            self.cache, self.width = KVCache(), 0
            if self.engine.budget_store is not None:  # every row has ended: keep what the budget learned
                self.engine.budget_store.save(self.engine.budget.cost, self.engine.budget.calibration)

    def _run(self) -> Iterator[list[tuple[BatchRow, list[int]]]]:
        try:
            while self.active:
                yield self.step()
        finally:
            for row in self.rows:
                row.end()


class Stream:
    """Text pieces of one generation, as they are accepted."""

    def __init__(self, row: BatchRow):
        self.row = row
        self._steps = Batch(row.engine, [row])
        self._text = TextStream(row.engine.tokenizer, row.stops.stop)

    def __iter__(self) -> Iterator[str]:
        for [(_, new)] in self._steps:
            if piece := self._text.push(new):
                yield piece
        if piece := self._text.finish(self.row.result().text):
            yield piece

    def result(self) -> Generation:
        for _ in self._steps:  # whatever the caller has not consumed yet
            pass
        return self.row.result()


class TextStream:
    """Decoded text of a growing token list, released only when it is final: no half
    characters, nothing that could still turn out to be the start of a stop string."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.sent = 0  # characters already yielded

    def push(self, new_ids: list[int]) -> str:
        self.ids += new_ids
        text = _decode(self.tokenizer, self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        safe = len(text)
        for s in self.stop:
            if (found := text.find(s)) >= 0:
                safe = min(safe, found)
            for k in range(min(len(s) - 1, len(text)), 0, -1):  # text ends with the start of s
                if text.endswith(s[:k]):
                    safe = min(safe, len(text) - k)
                    break
        piece = text[self.sent : max(safe, self.sent)]
        self.sent = max(safe, self.sent)
        return piece

    def finish(self, final_text: str) -> str:
        return final_text[self.sent :]


def chat_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    """The prompt of a chat, through the tokenizer's chat template, ready for the answer."""
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if not isinstance(ids, list) else ids)


def _decode(tokenizer, ids: list[int]) -> str:
    # No clean-up of spaces: with it, text decoded so far need not be a prefix of the
    # text decoded later, and a stream could not promise to add up to the final text.
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class _StopChecker:
    def __init__(self, eos_ids: set[int], stop, tokenizer):
        self.eos_ids = eos_ids
        self.stop = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
        self.criteria = None
        if self.stop:
            if tokenizer is None:
                raise ValueError("stop strings need a tokenizer")
            self.criteria = StopStringCriteria(tokenizer, self.stop)
            self.window = self.criteria.maximum_token_len  # a stop string spans at most this many tokens

    def __call__(self, ids: list[int]) -> bool:
        if ids[-1] in self.eos_ids:
            return True
        if self.criteria is None:
            return False
        return bool(self.criteria(torch.tensor([ids[-self.window :]]), None)[0])

    def text(self, tokenizer, out: list[int]) -> str:
        if tokenizer is None:
            return ""
        text = _decode(tokenizer, out)
        cuts = [text.find(s) for s in self.stop if s in text]
        return text[: min(cuts)] if cuts else text


def _is_batch(prompt) -> bool:
    """A list of prompts, as opposed to one prompt given as token ids or chat messages."""
    return (isinstance(prompt, (list, tuple)) and len(prompt) > 0
            and all(isinstance(p, (str, list, tuple, torch.Tensor)) for p in prompt))


def _eos_ids(model) -> set[int]:
    # Exactly what `model.generate` stops on: the generation config's EOS, nothing else.
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in eos} if isinstance(eos, (list, tuple)) else {int(eos)}


__all__ = ["Engine", "Generation", "Stats", "NoDraft", "check_tree_attention"]
