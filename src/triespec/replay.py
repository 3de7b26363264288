"""Replay recorded greedy outputs through the real engine, an oracle standing in for the model.

Greedy output does not depend on the drafts: given a prompt and the output plain greedy
decoding produced from it, the model's next token is known at every position the engine
can ask about. An `Oracle` answers `Engine.forward` with logits that put all mass on
that token, and charges each forward by a cost curve at (tokens fed, cache width)
instead of timing it. Everything else is the product's own step (`engine.Batch`):
drafting, the adaptive cut and what it learns, verification, the KV commit. Draft
budgets are compared this way on a benchmark's outputs in minutes rather than hours
(scripts/replay_budget.py): a simulation under a cost curve, not a speed claim.
"""

from __future__ import annotations

import copy

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from .budget import Calibration, CostModel
from .engine import Engine, Stats
from .masks import Row

Recorded = tuple[Sequence[int], Sequence[int]]  # (prompt ids, the output plain greedy decoding produced)


class Oracle:
    """The model of a replay, in place of `Engine.forward`.

    For a row whose prompt was recorded, the logits at the root and at every tree node
    put all mass on the recorded token at the next position. That is the model's own
    token wherever the node's path is the recorded output so far; a node whose path left
    it gets the recorded token at its depth too, which the verifier never reads, since it
    descends only into children that match their parent's token. Each forward is charged
    `charge(tokens fed, cache width)` seconds (`charged` keeps every one).

    The cache works as the model's would: each entry holds the token fed there (keys)
    and the recorded generation of its row (values). The batch moves entries as it moves
    real ones (rows joining and leaving, accepted paths kept), so a row is known by its
    prompt at its first forward and by its cache afterwards, and the oracle checks that
    the cache holds exactly the row's recorded tokens, as a model's cache must.
    """

    def __init__(self, generations: Iterable[Recorded], charge: CostModel, vocab_size: int | None = None):
        self.charge = charge
        self.sequences: list[torch.Tensor] = []  # prompt + output, one per distinct prompt
        self.prompts: dict[tuple[int, ...], int] = {}  # prompt -> its index in `sequences`
        for prompt, output in generations:
            prompt, output = [int(t) for t in prompt], [int(t) for t in output]
            if not prompt or not output:
                raise ValueError("a recorded generation needs a prompt and an output, both non-empty")
            sequence = torch.tensor(prompt + output)
            g = self.prompts.setdefault(tuple(prompt), len(self.sequences))
            if g == len(self.sequences):
                self.sequences.append(sequence)
                continue
            known = self.sequences[g]
            n = min(len(known), len(sequence))
            if not torch.equal(known[:n], sequence[:n]):
                raise ValueError(f"two recorded outputs of one {len(prompt)}-token prompt differ: "
                                 "they are not plain greedy outputs of one model")
            self.sequences[g] = max(known, sequence, key=len)
        if not self.sequences:
            raise ValueError("nothing to replay: no recorded generation")
        top = max(int(s.max()) for s in self.sequences)
        if min(int(s.min()) for s in self.sequences) < 0:
            raise ValueError("recorded token ids must be >= 0")
        self.vocab_size = top + 1 if vocab_size is None else vocab_size
        if self.vocab_size <= top:
            raise ValueError(f"vocab_size {vocab_size} does not hold the recorded token id {top}")
        self.context_length = max(len(s) for s in self.sequences)  # every recorded sequence fits
        self.charged: list[tuple[int, int, float]] = []  # (tokens fed, cache width, seconds) of each forward

    def __call__(self, rows: list[Row], width: int, cache: DynamicCache) -> tuple[list[torch.Tensor], list[int], float]:
        """`Engine.forward`'s contract: each row's logits [1 + n, V], where its new entries
        start in the cache, and the seconds charged. Rows are right-aligned, as `pack` lays
        them out."""
        T = max(len(r.pending) + len(r.tree) for r in rows)
        keys = torch.zeros(len(rows), 1, T, 1, dtype=torch.long)  # [B, heads, T, head dim]: the tokens fed
        values = torch.zeros_like(keys)  # the row's recorded generation
        logits, starts = [], []
        for b, row in enumerate(rows):
            g = self._generation(b, row, cache)
            sequence, known = self.sequences[g], row.past + len(row.pending)  # known: the row's tokens so far
            if not torch.equal(sequence[row.past : known], torch.tensor(row.pending)):
                raise RuntimeError(f"row {b} feeds tokens that plain greedy decoding did not produce at "
                                   f"positions {row.past}-{known - 1}")
            if known + row.tree.depth >= len(sequence):
                raise ValueError(f"row {b} asks for position {known + row.tree.depth}, past its recorded "
                                 f"output (prompt and output: {len(sequence)} tokens): generate at most the "
                                 "recorded output's length")
            # the token after the root, and after each node: the recorded one at that depth
            targets = sequence[known + torch.tensor([0, *row.tree.depths], dtype=torch.long)]  # [1 + n]
            row_logits = torch.zeros(len(targets), self.vocab_size)  # [1 + n, V]
            row_logits[torch.arange(len(targets)), targets] = 1.0
            logits.append(row_logits)
            offset = T - len(row.pending) - len(row.tree)
            keys[b, 0, offset:, 0] = torch.tensor([*row.pending, *row.tree.tokens])
            values[b, 0, offset:, 0] = g
            starts.append(width + offset)
        cache.update(keys, values, 0)
        fed = sum(len(r.pending) + len(r.tree) for r in rows)
        seconds = self.charge(fed, width)
        self.charged.append((fed, width, seconds))
        return logits, starts, seconds

    def _generation(self, b: int, row: Row, cache: DynamicCache) -> int:
        """Which recorded generation row `b` replays: by its prompt at its first forward,
        then by its cache, which must hold its recorded tokens."""
        if row.past == 0:
            g = self.prompts.get(tuple(row.pending))
            if g is None:
                raise ValueError(f"row {b}: its {len(row.pending)}-token prompt was not recorded")
            return g
        layer = cache.layers[0]
        g = int(layer.values[b, 0, 0, 0])
        if not torch.equal(layer.keys[b, 0, : row.past, 0], self.sequences[g][: row.past]):
            raise RuntimeError(f"row {b}'s cache does not hold its recorded tokens: the commit kept other entries")
        return g


def stand_in(vocab_size: int, context_length: int) -> LlamaForCausalLM:
    """A one-layer Llama of width 8 over the recorded vocabulary, with no EOS: what Engine
    reads of a model (its configuration, output embeddings, generation config, forward
    signature), and a real attention for its start-up check of tree masks. A replay never
    runs it afterwards, and stops at the recorded output's length."""
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=context_length,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config).eval()


class ReplayEngine(Engine):
    """An Engine whose forward is an `Oracle`: the product's decode step over recorded
    outputs. `cost`, the curve the adaptive budget decides by (and refines by the seconds
    each forward is charged), defaults to a copy of the oracle's `charge` (refining the
    charge itself would move the prices of the replay as it goes); the other settings are
    Engine's (`adaptive`, `drafter`, or TrieDrafter settings)."""

    def __init__(self, oracle: Oracle, adaptive: bool = True, cost: CostModel | None = None, **settings):
        settings.setdefault("kernels", "torch")  # the stand-in model never runs: nothing to choose
        super().__init__(stand_in(oracle.vocab_size, oracle.context_length), adaptive=adaptive,
                         cost=cost if cost is not None else copy.deepcopy(oracle.charge), **settings)
        self.oracle = oracle

    def forward(self, rows: list[Row], width: int, cache: DynamicCache) -> tuple[list[torch.Tensor], list[int], float]:
        return self.oracle(rows, width, cache)


@dataclass
class Replayed:
    """What a replay gave. Seconds are counted after each generation's prefill (its first
    forward): the prefill costs every method the same, and the harness's modelled
    speed-up leaves it out too."""

    seconds: float = 0.0  # charged to the engine's forwards
    plain_seconds: float = 0.0  # charged to plain greedy decoding's forwards (one per token) for the same tokens
    stats: list[Stats] = field(default_factory=list)  # each generation's, as the engine counted its steps

    @property
    def speedup(self) -> float:
        """Plain decoding's seconds over the replay's, for the same tokens."""
        return self.plain_seconds / self.seconds if self.seconds > 0 else float("nan")

    @property
    def tokens_per_step(self) -> list[int]:
        """Tokens each step yielded, every generation's in turn, prefills included."""
        return [n for stats in self.stats for n in stats.tokens_per_step]


def replay(generations: Iterable[Recorded], charge: CostModel, calibration: Calibration | None = None,
           **settings) -> Replayed:
    """Generate every recorded prompt in turn with one `ReplayEngine` (one drafter memory,
    as the harness keeps per workload) and check that each output is the recorded one.
    `charge` prices the forwards; `calibration`: the adaptive budget's, carried in from
    other replays (as the harness carries it from workload to workload); `settings`:
    ReplayEngine's (`adaptive`, `cost`, `drafter`, TrieDrafter settings)."""
    generations = [([int(t) for t in prompt], [int(t) for t in output]) for prompt, output in generations]
    oracle = Oracle(generations, charge)
    engine = ReplayEngine(oracle, **settings)
    if calibration is not None:
        if engine.budget is None:
            raise ValueError("a calibration needs the adaptive budget (adaptive=True and a drafter)")
        engine.budget.calibration = calibration
    total = Replayed()
    for prompt, output in generations:
        first_forward = len(oracle.charged)
        result = engine.generate(prompt, max_new_tokens=len(output))
        if result.token_ids != output:
            raise RuntimeError(f"the replay of a {len(prompt)}-token prompt left the recorded output: "
                               "the engine is no longer lossless")
        first = result.stats.tokens_per_step[0]  # tokens of the prefill's step
        total.seconds += sum(seconds for _, _, seconds in oracle.charged[first_forward + 1 :])
        # plain decoding: output token i comes from a forward of one token after len(prompt) + i - 1 cached
        total.plain_seconds += sum(charge(1, len(prompt) + i - 1) for i in range(first, len(output)))
        total.stats.append(result.stats)
    return total


__all__ = ["Oracle", "ReplayEngine", "Replayed", "replay", "stand_in"]
