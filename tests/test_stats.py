"""Bootstrap intervals over tasks and the comparisons the results page marks as real."""

import numpy as np
import pytest

from test_bench import _fake_results
from triespec.bench import harness, report
from triespec.bench.stats import ratio_interval


def test_the_interval_holds_the_figure_and_narrows_with_more_tasks():
    rng = np.random.default_rng(1)

    def tasks(n):  # a method 1.5x plain, tasks of various lengths and a 20% spread
        tokens = rng.integers(50, 150, n).astype(float)
        plain_seconds = tokens / 10 * rng.uniform(0.8, 1.2, n)
        return (tokens, plain_seconds / 1.5 * rng.uniform(0.8, 1.2, n)), (tokens, plain_seconds)

    few, many = ratio_interval(*tasks(5)), ratio_interval(*tasks(200))
    for i in (few, many):
        assert i.low <= i.value <= i.high
    assert many.high - many.low < (few.high - few.low) / 3
    assert many.low < 1.5 < many.high and many.real
    assert ratio_interval(*tasks(5)) != ratio_interval(*tasks(5))  # other tasks, other interval
    same = tasks(8)
    assert ratio_interval(*same) == ratio_interval(*same)  # seeded: a report can be rebuilt


def test_a_difference_within_the_spread_of_tasks_is_not_real():
    # one task much faster, one much slower: the aggregate is above 1, the tasks do not agree
    i = ratio_interval(([100, 100], [5, 20]), ([100, 100], [10, 10]))
    assert i.value == pytest.approx(0.8) and i.low < 1 < i.high and not i.real
    with pytest.raises(ValueError):
        ratio_interval(([1], [1]), ([1, 2], [1, 2]))


def _two_tasks():
    results = _fake_results()
    second = [{**r, "task": "qa/1", "seconds": r["seconds"] * 1.1} for r in results["records"]]
    for r in results["records"] + second:
        r["forward_seconds"] = [1.0] * len(r["fed"])
    results["records"] += second
    results["records"] += [{**r, "method": "prompt-lookup", "seconds": r["seconds"] * 2}
                           for r in results["records"] if r["method"] == "trie"]
    results["config"]["methods"].append("prompt-lookup")
    results["summary"] = harness.summarise(results)
    return results


def test_each_speedup_gets_an_interval_and_triespec_is_compared_with_each_peer():
    results = _two_tasks()
    row = results["summary"]["qa"]["trie"]
    value, low, high = row["speedup_interval"]
    assert value == pytest.approx(row["speedup"], abs=1e-3) and low <= value <= high
    assert row["speedup_modelled_interval"][0] == pytest.approx(row["speedup_modelled"], abs=1e-3)
    rows = harness.comparisons(results, figure="wall")["qa"]
    assert {(c["method"], c["peer"]) for c in rows} == {("trie", "prompt-lookup"), ("trie:warm", "prompt-lookup")}
    trie = next(c for c in rows if c["method"] == "trie")
    assert trie["ratio"][0] == pytest.approx(2.0) and trie["real"]  # twice as fast on every task
    results["comparisons"] = {"qa": rows}
    md = report.markdown(results)
    assert "| trie | prompt-lookup | 2.00× (2.00–2.00) | faster |" in md
    page = next(line for line in report.page_table(results, "qa") if line.startswith("| trie |"))
    modelled = row["speedup_modelled_interval"]
    assert f"{modelled[0]:.2f}× ({modelled[1]:.2f}–{modelled[2]:.2f})" in page and "| 4.00 |" in page
