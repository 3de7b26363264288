"""The decode loop: draft, forward, verify, commit, emit, learn."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from transformers import DynamicCache, StopStringCriteria

from .drafters import Drafter, NoDraft, TrieDrafter
from .kv import keep_path
from .masks import attention_layout, pack
from .tree import TokenTree
from .sampling import Sampling, TreeScores, sampling_settings
from .verify import verify_greedy, verify_sampling

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
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_new_tokens or the context)
    stats: Stats


class Engine:
    """Lossless speculative generation for a Hugging Face causal LM.

    Engine(model, tokenizer, decoding_length=32, branch_length=12, mode="hierarchical", ...)
    builds a TrieDrafter from the keyword arguments; pass `drafter=` for another one.
    """

    def __init__(self, model, tokenizer=None, drafter: Drafter | None = None, **drafter_config):
        if drafter is not None and drafter_config:
            raise ValueError(f"pass either drafter= or drafter settings, not both (got {sorted(drafter_config)})")
        self.model = model
        self.tokenizer = tokenizer
        self.drafter = drafter if drafter is not None else TrieDrafter(**drafter_config)
        self.config = model.config.get_text_config()
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.context_length = _context_length(self.config)
        self.eos_ids = _eos_ids(model)
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        check_tree_attention(model)

    @classmethod
    def from_pretrained(cls, name_or_path, dtype="auto", device: str = "cpu", gguf_file: str | None = None, **config):
        from .loading import load

        model, tokenizer = load(name_or_path, dtype=dtype, device=device, gguf_file=gguf_file)
        return cls(model, tokenizer, **config)

    def encode(self, prompt) -> list[int]:
        """A string, a list of token ids, or chat messages ([{"role": ..., "content": ...}])."""
        if isinstance(prompt, str):
            self._need_tokenizer("a text prompt")
            ids = self.tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
            self._need_tokenizer("chat messages")
            ids = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if not isinstance(ids, list) else ids
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
                 streamer=None, **sampling) -> Generation:
        """Generate exactly what `model.generate` would, in fewer forward passes.

        Greedy by default (as the model's generation config says); `do_sample=True`
        with `temperature`, `top_k`, `top_p`, `min_p`, `repetition_penalty`,
        `logits_processor` and `seed` or `generator` samples from exactly the
        distribution `model.generate` samples from. Stops on EOS, after
        `max_new_tokens`, at the end of the context, or on a stop string (where
        transformers' `stop_strings` stops; the text is cut before the stop string, the
        token ids are not). `streamer`: a transformers streamer (`put`/`end`), given
        the new tokens after every step.
        """
        request = self._request(prompt, max_new_tokens, stop, sampling)
        for new in request:
            if streamer is not None:
                streamer.put(torch.tensor(new))
        if streamer is not None:
            streamer.end()
        return request.result()

    def stream(self, prompt, max_new_tokens: int = 128, stop: str | Sequence[str] | None = None,
               **sampling) -> Iterator[str]:
        """Yield the text as it is accepted (several tokens per step).

        Never splits a character, and holds back text that may be the start of a stop
        string; the pieces join to exactly `generate(...).text`.
        """
        self._need_tokenizer("streaming text")
        request = self._request(prompt, max_new_tokens, stop, sampling)
        text = _TextStream(self.tokenizer, request.stops.stop)
        for new in request:
            if piece := text.push(new):
                yield piece
        if piece := text.finish(request.result().text):
            yield piece

    def _request(self, prompt, max_new_tokens, stop, sampling: dict) -> _Request:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        unknown = set(sampling) - SAMPLING_ARGS
        if unknown:
            raise ValueError(f"unknown generation arguments {sorted(unknown)}; supported: {sorted(SAMPLING_ARGS)}")
        settings = sampling_settings(self.model.generation_config, **sampling)
        stops = _StopChecker(self.eos_ids, stop, self.tokenizer)
        return _Request(self, self.encode(prompt), max_new_tokens, stops, settings)

    def _forward(self, pending: list[int], tree: TokenTree, past: int, cache: DynamicCache) -> torch.Tensor:
        packed = pack(pending, tree, past, self.model.dtype, self.config, self.model.device)
        kwargs = {"logits_to_keep": len(tree) + 1} if self._logits_to_keep else {}
        out = self.model(
            input_ids=packed.input_ids,
            position_ids=packed.position_ids,
            attention_mask=packed.attention_mask,
            past_key_values=cache,
            use_cache=True,
            **kwargs,
        )
        return out.logits[0, -(len(tree) + 1) :].float()

    def _need_tokenizer(self, what: str) -> None:
        if self.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer: pass one to Engine, or give token ids")


class _Request:
    """One generation, advanced step by step: iterating yields the tokens of each step."""

    def __init__(self, engine: Engine, ids: list[int], max_new_tokens: int, stops: _StopChecker, sampling: Sampling):
        self.engine, self.ids, self.stops, self.sampling = engine, ids, stops, sampling
        self.limit = min(max_new_tokens, engine.context_length - len(ids))
        self.out: list[int] = []
        self.finish: str | None = None
        self.stats = Stats(prompt_tokens=len(ids))
        self._steps = self._run()  # one run per request, however it is consumed

    def __iter__(self) -> Iterator[list[int]]:
        return self._steps

    @torch.inference_mode()
    def _run(self) -> Iterator[list[int]]:
        engine, stats, start = self.engine, self.stats, time.perf_counter()
        seq = list(self.ids)  # prompt + output
        pending = list(self.ids)  # committed tokens not yet in the KV cache
        cache, past = DynamicCache(), 0  # past: tokens in the KV cache
        session = engine.drafter.begin(self.ids)
        try:
            while self.finish is None:
                # 1. draft: every token past the limit would be thrown away
                t0 = time.perf_counter()
                tree = session.propose(max_nodes=engine.context_length, max_depth=self.limit - len(self.out) - 1)
                t1 = time.perf_counter()
                # 2. forward the pending tokens and the tree together
                logits = engine._forward(pending, tree, past, cache)  # [1 + n, V]
                t2 = time.perf_counter()
                # 3. verify: accepted draft tokens + the bonus token
                scores = TreeScores(logits, tree, seq, self.sampling.processors)
                if self.sampling.do_sample:
                    base = len(seq)  # output position of the step's first token
                    verdict = verify_sampling(tree, scores, lambda depth: self.sampling.at(base + depth))
                else:
                    verdict = verify_greedy(tree, scores)
                # 4. commit the accepted path's KV, drop the rest
                past += len(pending)
                keep_path(cache, past, [past + i for i in verdict.nodes])
                past += len(verdict.nodes)
                pending = verdict.tokens[-1:]
                # 5. emit token by token, stopping exactly where plain decoding stops
                new = []
                for token in verdict.tokens:
                    new.append(token)
                    seq.append(token)
                    if self.stops(seq):
                        self.finish = "stop"
                        break
                    if len(self.out) + len(new) >= self.limit:
                        self.finish = "length"
                        break
                self.out += new
                # 6. learn from what the model produced
                t3 = time.perf_counter()
                session.learn(new)
                stats.draft_time += (t1 - t0) + (time.perf_counter() - t3)
                stats.model_time += t2 - t1
                stats.tokens_per_step.append(len(new))
                stats.draft_sizes.append(len(tree))
                stats.new_tokens = len(self.out)
                stats.total_time = time.perf_counter() - start
                yield new
        finally:
            session.end()

    def result(self) -> Generation:
        for _ in self._steps:  # whatever the caller has not consumed yet
            pass
        return Generation(self.stops.text(self.engine.tokenizer, self.out), self.out, self.finish, self.stats)


class _TextStream:
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


def _context_length(config) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 30  # no stated limit


def _eos_ids(model) -> set[int]:
    # Exactly what `model.generate` stops on: the generation config's EOS, nothing else.
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in eos} if isinstance(eos, (list, tuple)) else {int(eos)}


@torch.inference_mode()
def check_tree_attention(model) -> None:
    """Refuse a model whose attention does not honour a 4-D tree mask.

    Feeds [a, b, c] with c a sibling of b (same position, must not see b) and compares
    c's logits with [a, c] fed as a plain sequence.
    """
    name = f"{type(model).__name__} (attention {model.config._attn_implementation!r})"
    config = model.config.get_text_config()
    try:
        attention_layout(config)
        vocab = model.get_output_embeddings().weight.shape[0]
        a, b, c = 1 % vocab, 2 % vocab, 3 % vocab

        def last_logits(tree: TokenTree) -> torch.Tensor:
            packed = pack([a], tree, 0, model.dtype, config, model.device)
            out = model(input_ids=packed.input_ids, position_ids=packed.position_ids,
                        attention_mask=packed.attention_mask, past_key_values=DynamicCache(), use_cache=True)
            return out.logits[0, -1].float()

        tree_logits = last_logits(TokenTree((b, c), (-1, -1)))
        chain_logits = last_logits(TokenTree.chain([c]))
    except ValueError as e:
        raise ValueError(f"{name} cannot take a tree attention mask: {e}") from e
    except Exception as e:  # any failure here means the model cannot be driven this way
        raise ValueError(f"{name} cannot take a 4-D attention mask with explicit position ids: {e}") from e
    tolerance = 1e-3 if model.dtype == torch.float32 else 3e-2
    error = ((tree_logits - chain_logits).norm() / chain_logits.norm().clamp_min(1e-6)).item()
    if not error <= tolerance:
        raise ValueError(
            f"{name} ignores the 4-D tree attention mask (relative logit error {error:.2g}); "
            "use attn_implementation='sdpa' or 'eager'"
        )


__all__ = ["Engine", "Generation", "Stats", "NoDraft", "check_tree_attention"]
