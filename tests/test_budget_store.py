"""The adaptive budget kept on disk: a second engine times nothing, damaged or foreign
files are ignored, writes are atomic, and nothing is written when it is off."""

import json
import os

import pytest

from conftest import make_model, plain_greedy, repetitive_prompt, tiny_model
from triespec import Engine
from triespec.budget import Calibration, CostModel
from triespec.budget_store import BudgetStore, budget_key, default_directory
from triespec.cli import _budget_cache, build_parser


def a_curve() -> CostModel:
    return CostModel([1, 2, 3, 4], [0.25, 0.5, 0.625, 0.75], context=64, per_context=(1e-5, 2e-6),
                     confirmed=[True, True, False, True], stepped=[True, False, False, True])


def learned() -> Calibration:
    calibration = Calibration()
    for p, ok in [(0.9, True), (0.9, False), (0.5, True), (0.2, True)]:
        calibration.observe(p, ok)
    return calibration


def test_the_store_round_trips_the_curve_and_the_calibration(tmp_path):
    model = tiny_model("llama")
    BudgetStore.open(tmp_path, model, None, 4).save(a_curve(), learned())
    cost, calibration = BudgetStore.open(tmp_path, model, None, 4).load()  # a store of the same key
    saved = a_curve()
    assert (cost.sizes, cost.seconds, cost.confirmed) == (saved.sizes, saved.seconds, saved.confirmed)
    assert cost.stepped == saved.stepped
    assert (cost.context, cost.per_context) == (saved.context, saved.per_context)
    assert calibration.state().tolist() == learned().state().tolist()
    data = json.loads(next(tmp_path.iterdir()).read_text())
    assert data["key"] == budget_key(model, None, 4)  # the full key, compared on loading
    assert BudgetStore.open(tmp_path, model, None, 8).load() is None  # another decoding length: nothing saved


def test_a_second_engine_starts_from_the_first_ones_budget_without_timing(tmp_path, monkeypatch):
    prompt = repetitive_prompt(1)
    first = Engine(make_model("llama"), decoding_length=8, branch_length=4, budget_cache=tmp_path)
    first.generate(prompt, max_new_tokens=24)
    # the budget, and in kernels/ which kernels "auto" chose
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == [first.budget_store.path.name]
    assert len(list((tmp_path / "kernels").iterdir())) == 1

    def no_timing(*args, **kwargs):
        raise AssertionError("the saved budget should have been used")

    monkeypatch.setattr(CostModel, "measure", no_timing)
    model = make_model("llama")  # another object of the same model: not in the process's own cache
    second = Engine(model, decoding_length=8, branch_length=4, budget_cache=tmp_path)
    assert second.budget.cost is not first.budget.cost
    before, after = first.budget.cost, second.budget.cost
    assert (after.seconds, after.confirmed) == (before.seconds, before.confirmed)
    assert second.budget.calibration.state().tolist() == first.budget.calibration.state().tolist()
    assert second.generate(prompt, max_new_tokens=24).token_ids == plain_greedy(model, prompt, 24)


def test_the_default_folder(budget_cache, monkeypatch, tmp_path):
    engine = Engine(make_model("llama"), decoding_length=8)
    engine.generate([1, 2, 3], max_new_tokens=4)
    assert engine.budget_store.path.parent == budget_cache and engine.budget_store.path.exists()
    monkeypatch.delenv("TRIESPEC_BUDGET_CACHE")
    monkeypatch.setenv("TRIESPEC_CACHE", str(tmp_path))
    assert default_directory() == tmp_path / "budget"


def damaged(path, damage: str) -> None:
    data = json.loads(path.read_text())
    if damage == "garbage":
        path.write_bytes(b"\x00\xff not json")
        return
    if damage == "truncated":
        path.write_text(path.read_text()[:40])
        return
    if damage == "version":
        data["version"] = 99
    elif damage == "key":
        data["key"]["threads"] += 1  # the same file name, made on another machine
    elif damage == "curve":
        data["curve"]["seconds"][0] = -1.0
    elif damage == "calibration":
        data["calibration"] = data["calibration"][:-3]
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "version", "key", "curve", "calibration"])
def test_a_damaged_or_foreign_file_is_ignored_with_a_warning_and_measured_again(tmp_path, monkeypatch, damage):
    prompt = repetitive_prompt(2)
    first = Engine(make_model("llama"), decoding_length=8, budget_cache=tmp_path)
    first.generate(prompt, max_new_tokens=8)
    path = first.budget_store.path
    damaged(path, damage)
    timings, measure = [], CostModel.measure

    def counted(*args, **kwargs):
        timings.append(args)
        return measure(*args, **kwargs)

    monkeypatch.setattr(CostModel, "measure", counted)
    model = make_model("llama")
    with pytest.warns(RuntimeWarning, match="ignoring the saved budget"):
        engine = Engine(model, decoding_length=8, budget_cache=tmp_path)
    assert len(timings) == 1
    assert engine.generate(prompt, max_new_tokens=8).token_ids == plain_greedy(model, prompt, 8)
    assert engine.budget_store.load() is not None  # written over with a good one


def test_a_save_leaves_no_temporary_file_and_a_failed_one_the_old_file(tmp_path, monkeypatch):
    store = BudgetStore.open(tmp_path, tiny_model("llama"), None, 4)
    store.save(a_curve(), Calibration())
    before = store.path.read_bytes()
    store.save(a_curve(), learned())
    assert [p.name for p in tmp_path.iterdir()] == [store.path.name]
    assert store.path.read_bytes() != before

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    before = store.path.read_bytes()
    with pytest.warns(RuntimeWarning, match="could not be saved"):
        store.save(a_curve(), Calibration())
    store.save(a_curve(), Calibration())  # warned once; a generation never fails on it
    assert [p.name for p in tmp_path.iterdir()] == [store.path.name] and store.path.read_bytes() == before


@pytest.mark.parametrize("off", [False, None])
def test_no_budget_cache_writes_nothing(budget_cache, off):
    engine = Engine(make_model("llama"), decoding_length=8, budget_cache=off)
    engine.generate(repetitive_prompt(3), max_new_tokens=8)
    assert engine.budget_store is None and list(budget_cache.iterdir()) == []


@pytest.mark.parametrize("bad", [3, "", ["dir"]])
def test_a_bad_budget_cache_is_refused(bad):
    with pytest.raises(ValueError, match="budget_cache"):
        Engine(tiny_model("llama"), budget_cache=bad)
    with pytest.raises(ValueError, match="budget_cache"):
        Engine(tiny_model("llama"), budget_cache=bad, adaptive=False)


def test_the_command_line_flags():
    parse = build_parser().parse_args
    assert _budget_cache(parse(["generate", "hi"])) is True
    assert _budget_cache(parse(["generate", "--no-budget-cache", "hi"])) is False
    assert _budget_cache(parse(["serve", "--budget-cache", "/tmp/b"])) == "/tmp/b"
    with pytest.raises(SystemExit):
        parse(["generate", "--budget-cache", "/tmp/b", "--no-budget-cache", "hi"])


def test_a_curve_saved_without_steps_kept_has_every_size_shown_again(tmp_path):
    # files written before the curve kept which sizes real steps have shown
    model = tiny_model("llama")
    store = BudgetStore.open(tmp_path, model, None, 4)
    store.save(a_curve(), learned())
    data = json.loads(store.path.read_text())
    del data["curve"]["stepped"]
    store.path.write_text(json.dumps(data))
    cost, _ = store.load()
    assert cost.confirmed == a_curve().confirmed and cost.stepped == [False] * 4
