"""Tiny randomly initialised models of each supported architecture, and helpers."""

from __future__ import annotations

import functools
import random

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
)

from triespec import TokenTree
from triespec.drafters import Drafter, DraftSession

VOCAB = 96
EOS = VOCAB - 1
CONTEXT = 256
ARCHS = ["llama", "qwen2", "mistral", "phi3", "gemma3", "gpt2"]


def tiny_config(arch: str):
    # A large initializer_range spreads the logits, so greedy picks are not near-ties
    # that fp32 rounding in differently shaped matmuls could flip.
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                  bos_token_id=0, eos_token_id=EOS, pad_token_id=0, initializer_range=0.2)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "mistral":  # a window shorter than the test sequences, so it matters
        return MistralConfig(**common, sliding_window=16)
    if arch == "phi3":
        return Phi3Config(**common)
    if arch == "gemma3":  # mixed sliding and full layers: the mask goes in as a dict
        return Gemma3TextConfig(**common, head_dim=16, sliding_window=8,
                                layer_types=["sliding_attention", "full_attention"])
    if arch == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=CONTEXT,
                          bos_token_id=0, eos_token_id=EOS, initializer_range=0.2)
    raise KeyError(arch)


def make_model(arch: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch)).eval()


@functools.lru_cache(maxsize=None)
def tiny_model(arch: str = "llama", seed: int = 0):
    """Shared between tests: do not mutate it (use make_model for that)."""
    return make_model(arch, seed)


def plain_greedy(model, ids: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=0, **kwargs)
    return out[0, len(ids):].tolist()


def repetitive_prompt(seed: int, length: int = 24) -> list[int]:
    rng = random.Random(seed)
    phrase = [rng.randrange(1, EOS) for _ in range(6)]
    noise = [rng.randrange(1, EOS) for _ in range(length)]
    return noise[: length // 2] + phrase + noise[length // 2 :] + phrase[:3]


class ScriptedDrafter(Drafter):
    """A drafter whose trees come from a function of the tokens so far (prompt + output)."""

    def __init__(self, make_tree):
        self.make_tree = make_tree

    def begin(self, prompt_ids, sampling=None):
        return ScriptedSession(self.make_tree, list(prompt_ids))


class ScriptedSession(DraftSession):
    def __init__(self, make_tree, seq):
        self.make_tree, self.seq = make_tree, seq

    def propose(self, max_nodes, max_depth, allow_costly=None):
        return self.make_tree(list(self.seq)).prefix(max_nodes, max_depth)

    def learn(self, new_ids):
        self.seq += list(new_ids)

    def end(self):
        pass


def random_tree(rng: random.Random, truth: list[int], size: int, p_true: float = 0.6) -> TokenTree:
    """A random tree shape over the true continuation `truth`: nodes on the true path
    take the true token with probability `p_true`, others are random (duplicates of
    siblings included)."""
    tokens, parents, on_path = [], [], []
    depths = []
    for i in range(size):
        parent = rng.randrange(-1, i)
        depth = 1 if parent < 0 else depths[parent] + 1
        path_ok = parent < 0 or on_path[parent]
        if path_ok and depth <= len(truth) and rng.random() < p_true:
            token = truth[depth - 1]
        else:
            token = rng.randrange(VOCAB)
        tokens.append(token)
        parents.append(parent)
        depths.append(depth)
        on_path.append(path_ok and depth <= len(truth) and token == truth[depth - 1])
    return TokenTree(tuple(tokens), tuple(parents))


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="session", autouse=True)
def session_budget_cache(tmp_path_factory):
    """Engines built by module-scoped fixtures (before any test's own folder is set) keep
    their budgets in a folder of the session's, never in ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRIESPEC_BUDGET_CACHE", str(tmp_path_factory.mktemp("budget-session")))
        yield


@pytest.fixture(autouse=True)
def budget_cache(tmp_path_factory, monkeypatch):
    """Every test keeps its engines' budgets in a folder of its own (never ~/.cache, and no
    test starts from what another learned); the variable reaches the CLI's subprocesses
    too. Returns the folder."""
    folder = tmp_path_factory.mktemp("budget")
    monkeypatch.setenv("TRIESPEC_BUDGET_CACHE", str(folder))
    return folder
