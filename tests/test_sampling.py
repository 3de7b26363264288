"""Sampled output must be distributed exactly as plain sampling.

Verifier-level tests use a toy language model whose next-token distribution is known
exactly for every context, so the exact law of the first L tokens is known: a sample is
one verification step followed by plain ancestral sampling up to L tokens. A chi-square
test compares the counts with that law; the same test, run on deliberately biased
verifiers, must fail.
"""

import itertools
import random

import pytest
import torch

from conftest import ScriptedDrafter, make_model, plain_greedy
from triespec import Engine, NoDraft, TokenTree
from triespec.budget import Calibration, CostModel
from triespec.drafters import Drafter, DraftSession
from triespec.tree import MODEL
from triespec.verify import Verdict, verify_sampling

V = 5  # vocabulary of the toy model
L = 3  # tokens whose joint law is tested
N = 40_000


class ToyLM:
    """p(. | context) for any context: fixed random logits per context."""

    def __init__(self, seed=0):
        self.seed, self.cache = seed, {}

    def logits(self, context) -> torch.Tensor:
        context = tuple(context)
        if context not in self.cache:
            g = torch.Generator().manual_seed(hash((self.seed, context)) % (2**31))
            self.cache[context] = torch.randn(V, generator=g) * 1.5
        return self.cache[context]

    def probs(self, context) -> torch.Tensor:
        return torch.softmax(self.logits(context), -1)

    def exact_law(self, length):
        return {seq: float(torch.tensor([self.probs(seq[:i])[t] for i, t in enumerate(seq)]).prod())
                for seq in itertools.product(range(V), repeat=length)}


def tree_logits(lm, tree):
    rows = [lm.logits(())] + [lm.logits([tree.tokens[j] for j in tree.path(i)]) for i in range(len(tree))]
    return torch.stack(rows)  # [1 + n, V]


def draw(lm, verifier, make_tree, n, seed, length=L):
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    counts, rows = {}, {}
    for _ in range(n):
        tree = make_tree(rng)
        key = (tree.tokens, tree.parents)
        if key not in rows:
            rows[key] = tree_logits(lm, tree)
        seq = verifier(tree, rows[key], g).tokens[:length]
        while len(seq) < length:  # plain ancestral sampling for the rest
            seq.append(rng.choices(range(V), weights=lm.probs(seq).tolist())[0])
        counts[tuple(seq)] = counts.get(tuple(seq), 0) + 1
    return counts


def chi_square_p_value(counts, law, n):
    stat = sum((counts.get(seq, 0) - n * p) ** 2 / (n * p) for seq, p in law.items())
    dof = len(law) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(stat / 2.0)))


def marginals(counts, law, i):
    marginal_counts, marginal_law = {}, {}
    for seq, c in counts.items():
        marginal_counts[seq[i]] = marginal_counts.get(seq[i], 0) + c
    for seq, p in law.items():
        marginal_law[seq[i]] = marginal_law.get(seq[i], 0.0) + p
    return marginal_counts, marginal_law


def law_p_values(counts, law, n, length=L):
    """p-values of the joint law and of each position's marginal law."""
    return [chi_square_p_value(counts, law, n)] + [chi_square_p_value(*marginals(counts, law, i), n) for i in range(length)]


def max_z(counts, law, n, length=L):
    """The largest |z| over every token's probability at every position: a bias in any
    one token's probability shows here undiluted (the joint test spreads it over V**L
    cells)."""
    z = 0.0
    for i in range(length):
        marginal_counts, marginal_law = marginals(counts, law, i)
        for token, p in marginal_law.items():
            z = max(z, abs(marginal_counts.get(token, 0) - n * p) / (n * p * (1 - p)) ** 0.5)
    return z


# --- trees ------------------------------------------------------------------


def trie_tree(rng):
    """Deterministic drafts (no q), with a duplicate sibling and shared prefixes."""
    return TokenTree((0, 1, 0, 2, 3, 4, 1), (-1, -1, -1, 0, 0, 2, 3))


def model_tree(lm_draft):
    """Drafts sampled from a draft distribution q, as a small model would: the root
    gets two i.i.d. children, each child one child of its own."""

    def make(rng):
        tokens, parents, qs = [], [], []
        for parent in (-1, -1, 0, 1):
            context = [] if parent < 0 else [tokens[parent]]
            q = lm_draft.probs(context)
            tokens.append(rng.choices(range(V), weights=q.tolist())[0])
            parents.append(parent)
            qs.append(q)
        return TokenTree(tuple(tokens), tuple(parents), draft_probs=torch.stack(qs))

    return make


# --- biased verifiers, to show the test has teeth -------------------------------


def no_residual(tree, logits, g):
    """A classic bug: on rejection, sample the bonus from p rather than the residual."""
    verdict = verify_sampling(tree, logits, g)
    if verdict.nodes or not tree.children[-1]:
        return verdict
    return Verdict([], [int(torch.multinomial(torch.softmax(logits[0], -1), 1, generator=g))])


def one_percent_bias(law):
    """Moves 1% of probability from the likeliest first token to the second likeliest:
    the hardest place to see it, where the counts vary most."""
    (first, p_first), (second, _) = sorted(law.items(), key=lambda kv: -kv[1])[:2]

    def verifier(tree, logits, g):
        verdict = verify_sampling(tree, logits, g)
        if (verdict.tokens[0],) == first and float(torch.rand((), generator=g)) < 0.01 / p_first:
            return Verdict([], [second[0]])
        return verdict

    return verifier


@pytest.mark.parametrize("case", ["trie", "model"])
def test_verifier_samples_the_exact_law(case):
    lm = ToyLM(seed=1)
    make_tree = trie_tree if case == "trie" else model_tree(ToyLM(seed=2))
    counts = draw(lm, verify_sampling, make_tree, N, seed=3)
    law = lm.exact_law(L)
    assert min(law_p_values(counts, law, N)) > 1e-3
    assert max_z(counts, law, N) < 4.5


def test_the_law_test_catches_a_verifier_without_residual():
    lm = ToyLM(seed=1)
    counts = draw(lm, no_residual, model_tree(ToyLM(seed=2)), N, seed=3)
    assert min(law_p_values(counts, lm.exact_law(L), N)) < 1e-6


def test_a_one_percent_bias_in_one_token_is_caught():
    # 80k draws of the first token: a 1% shift at p ~ 0.4 is about 6 standard deviations
    lm, n = ToyLM(seed=1), 80_000
    law = lm.exact_law(1)
    fair = draw(lm, verify_sampling, trie_tree, n, seed=4, length=1)
    biased = draw(lm, one_percent_bias(law), trie_tree, n, seed=4, length=1)
    assert max_z(fair, law, n, length=1) < 4.5
    assert max_z(biased, law, n, length=1) > 4.5


def test_drafts_are_accepted_when_q_equals_p():
    lm = ToyLM(seed=4)
    g = torch.Generator().manual_seed(0)
    accepted = 0
    for _ in range(200):
        tree = model_tree(lm)(random.Random(int(torch.randint(0, 10**6, (), generator=g))))
        accepted += len(verify_sampling(tree, tree_logits(lm, tree), g).nodes)
    assert accepted == 400  # a draft from the target's own law is always accepted, to full depth


# --- the engine, with a real (tiny) model ---------------------------------------


def processed_law(model, prompt, temperature, top_k, penalty):
    """The law of the first two sampled tokens, computed here from the raw logits."""

    def step(ids):
        logits = model(torch.tensor([ids])).logits[0, -1].double()
        for t in set(ids):  # repetition penalty, as in CTRL
            logits[t] = logits[t] * penalty if logits[t] < 0 else logits[t] / penalty
        logits = logits / temperature
        cutoff = logits.topk(top_k).values[-1]
        logits[logits < cutoff] = -float("inf")
        return torch.softmax(logits, -1)

    with torch.no_grad():
        first = step(prompt)
        return {(a, b): float(first[a] * step(prompt + [a])[b]) for a in range(8) for b in range(8)}


@pytest.mark.slow
def test_engine_sampling_matches_the_model_law():
    model = make_model("llama", seed=5)
    model.config.vocab_size = 8
    model.resize_token_embeddings(8)
    model.generation_config.eos_token_id = None
    prompt = [1, 2, 3, 1, 2]
    # every first token is drafted, with every second token below it
    tree = TokenTree(tuple(range(8)) + tuple(b for a in range(8) for b in range(8)),
                     (-1,) * 8 + tuple(a for a in range(8) for _ in range(8)))
    engine = Engine(model, drafter=ScriptedDrafter(lambda seq: tree), adaptive=False)
    settings = dict(do_sample=True, temperature=0.8, top_k=5, repetition_penalty=1.3)
    g = torch.Generator().manual_seed(0)
    n, counts = 4000, {}
    for _ in range(n):
        result = engine.generate(prompt, max_new_tokens=2, generator=g, **settings)
        counts[tuple(result.token_ids)] = counts.get(tuple(result.token_ids), 0) + 1
        assert result.stats.steps == 1  # the first token always accepted, the second the bonus
    law = {k: p for k, p in processed_law(model, prompt, 0.8, 5, 1.3).items() if p > 0}
    assert set(counts) <= set(law)  # nothing outside top-k
    assert chi_square_p_value(counts, law, n) > 1e-3


def test_a_seed_fixes_the_text_whatever_the_drafts():
    model = make_model("llama", seed=6)
    prompt = [5, 6, 7, 5, 6, 7, 5, 6]
    settings = dict(max_new_tokens=30, do_sample=True, temperature=0.7)
    plain = Engine(model, drafter=NoDraft())
    speculative = Engine(model, adaptive=False, decoding_length=16, branch_length=6)
    for seed in (1, 2, 3):
        expected = plain.generate(prompt, seed=seed, **settings)
        first = speculative.generate(prompt, seed=seed, **settings)
        second = speculative.generate(prompt, seed=seed, **settings)  # drafted from memory now
        assert first.token_ids == expected.token_ids == second.token_ids
        assert second.stats.steps < expected.stats.steps
    other = plain.generate(prompt, seed=4, **settings)
    assert other.token_ids != expected.token_ids


def test_greedy_with_repetition_penalty_matches_plain_greedy():
    model = make_model("qwen2", seed=7)
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]
    expected = plain_greedy(model, prompt, 30, repetition_penalty=1.5)
    engine = Engine(model, adaptive=False, decoding_length=16, branch_length=6)
    engine.generate(prompt, max_new_tokens=30)  # the memory now holds the unpenalised answer
    assert engine.generate(prompt, max_new_tokens=30, repetition_penalty=1.5).token_ids == expected


@pytest.mark.parametrize("bad", [{"temperature": 0.0, "do_sample": True}, {"top_p": 1.5}, {"top_k": -1},
                                 {"min_p": 2.0}, {"repetition_penalty": 0.0}, {"beams": 3},
                                 {"seed": 1, "generator": torch.Generator()}])
def test_bad_sampling_settings(bad):
    with pytest.raises(ValueError):
        Engine(make_model("llama")).generate([1, 2, 3], max_new_tokens=2, **bad)


def test_streamer_receives_every_token():
    class Collect:
        def __init__(self):
            self.tokens, self.ended = [], False

        def put(self, value):
            self.tokens += value.tolist()

        def end(self):
            self.ended = True

    model = make_model("llama", seed=8)
    streamer = Collect()
    result = Engine(model).generate([4, 5, 6, 4, 5], max_new_tokens=25, streamer=streamer)
    assert streamer.tokens == result.token_ids and streamer.ended


def test_a_users_logits_processor_applies_as_in_generate():
    from transformers import LogitsProcessor, LogitsProcessorList

    class BanEvenAfterOdd(LogitsProcessor):
        """Depends on the text so far: after an odd token, even tokens are banned."""

        def __call__(self, input_ids, scores):
            if input_ids[0, -1] % 2 == 1:
                scores[:, ::2] = -float("inf")
            return scores

    model = make_model("llama", seed=9)
    prompt = [3, 8, 3, 8, 3, 8, 3]
    processors = LogitsProcessorList([BanEvenAfterOdd()])
    expected = plain_greedy(model, prompt, 25, logits_processor=processors)
    engine = Engine(model, adaptive=False, decoding_length=12, branch_length=5)
    engine.generate(prompt, max_new_tokens=25)  # memory of the unconstrained answer: drafts to reject
    result = engine.generate(prompt, max_new_tokens=25, logits_processor=processors)
    assert result.token_ids == expected
    assert result.token_ids != engine.generate(prompt, max_new_tokens=25).token_ids


class SampledChild(Drafter, DraftSession):
    """Drafts one child of the root, drawn from a fixed q with a random stream of its own,
    recorded with its q and scored q(x): a sampling drafter's tree in its simplest form."""

    def __init__(self, q: torch.Tensor, seed: int = 0):
        self.q, self.g = q, torch.Generator().manual_seed(seed)

    def begin(self, prompt_ids, sampling=None):
        return self

    def propose(self, max_nodes, max_depth, allow_costly=None):
        if max_nodes < 1 or max_depth < 1:
            return TokenTree()
        x = int(torch.multinomial(self.q, 1, generator=self.g))
        return TokenTree((x,), (-1,), (float(self.q[x]),), self.q[None], kinds=(MODEL,))

    def learn(self, new_ids):
        pass

    def end(self):
        pass


@pytest.mark.slow
def test_a_cut_that_looks_at_the_draws_keeps_the_law():
    """The adaptive cut keeps a sampled node only when its score (the q of the token it
    drew) is high enough. Verified with q, the kept node would then not be a plain draw
    from q: with q = (0.6 on a, 0.4 on b) and a kept only when drawn, a would come out
    with probability p(a) (2 - 0.6) instead of p(a). A steep cost model makes the cut
    depend on the draw (one more token costs half a forward: only nodes likelier than
    1/2 pay), and a calibration too sure to move keeps the rates at q."""
    model = make_model("llama", seed=5)
    model.config.vocab_size = 8
    model.resize_token_embeddings(8)
    model.generation_config.eos_token_id = None
    prompt = [1, 2, 3, 1, 2]
    settings = dict(do_sample=True, temperature=0.8, top_k=5, repetition_penalty=1.3)
    law = {k: p for k, p in processed_law(model, prompt, 0.8, 5, 1.3).items() if p > 0}
    first = [sum(p for (a, _), p in law.items() if a == t) for t in range(8)]
    a, b = sorted(range(8), key=lambda t: -first[t])[:2]
    assert first[a] < 0.6  # so the bias would show: a is accepted with p(a) / q(a) < 1
    q = torch.zeros(8)
    q[a], q[b] = 0.6, 0.4
    # the first step feeds the prompt (5 tokens): a sixth costs half a forward more; real steps do not move it
    cost = CostModel([1, 5, 6, 7], [1.0, 1.0, 1.5, 2.0], smoothing=0.0)
    engine = Engine(model, drafter=SampledChild(q), cost=cost)
    engine.budget.calibration = Calibration(prior=1e6, memory=None)
    g = torch.Generator().manual_seed(0)
    n, counts, verified = 1500, {}, 0
    for _ in range(n):
        result = engine.generate(prompt, max_new_tokens=2, generator=g, **settings)
        counts[tuple(result.token_ids)] = counts.get(tuple(result.token_ids), 0) + 1
        verified += result.stats.draft_sizes[0]
    assert 0.5 * n < verified < 0.7 * n  # the cut kept the node when a was drawn, and only then
    assert set(counts) <= set(law)
    assert chi_square_p_value(counts, law, n) > 1e-3
    assert max_z(counts, law, n, length=2) < 4.5
