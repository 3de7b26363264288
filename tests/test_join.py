"""Rows join a running batch between steps, and leave it when cancelled: each row's
output is still exactly what it would be alone."""

import random

import pytest

from conftest import EOS, make_model, plain_greedy, repetitive_prompt, tiny_model
from triespec import Engine
from triespec.engine import Batch


def prompts_and_limits(seed: int):
    rng = random.Random(seed)
    prompts = [repetitive_prompt(seed, 30), [rng.randrange(1, EOS) for _ in range(5)],
               repetitive_prompt(seed + 1, 40), [rng.randrange(1, EOS)], repetitive_prompt(seed + 2, 12)]
    return prompts, [30, 12, 26, 35, 20]


def run_with_joins(engine, rows, join_at: list[int]):
    """Row i joins before step join_at[i] (0: from the start); steps until all are done."""
    batch = Batch(engine, [r for r, at in zip(rows, join_at) if at == 0])
    step, sizes = 0, []
    while True:
        step += 1
        for row, at in zip(rows, join_at):
            if at == step:
                batch.add(row)
        if not len(batch) and step > max(join_at):
            break
        sizes.append(len(batch))
        batch.step()
    return sizes


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3", "gpt2", "qwen2"])
def test_rows_joining_mid_run_equal_plain_greedy(arch):
    model = tiny_model(arch)
    prompts, limits = prompts_and_limits(5)
    expected = [plain_greedy(model, p, n) for p, n in zip(prompts, limits)]
    engine = Engine(model, adaptive=False, decoding_length=12, branch_length=5)
    for _ in range(2):  # the second round drafts from memory: long accepted paths, rows at other widths
        rows = [engine.row(p, n) for p, n in zip(prompts, limits)]
        sizes = run_with_joins(engine, rows, join_at=[0, 3, 4, 9, 25])
        assert [r.result().token_ids for r in rows] == expected
        assert all(r.finish in ("length", "stop") for r in rows)
        assert max(sizes) >= 3  # rows really ran side by side
    assert max(max(r.stats.tokens_per_step) for r in rows) > 1


def test_row_joining_an_emptied_batch_starts_a_fresh_cache():
    model = tiny_model("llama")
    prompts, limits = prompts_and_limits(6)
    engine = Engine(model, adaptive=False, decoding_length=8)
    rows = [engine.row(prompts[0], 3), engine.row(prompts[2], 10)]
    run_with_joins(engine, rows, join_at=[0, 8])  # the first row is gone by step 8
    assert rows[1].result().token_ids == plain_greedy(model, prompts[2], 10)


def test_sampled_row_joining_mid_run_equals_its_single_run():
    model = make_model("llama", seed=4)
    prompts, limits = prompts_and_limits(7)
    engine = Engine(model, adaptive=False, decoding_length=8)
    settings = dict(do_sample=True, temperature=0.8, seed=11)
    alone = [engine.generate(p, max_new_tokens=n, **settings).token_ids for p, n in zip(prompts, limits)]
    rows = [engine.row(p, n, **settings) for p, n in zip(prompts, limits)]
    run_with_joins(engine, rows, join_at=[0, 2, 2, 5, 7])
    assert [r.result().token_ids for r in rows] == alone


def test_cancelled_row_leaves_at_the_next_step():
    model = tiny_model("mistral")
    prompts, limits = prompts_and_limits(8)
    engine = Engine(model, adaptive=False, decoding_length=8, branch_length=4)
    rows = [engine.row(p, 30) for p in prompts[:3]]
    batch = Batch(engine, rows)
    for _ in range(3):
        batch.step()
    gone = rows[1]
    batch.cancel(gone)
    produced = len(gone.out)
    step = batch.step()
    assert gone not in [row for row, _ in step] and gone not in batch.active
    assert gone.finish == "abort" and len(gone.out) == produced and gone.session is None
    assert len(batch) == 2
    while len(batch):
        batch.step()
    assert gone.out == plain_greedy(model, prompts[1], 30)[:produced]
    for i in (0, 2):
        assert rows[i].result().token_ids == plain_greedy(model, prompts[i], 30)


def test_only_new_rows_join():
    engine = Engine(tiny_model("llama"))
    row = engine.row([1, 2, 3], 4)
    batch = Batch(engine, [row])
    with pytest.raises(ValueError, match="only a new row"):
        batch.add(row)
    batch.step()
    with pytest.raises(ValueError, match="only a new row"):
        Batch(engine).add(row)
