"""The memory trie saved to disk and loaded back: same counts, refused when foreign or corrupt."""

import json
import random

import numpy as np
import pytest

from conftest import plain_greedy, repetitive_prompt, tiny_model
from triespec import Engine, Trie
from triespec.drafters.trie import NgramStream
from triespec.persist import fingerprint, flatten, load_trie, save_trie, warm

FP = fingerprint(None, 96)


def filled_trie(seed: int = 0, max_nodes=None) -> Trie:
    rng = random.Random(seed)
    trie = Trie(max_nodes)
    for _ in range(20):
        NgramStream(trie, 6).feed([rng.randrange(12) for _ in range(rng.randrange(1, 40))])
    return trie


def as_dict(trie: Trie) -> dict:
    out, stack = {}, [((), trie.root)]
    while stack:
        path, node = stack.pop()
        for token, child in (node.children or {}).items():
            out[path + (token,)] = child.count
            stack.append((path + (token,), child))
    return out


def test_round_trip_keeps_every_count(tmp_path):
    trie = filled_trie()
    size = save_trie(trie, tmp_path / "t.npz", FP)
    assert size == (tmp_path / "t.npz").stat().st_size > 0
    loaded = load_trie(tmp_path / "t.npz", FP)
    loaded.check()
    assert len(loaded) == len(trie) > 100
    assert as_dict(loaded) == as_dict(trie)
    assert [p.tolist() for p in flatten(loaded)] == [p.tolist() for p in flatten(trie)]


def test_empty_trie_round_trips(tmp_path):
    save_trie(Trie(), tmp_path / "t.npz", FP)
    assert len(load_trie(tmp_path / "t.npz", FP)) == 0


def test_load_honours_a_smaller_budget(tmp_path):
    trie = filled_trie()
    save_trie(trie, tmp_path / "t.npz", FP)
    loaded = load_trie(tmp_path / "t.npz", FP, max_nodes=len(trie) // 3)
    loaded.check()
    assert 0 < len(loaded) <= len(trie) // 3


def test_foreign_tokenizer_is_refused(tmp_path):
    save_trie(filled_trie(), tmp_path / "t.npz", FP)
    with pytest.raises(ValueError, match="another tokenizer"):
        load_trie(tmp_path / "t.npz", fingerprint(None, 97))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "pickle", "no_header", "bad_parent", "outcount",
                                    "version", "duplicate"])
def test_corrupt_or_foreign_files_raise_value_error(tmp_path, damage):
    path = tmp_path / "t.npz"
    save_trie(filled_trie(), path, FP)
    parent, token, count = flatten(filled_trie())
    header = {"magic": "triespec-trie", "version": 1, "fingerprint": FP}
    if damage == "garbage":
        path.write_bytes(b"not a zip file at all")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "pickle":  # an object array would need pickle to load: refused, never run
        np.savez(path, header=np.array([{"magic": "triespec-trie"}], dtype=object), parent=parent)
    elif damage == "no_header":
        np.savez(path, parent=parent, token=token, count=count)
    else:
        if damage == "bad_parent":
            parent = parent.copy()
            parent[0] = 5
        elif damage == "outcount":
            count = count.copy()
            count[np.flatnonzero(parent >= 0)[0]] = 10**6
        elif damage == "version":
            header["version"] = 99
        elif damage == "duplicate":
            token = token.copy()
            token[1] = token[0]
        np.savez(path, header=np.array(json.dumps(header)), parent=parent, token=token, count=count)
    with pytest.raises(ValueError, match="version 99" if damage == "version" else "t.npz"):
        load_trie(path, FP)


def test_failed_save_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "t.npz"
    save_trie(filled_trie(0), path, FP)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez_compressed", crash)
    with pytest.raises(OSError, match="disk full"):
        save_trie(filled_trie(1), path, FP)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.npz"]  # no temporary file left behind


def test_loaded_memory_drafts_like_the_one_that_learned(tmp_path):
    model = tiny_model("llama")
    prompt = repetitive_prompt(3, 30)
    first = Engine(model, adaptive=False, decoding_length=16, branch_length=8)
    cold = first.generate(prompt, max_new_tokens=40)
    save_trie(first.drafter.memory, tmp_path / "t.npz", FP)
    second = Engine(model, adaptive=False, decoding_length=16, branch_length=8)
    second.drafter.memory = load_trie(tmp_path / "t.npz", FP)
    warm_run = second.generate(prompt, max_new_tokens=40)
    assert warm_run.token_ids == cold.token_ids == plain_greedy(model, prompt, 40)
    assert warm_run.stats.steps < cold.stats.steps


@pytest.mark.slow
def test_warm_from_jsonl_drafts_the_answers(tmp_path):
    from triespec.loading import default_model_path

    engine = Engine.from_pretrained(default_model_path(), dtype="float32", decoding_length=16)
    messages = [{"role": "user", "content": "List the first five prime numbers."}]
    cold = engine.generate(messages, max_new_tokens=24)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join([
        json.dumps({"messages": messages + [{"role": "assistant", "content": cold.text}]}),
        json.dumps({"prompt": "Hello", "completion": " world"}),
        "",
        json.dumps({"text": "free text is learned too"}),
    ]))
    fresh = Engine(engine.model, engine.tokenizer, decoding_length=16, adaptive=False)  # what warm holds, all verified
    assert warm(fresh, corpus) == 3
    again = fresh.generate(messages, max_new_tokens=24)
    assert again.token_ids == cold.token_ids
    assert again.stats.steps < cold.stats.steps / 2
    corpus.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="line 1"):
        warm(fresh, corpus)
    assert fingerprint(engine.tokenizer, engine.vocab_size) != fingerprint(None, engine.vocab_size)


def test_the_budget_calibration_is_saved_with_the_trie(tmp_path):
    from triespec.budget import Calibration
    from triespec.tree import MODEL, TRIE
    from triespec.persist import load_calibration, write_arrays

    learned = Calibration()
    for p, accepted in [(0.9, True), (0.9, False), (0.5, True), (0.9, True)]:
        learned.observe(p, accepted)
    learned.observe(0.9, False, kind=MODEL)
    write_arrays(flatten(filled_trie()), tmp_path / "t.npz", FP, calibration=learned.state())
    restored = Calibration()
    restored.restore(load_calibration(tmp_path / "t.npz"))
    cells = [(p, kind) for p in (0.5, 0.9) for kind in (TRIE, MODEL)]
    assert [restored.rate(p, kind) for p, kind in cells] == [learned.rate(p, kind) for p, kind in cells]
    assert restored.rate(0.9) != Calibration().rate(0.9)
    assert len(load_trie(tmp_path / "t.npz", FP)) == len(filled_trie())

    save_trie(filled_trie(), tmp_path / "bare.npz", FP)  # saved without one
    assert load_calibration(tmp_path / "bare.npz") is None
    for bad in (learned.state()[:-1], -learned.state(), np.full_like(learned.state(), np.nan)):
        with pytest.raises(ValueError, match="calibration"):
            Calibration().restore(bad)


def test_the_vocabulary_fingerprint_is_hashed_once_per_tokenizer_until_tokens_are_added():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(50)} | {"[UNK]": 50}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")))
    read = []
    get_vocab = tokenizer.get_vocab
    tokenizer.get_vocab = lambda: read.append(1) or get_vocab()
    first = fingerprint(tokenizer, 51)
    assert fingerprint(tokenizer, 51) == first and len(read) == 1  # hashed once
    tokenizer.add_tokens(["brand-new"])
    assert fingerprint(tokenizer, 52).split(":")[1] != first.split(":")[1] and len(read) == 2
