"""Small-model drafter (SpecInfer expansion), merged trees, and their losslessness."""

import json
import random

import pytest
import torch
from transformers import DynamicCache

from conftest import EOS, VOCAB, ScriptedDrafter, make_model, plain_greedy, repetitive_prompt, tiny_model
from test_sampling import chi_square_p_value, max_z, processed_law
from triespec import Engine, MergedDrafter, ModelDrafter, TokenTree, TrieDrafter
from triespec.drafters import merge
from triespec.drafters.model import tree_shape
from triespec.masks import with_cache
from triespec.sampling import TreeScores, sampling_settings
from triespec.verify import verify_sampling

# --- greedy: identical to plain greedy ------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3", "gpt2"])
def test_self_draft_is_accepted_fully_and_output_is_plain_greedy(arch):
    # The target as its own draft: every top-1 branch is the model's own argmax
    model = tiny_model(arch)
    prompt = repetitive_prompt(2, length=30)
    expected = plain_greedy(model, prompt, 40)
    drafter = ModelDrafter(model, min_score=0.0)
    result = Engine(model, drafter=drafter, adaptive=False).generate(prompt, max_new_tokens=40)
    assert result.token_ids == expected
    # every step but the last yields the whole depth (8) plus the bonus
    assert result.stats.tokens_per_step[:-1] == [9] * (len(result.stats.tokens_per_step) - 1)


@pytest.mark.parametrize("target_arch,draft_arch", [("llama", "qwen2"), ("qwen2", "llama"), ("mistral", "phi3")])
def test_model_and_hybrid_drafters_give_plain_greedy(target_arch, draft_arch):
    target, draft = tiny_model(target_arch), tiny_model(draft_arch, seed=3)
    for seed in range(2):
        prompt = repetitive_prompt(seed)
        expected = plain_greedy(target, prompt, 48)
        for drafter in (ModelDrafter(draft, widths=(2, 2, 1, 1)),
                        MergedDrafter([TrieDrafter(decoding_length=16), ModelDrafter(draft)])):
            assert Engine(target, drafter=drafter).generate(prompt, max_new_tokens=48).token_ids == expected


def test_hybrid_with_a_useful_draft_beats_each_drafter_alone_in_steps():
    # The target drafts for itself (a perfect small model) and the prompt repeats itself:
    # the hybrid takes no more steps than either drafter alone and is still exact. The trie's
    # branches are kept shorter than the budget: a trie chain of "confident" nodes (a
    # continuation seen once scores 1.0) as long as the whole budget leaves the model no
    # room, and with a fixed budget the model is then not run at all (MergedDrafter).
    model = tiny_model("llama")
    prompt = repetitive_prompt(5, length=40)
    expected = plain_greedy(model, prompt, 60)
    steps = {}
    for name, drafter in [("trie", TrieDrafter(decoding_length=20, branch_length=12)),
                          ("model", ModelDrafter(model, widths=(1,) * 4, min_score=0)),
                          ("hybrid", MergedDrafter([TrieDrafter(decoding_length=20, branch_length=12),
                                                    ModelDrafter(model, widths=(1,) * 4, min_score=0)]))]:
        result = Engine(model, drafter=drafter, adaptive=False).generate(prompt, max_new_tokens=60)
        assert result.token_ids == expected
        assert max(result.stats.draft_sizes) <= 20
        steps[name] = result.stats.steps
    assert steps["hybrid"] <= min(steps["trie"], steps["model"])


def test_batches_with_a_model_drafter():
    model, draft = tiny_model("qwen2"), tiny_model("qwen2")
    prompts = [repetitive_prompt(s) for s in range(3)]
    engine = Engine(model, drafter=MergedDrafter([TrieDrafter(decoding_length=12), ModelDrafter(draft)]))
    results = engine.generate(prompts, max_new_tokens=[20, 30, 25])
    assert [r.token_ids for r in results] == [plain_greedy(model, p, n) for p, n in zip(prompts, (20, 30, 25))]


# --- the tree and the draft cache -------------------------------------------------


def test_tree_shape_follows_widths_and_budget():
    assert tree_shape((1, 1, 3, 1), 100, 4) == [-1, 0, 1, 1, 1, 2, 3, 4]
    assert tree_shape((2, 2), 100, 2) == [-1, -1, 0, 0, 1, 1]
    assert tree_shape((2, 2), 3, 2) == [-1, -1, 0]
    assert tree_shape((2, 2), 100, 1) == [-1, -1]


def from_scratch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3"])
def test_children_are_the_drafts_top_k_and_one_forward_per_depth(arch):
    draft = tiny_model(arch, seed=1)
    widths = (2, 3, 1, 2)
    drafter = ModelDrafter(draft, widths=widths, min_score=0.0)
    prompt = repetitive_prompt(7, length=20)
    session = drafter.begin(prompt)
    calls = []
    hook = draft.register_forward_hook(lambda *args: calls.append(1))
    try:
        tree = session.propose(max_nodes=100, max_depth=10)
    finally:
        hook.remove()
    assert len(calls) == len(widths)  # one forward per depth (the last level is not fed)
    assert len(tree) == 2 + 6 + 6 + 12 and tree.depth == 4 and tree.draft_probs is None
    for node in [-1] + list(range(len(tree))):
        kids = tree.children[node]
        if not kids:
            continue
        path = [tree.tokens[i] for i in tree.path(node)]
        logits = from_scratch_logits(draft, prompt + path)
        assert [tree.tokens[c] for c in kids] == logits.topk(len(kids)).indices.tolist()
        # scores: the product of draft probabilities along the path
        probs = torch.softmax(logits, -1)
        parent_score = 1.0 if node < 0 else tree.scores[node]
        for c in kids:
            assert tree.scores[c] == pytest.approx(parent_score * float(probs[tree.tokens[c]]), rel=1e-4)


def cache_keys(cache, length):
    return [layer.keys[:, :, :length] for layer in cache.layers]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_draft_cache_follows_the_accepted_path(arch):
    draft = tiny_model(arch, seed=2)
    prompt = repetitive_prompt(3)
    session = ModelDrafter(draft, widths=(2, 2, 1, 1), min_score=0.0).begin(prompt)
    seq = list(prompt)
    rng = random.Random(0)
    for step in range(8):
        tree = session.propose(max_nodes=50, max_depth=4)
        # accept a random path of the tree (as a verifier might), then a bonus token
        node, accepted = -1, []
        while tree.children[node] and rng.random() < 0.8:
            node = rng.choice(tree.children[node])
            accepted.append(tree.tokens[node])
        new = accepted + [rng.randrange(1, EOS)]
        session.learn(new)
        seq += new
        # committed = cached + pending, and the cache is exactly a from-scratch cache of it
        assert session.past + len(session.pending) == len(seq)
        assert session.cache.get_seq_length() == session.past
        assert len(session.pending) >= 1
        fresh = DynamicCache()
        with torch.no_grad():
            draft(torch.tensor([seq[: session.past]]), **with_cache(draft, fresh))
        for got, want in zip(cache_keys(session.cache, session.past), cache_keys(fresh, session.past)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # and the next draft's logits are a from-scratch forward's
    session.propose(max_nodes=50, max_depth=4)
    torch.testing.assert_close(session.root_logits, from_scratch_logits(draft, seq), rtol=1e-4, atol=1e-4)
    assert session.cache.get_seq_length() > session.past  # the tree's nodes, until learn()
    session.propose(max_nodes=50, max_depth=4)  # proposing again without learning drops them first
    assert session.cache.get_seq_length() == session.past + len(session.slot)
    session.end()


def test_an_unsure_draft_stops_early():
    draft = tiny_model("llama")
    calls = []
    drafter = ModelDrafter(draft, min_score=1.0)
    hook = draft.register_forward_hook(lambda *args: calls.append(1))
    try:
        tree = drafter.begin([1, 2, 3]).propose(max_nodes=100, max_depth=8)
    finally:
        hook.remove()
    assert tree.depth == 1 and len(calls) == 1  # no node is certain: nothing is expanded
    full = ModelDrafter(draft, min_score=0.0).begin([1, 2, 3]).propose(max_nodes=100, max_depth=8)
    some = ModelDrafter(draft, min_score=0.05).begin([1, 2, 3]).propose(max_nodes=100, max_depth=8)
    assert len(full) == 20 and len(some) < 20 and all(some.scores[p] >= 0.05 for p in some.parents if p >= 0)


def test_depth_is_capped_by_max_depth_and_budget():
    draft = tiny_model("llama")
    session = ModelDrafter(draft).begin([1, 2, 3])
    assert session.propose(max_nodes=100, max_depth=0) == TokenTree()
    tree = session.propose(max_nodes=4, max_depth=3)
    assert len(tree) <= 4 and tree.depth <= 3


# --- sampling: real q from a tiny draft model, exact law ----------------------------

V8 = 8
PROMPT = [1, 2, 3, 1, 2]
SETTINGS = dict(do_sample=True, temperature=0.8, top_k=5, repetition_penalty=1.3)


def small_model(seed):
    model = make_model("llama", seed=seed)
    model.config.vocab_size = V8
    model.resize_token_embeddings(V8)
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def pair():
    """A target, a different draft model, and the target's raw logits for every
    continuation of PROMPT up to 2 tokens."""
    target, draft = small_model(5), small_model(11)
    contexts = [()] + [(a,) for a in range(V8)] + [(a, b) for a in range(V8) for b in range(V8)]
    table = {}
    with torch.no_grad():
        for ctx in contexts:
            table[ctx] = target(torch.tensor([PROMPT + list(ctx)])).logits[0, -1].float()
    return target, draft, table


def draw_sampled(target, table, make_session, n, seed, verifier=verify_sampling):
    """n samples of the first two tokens: one verification of a fresh draft tree, then
    plain sampling from the target's processed law for what is missing."""
    settings = sampling_settings(target.generation_config, seed=seed, **SETTINGS)
    g = torch.Generator().manual_seed(seed)
    session = make_session(settings)
    counts = {}
    for _ in range(n):
        tree = session.propose(max_nodes=50, max_depth=2)
        logits = torch.stack([table[()]] + [table[tuple(tree.tokens[j] for j in tree.path(i))] for i in range(len(tree))])
        tokens = verifier(tree, TreeScores(logits, tree, PROMPT, settings.processors), g).tokens[:2]
        if len(tokens) < 2:
            tail = TreeScores(table[tuple(tokens)][None], TokenTree(), PROMPT + tokens, settings.processors).probs(0)
            tokens.append(int(torch.multinomial(tail, 1, generator=g)))
        counts[tuple(tokens)] = counts.get(tuple(tokens), 0) + 1
    return counts


class SoftmaxOnTopK:
    """The bug the drafter must not have: top-k picks labelled with the draft's softmax,
    as if they had been drawn from it."""

    def __init__(self, drafter, settings):
        self.tree = drafter.begin(PROMPT).propose(50, 2)  # greedy: top-k, the same tree every time
        self.q = {}  # the draft's processed distribution after each context, computed once
        with torch.no_grad():
            for ctx in [()] + [(a,) for a in range(V8)]:
                ids = torch.tensor([PROMPT + list(ctx)])
                logits = drafter.model(ids).logits[0, -1:].float()
                self.q[ctx] = torch.softmax(settings.processors(ids, logits)[0], -1)

    def propose(self, max_nodes, max_depth):
        tree = self.tree
        rows = [self.q[tuple(tree.tokens[j] for j in tree.path(tree.parents[i]))] for i in range(len(tree))]
        return TokenTree(tree.tokens, tree.parents, tree.scores, torch.stack(rows))


N_LAW = 3000


@pytest.mark.slow
def test_sampled_drafts_carry_q_and_are_lossless(pair):
    target, draft, table = pair
    drafter = ModelDrafter(draft, widths=(3, 2), sample=True, min_score=0.3)  # some nodes expanded, some not
    drafter.bind(target)
    session = drafter.begin(PROMPT, sampling=sampling_settings(target.generation_config, seed=0, **SETTINGS))
    tree = session.propose(max_nodes=50, max_depth=2)
    assert tree.draft_probs is not None and tree.draft_probs.shape == (len(tree), V8)
    for i in range(len(tree)):  # siblings without replacement: each q excludes the earlier siblings
        earlier = [tree.tokens[j] for j in tree.children[tree.parents[i]] if j < i]
        assert float(tree.draft_probs[i, earlier].sum()) == 0 and float(tree.draft_probs[i, tree.tokens[i]]) > 0
    assert len(set(tree.tokens[j] for j in tree.children[-1])) == len(tree.children[-1])

    counts = draw_sampled(target, table, lambda s: drafter.begin(PROMPT, sampling=s), N_LAW, seed=1)
    law = {k: p for k, p in processed_law(target, PROMPT, 0.8, 5, 1.3).items() if p > 0}
    assert set(counts) <= set(law)
    assert chi_square_p_value(counts, law, N_LAW) > 1e-3
    assert max_z(counts, law, N_LAW, length=2) < 4.5


def test_the_law_test_catches_softmax_q_on_top_k_picks(pair):
    target, draft, table = pair
    drafter = ModelDrafter(draft, widths=(3, 2))
    counts = draw_sampled(target, table, lambda s: SoftmaxOnTopK(drafter, s), N_LAW, seed=1)
    law = {k: p for k, p in processed_law(target, PROMPT, 0.8, 5, 1.3).items() if p > 0}
    assert chi_square_p_value(counts, law, N_LAW) < 1e-6


@pytest.mark.slow
def test_hybrid_trees_under_sampling_are_lossless(pair):
    target, draft, table = pair
    trie_tree = TokenTree((0, 1, 2, 3), (-1, -1, 0, 1), (0.9, 0.6, 0.8, 0.5))  # deterministic drafts
    drafter = MergedDrafter([ScriptedDrafter(lambda seq: trie_tree), ModelDrafter(draft, widths=(3, 2), sample=True)],
                            decoding_length=8)
    drafter.bind(target)
    session = drafter.begin(PROMPT, sampling=sampling_settings(target.generation_config, seed=0, **SETTINGS))
    merged = session.propose(max_nodes=50, max_depth=2)
    assert merged.draft_probs is None and len(merged) <= 8  # two sources: one-hot, within budget
    assert set(trie_tree.tokens[:2]) <= {merged.tokens[c] for c in merged.children[-1]}

    counts = draw_sampled(target, table, lambda s: drafter.begin(PROMPT, sampling=s), N_LAW, seed=2)
    law = {k: p for k, p in processed_law(target, PROMPT, 0.8, 5, 1.3).items() if p > 0}
    assert chi_square_p_value(counts, law, N_LAW) > 1e-3
    assert max_z(counts, law, N_LAW, length=2) < 4.5


@pytest.mark.slow
def test_engine_samples_the_model_law_with_a_sampling_drafter(pair):
    target, draft, _ = pair
    engine = Engine(target, drafter=ModelDrafter(draft, widths=(3, 2), sample=True))
    g = torch.Generator().manual_seed(0)
    n, counts = 1000, {}
    for _ in range(n):
        result = engine.generate(PROMPT, max_new_tokens=2, generator=g, **SETTINGS)
        counts[tuple(result.token_ids)] = counts.get(tuple(result.token_ids), 0) + 1
    law = {k: p for k, p in processed_law(target, PROMPT, 0.8, 5, 1.3).items() if p > 0}
    assert set(counts) <= set(law)
    assert chi_square_p_value(counts, law, n) > 1e-3


def test_a_self_draft_under_sampling_is_always_accepted():
    # q equals p exactly (same model, same processors): multi-step sampling accepts every draft
    model = small_model(5)
    engine = Engine(model, drafter=ModelDrafter(model, widths=(2, 1, 1), sample=True, min_score=0), adaptive=False)
    result = engine.generate(PROMPT, max_new_tokens=20, seed=3, do_sample=True, temperature=0.9)
    assert result.stats.tokens_per_step[:-1] == [4] * (len(result.stats.tokens_per_step) - 1)


# --- merging --------------------------------------------------------------------


def test_merge_shares_prefixes_keeps_max_scores_and_respects_the_budget():
    a = TokenTree((5, 6, 7), (-1, 0, 1), (0.9, 0.8, 0.7))
    b = TokenTree((5, 9, 6, 4), (-1, -1, 0, 2), (0.3, 0.6, 0.85, 0.2))
    m = merge([a, b], max_nodes=10, max_depth=10)
    paths = {tuple(m.tokens[j] for j in m.path(i)): m.scores[i] for i in range(len(m))}
    assert paths == {(5,): 0.9, (5, 6): 0.85, (5, 6, 7): 0.7, (9,): 0.6, (5, 6, 4): 0.2}
    cut = merge([a, b], max_nodes=3, max_depth=10)
    assert [cut.tokens[j] for j in cut.path(len(cut) - 1)] == [5, 6, 7]  # the confident span first
    shallow = merge([a, b], max_nodes=10, max_depth=1)
    assert sorted(shallow.tokens) == [5, 9]


def test_confident_first_tree_comes_before_higher_model_scores():
    trie = TokenTree((1, 2, 3), (-1, 0, 1), (0.6, 0.6, 0.6))
    model = TokenTree((4, 5), (-1, 0), (0.95, 0.9))
    m = merge([trie, model], max_nodes=4, max_depth=8)
    assert m.tokens[:3] == (1, 2, 3) and m.tokens[3] == 4
    assert merge([trie, model], max_nodes=4, max_depth=8, confident=0.7).tokens == (1, 2, 4, 5)


def test_merge_keeps_q_only_for_a_single_source():
    q = torch.softmax(torch.randn(2, 8), -1)
    sampled = TokenTree((1, 2), (-1, 0), (0.5, 0.2), q)
    assert merge([TokenTree(), sampled], 10, 10).draft_probs is q
    assert merge([TokenTree((3,), (-1,), (0.9,)), sampled], 10, 10).draft_probs is None


def test_hybrid_skips_the_model_when_the_trie_fills_the_budget():
    model = tiny_model("llama")
    calls = []
    drafter = MergedDrafter([ScriptedDrafter(lambda seq: TokenTree.chain([1, 2, 3, 4])), ModelDrafter(model)],
                            decoding_length=4)
    session = drafter.begin([1, 2, 3])
    hook = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        assert session.propose(4, 8).tokens == (1, 2, 3, 4)  # scores None count as certain
        assert not calls
    finally:
        hook.remove()


# --- vocabulary check, loading, command line ------------------------------------


def test_a_draft_with_another_vocabulary_is_refused():
    target = tiny_model("llama")
    other = make_model("llama")
    other.resize_token_embeddings(VOCAB + 8)
    with pytest.raises(ValueError, match="vocabulary"):
        Engine(target, drafter=ModelDrafter(other))
    with pytest.raises(ValueError, match="vocabulary"):
        Engine(target, drafter=MergedDrafter([TrieDrafter(), ModelDrafter(other)]))


def word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[1]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=words[1], eos_token=words[EOS])


WORDS = ["<s>", "<unk>"] + [f"w{i}" for i in range(2, EOS)] + ["</s>"]


def test_a_draft_with_another_tokenizer_is_refused():
    target, draft = tiny_model("llama"), tiny_model("qwen2")
    same, shuffled = word_tokenizer(WORDS), word_tokenizer(WORDS[:2] + WORDS[3:4] + WORDS[2:3] + WORDS[4:])
    Engine(target, word_tokenizer(WORDS), drafter=ModelDrafter(draft, tokenizer=same))
    with pytest.raises(ValueError, match="different tokenizer"):
        Engine(target, word_tokenizer(WORDS), drafter=ModelDrafter(draft, tokenizer=shuffled))


@pytest.mark.parametrize("bad", [dict(widths=()), dict(widths=(2, 0)), dict(max_nodes=0), dict(min_score=2.0)])
def test_bad_model_drafter_settings(bad):
    with pytest.raises(ValueError):
        ModelDrafter(tiny_model("llama"), **bad)


@pytest.fixture(scope="module")
def saved_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for name, arch, seed in (("target", "llama", 0), ("draft", "llama", 4), ("odd", "llama", 4)):
        model = make_model(arch, seed)
        words = WORDS if name != "odd" else WORDS[:2] + WORDS[3:4] + WORDS[2:3] + WORDS[4:]
        model.save_pretrained(root / name)
        word_tokenizer(words).save_pretrained(root / name)
    return root


def test_from_pretrained_builds_each_drafter(saved_pair):
    target = str(saved_pair / "target")
    draft = str(saved_pair / "draft")
    prompt = repetitive_prompt(1)
    expected = plain_greedy(tiny_model("llama"), prompt, 30)
    hybrid = Engine.from_pretrained(target, dtype="float32", draft_model=draft, decoding_length=16)
    assert isinstance(hybrid.drafter, MergedDrafter) and hybrid.drafter.decoding_length == 16
    several = Engine.from_pretrained(target, dtype="float32", draft_model=[draft, target], drafter="model")
    assert [type(d) for d in several.drafter.drafters] == [ModelDrafter, ModelDrafter]
    for engine in (hybrid, several):
        assert engine.generate(prompt, max_new_tokens=30).token_ids == expected
    with pytest.raises(ValueError, match="different tokenizer"):
        Engine.from_pretrained(target, draft_model=str(saved_pair / "odd"), drafter="model")


@pytest.mark.parametrize("bad", [dict(drafter="model"), dict(drafter="hybrid"), dict(drafter="beam"),
                                 dict(drafter="trie", draft_model="x"), dict(drafter="model", draft_model="x",
                                                                             decoding_length=8)])
def test_from_pretrained_refuses_bad_drafter_settings(bad, saved_pair, monkeypatch):
    def no_loading(*args, **kwargs):  # refused before any model is loaded (a hub id would be fetched)
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("triespec.loading.load", no_loading)
    with pytest.raises(ValueError):
        Engine.from_pretrained(str(saved_pair / "target"), **bad)


def test_cli_draft_model(saved_pair, capsys):
    from triespec.cli import main

    target, draft = str(saved_pair / "target"), str(saved_pair / "draft")
    prompt = " ".join(WORDS[t] for t in repetitive_prompt(1))
    for drafter in ("model", "hybrid"):
        assert main(["generate", "--model", target, "--draft-model", draft, "--drafter", drafter, "--raw", "--json",
                     "--max-new-tokens", "20", prompt]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["token_ids"] == plain_greedy(tiny_model("llama"), repetitive_prompt(1), 20)
    assert main(["generate", "--model", target, "--drafter", "model", "--raw", prompt]) == 2
    assert "needs a draft model" in capsys.readouterr().err
