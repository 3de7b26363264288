"""The benchmark harness: method specs, step accounting, the copy oracle, reports."""

import json

import pytest

from conftest import plain_greedy, repetitive_prompt, tiny_model
from triespec.bench import harness, methods, report
from triespec.cli import main


def test_method_specs():
    spec = methods.parse("trie:parallel:warm:dl=16:bl=6")
    assert (spec.base, spec.warm, spec.adaptive) == ("trie", True, True)  # adaptive is the default
    assert not methods.parse("trie:fixed:dl=8").adaptive
    with pytest.raises(ValueError, match="one of"):
        methods.parse("trie:fixed:adaptive")
    assert spec.drafter == {"mode": "parallel", "decoding_length": 16, "branch_length": 6}
    assert methods.parse("hybrid:adaptive").needs_draft_model
    assert not methods.parse("prompt-lookup").needs_draft_model
    for bad in ["beam", "trie:fast", "trie:dl=0", "trie:dl=x", "plain:warm", "prompt-lookup:0", "prompt-lookup:4:4",
                "suffix:factor=-1", "suffix:depth=1.5"]:
        with pytest.raises(ValueError):
            methods.parse(bad)
    assert methods.parse("prompt-lookup:4").generate == {"prompt_lookup_num_tokens": 4}
    assert methods.parse("trie:ml=2:bl=12").drafter == {"match_length": 2, "branch_length": 12}
    assert methods.parse("suffix:fixed:tree:factor=2:prob=0.2").drafter == {
        "use_tree_spec": True, "max_spec_factor": 2.0, "min_token_prob": 0.2}


def test_a_peer_setting_reaches_transformers():
    """prompt-lookup:N is transformers' prompt_lookup_num_tokens=N: a forward verifies at most N
    candidates after the pending token, and on a repetitive prompt it does verify N."""
    model = tiny_model("llama")
    prompt = repetitive_prompt(3, length=40)
    fed = {n: methods.build(methods.parse(f"prompt-lookup:{n}"), model, None).run(prompt, 30).fed[1:]
           for n in (2, 10)}
    assert max(fed[2]) == 3 and max(fed[10]) == 11


def test_config_checks():
    with pytest.raises(ValueError, match="plain"):
        harness.check(harness.Config(methods=("trie",)))
    with pytest.raises(ValueError, match="draft-model"):
        harness.check(harness.Config(methods=("plain", "assisted")))
    with pytest.raises(ValueError, match="workloads"):
        harness.check(harness.Config(workloads=("poetry",)))
    with pytest.raises(ValueError, match="twice"):
        harness.check(harness.Config(methods=("plain", "trie", "trie")))
    with pytest.raises(ValueError):
        harness.check(harness.Config(n=0))
    # a drafter's setting it does not take is refused before any model is loaded
    with pytest.raises(ValueError, match="min_token_prob"):
        harness.check(harness.Config(methods=("plain", "trie:prob=0.5")))
    with pytest.raises(ValueError, match="match_length"):
        harness.check(harness.Config(methods=("plain", "hybrid:dl=8", "suffix:ml=3"), draft_model="/nowhere"))
    assert [s.name for s in harness.check(harness.Config(methods=("plain", "hybrid:dl=8"), draft_model="/nowhere"))] \
        == ["plain", "hybrid:dl=8"]


@pytest.mark.parametrize("name", ["plain", "prompt-lookup", "prompt-lookup:4", "trie", "trie:fixed",
                                  "trie:fixed:parallel", "suffix", "suffix:fixed", "suffix:fixed:tree", "lookup",
                                  "lookup:fixed"])
def test_step_accounting_matches_output(name):
    """Every method's steps add up to its output, and every output is plain greedy's."""
    model = tiny_model("llama")
    prompt = repetitive_prompt(3, length=40)
    runner = methods.build(methods.parse(name), model, None)
    out = runner.run(prompt, 30)
    assert out.token_ids == plain_greedy(model, prompt, 30)
    assert sum(out.tokens_per_step) == len(out.token_ids)
    assert all(s >= 1 for s in out.tokens_per_step)
    assert len(out.fed) == len(out.tokens_per_step)  # one forward per step, the prefill first
    assert out.fed[0] >= len(prompt)
    if name == "plain":
        assert set(out.tokens_per_step) == {1} and out.fed == [len(prompt)] + [1] * (len(out.fed) - 1)
    elif name in ("trie:fixed", "suffix:fixed"):
        assert max(out.tokens_per_step) > 1  # the repetitive prompt is drafted from
        # each forward feeds the last token and the tree: at least as many as it yields
        assert all(f >= s for f, s in zip(out.fed[1:], out.tokens_per_step[1:])) and max(out.fed[1:]) > 1


@pytest.mark.parametrize("n", [10, 4])
def test_lookup_verified_whole_takes_transformers_prompt_lookup_steps(n):
    """`lookup:fixed:dl=N` is transformers' prompt lookup drafted through our contract: on
    fp32 it takes the very steps `generate(prompt_lookup_num_tokens=N)` takes, so replays
    of recorded outputs can stand in for it."""
    model = tiny_model("llama")
    prompt = repetitive_prompt(3, length=40)
    theirs = methods.build(methods.parse(f"prompt-lookup:{n}"), model, None).run(prompt, 30)
    ours = methods.build(methods.parse(f"lookup:fixed:dl={n}"), model, None).run(prompt, 30)
    assert ours.token_ids == theirs.token_ids
    assert ours.tokens_per_step == theirs.tokens_per_step and ours.fed[0] == theirs.fed[0]
    # each forward feeds the same chain, but the engine never verifies past the last token
    # it may emit, where generate does
    left = [30 - sum(theirs.tokens_per_step[:i]) for i in range(len(theirs.fed))]
    assert ours.fed[1:] == [min(f, r) for f, r in zip(theirs.fed[1:], left[1:])]
    assert max(ours.fed[1:]) > 1 and max(ours.tokens_per_step) > 1


def test_a_method_carries_what_its_budget_learned_to_the_next_workload():
    model = tiny_model("llama")
    first = methods.build(methods.parse("trie"), model, None)
    first.run(repetitive_prompt(3, length=40), 20)
    second = methods.build(methods.parse("trie"), model, None)
    second.carry(first)
    assert second.engine.budget.calibration is first.engine.budget.calibration  # as one server's engine would
    assert len(second.engine.drafter.memory) == 0 < len(first.engine.drafter.memory)  # no answers copied
    fixed = [methods.build(methods.parse("trie:fixed"), model, None) for _ in range(2)]
    fixed[1].carry(fixed[0])
    assert fixed[1].engine.budget is None  # a fixed size has nothing to carry


def test_assisted_steps_count_target_forwards_only():
    model, draft = tiny_model("llama"), tiny_model("llama", seed=1)
    prompt = repetitive_prompt(4, length=40)
    out = methods.build(methods.parse("assisted"), model, None, draft).run(prompt, 24)
    assert out.token_ids == plain_greedy(model, prompt, 24)
    assert sum(out.tokens_per_step) == len(out.token_ids)
    assert len(out.fed) == len(out.tokens_per_step)  # the draft model's forwards are not the target's


@pytest.mark.parametrize("name", ["model", "hybrid", "hybrid:warm", "hybrid:fixed:warm"])
def test_draft_model_methods_are_exact(name):
    model, draft = tiny_model("llama"), tiny_model("llama", seed=1)
    prompt = repetitive_prompt(5, length=40)
    runner = methods.build(methods.parse(name), model, None, draft)
    expected = plain_greedy(model, prompt, 24)
    runner.prepare([expected])  # a warm memory holds this very answer
    out = runner.run(prompt, 24)
    assert out.token_ids == expected
    assert sum(out.tokens_per_step) == len(expected)
    if name == "hybrid:fixed:warm":
        assert max(out.tokens_per_step) > 8  # drafted from the warmed memory


def test_suffix_decoding_drafts_from_the_answers_it_was_given():
    """SuffixDecoding's global cache learns past answers as ours does (`warm`): its drafts of
    an answer it holds are accepted, and the output is still plain greedy's."""
    model = tiny_model("llama")
    prompt = repetitive_prompt(6, length=40)
    expected = plain_greedy(model, prompt, 24)
    cold, warm = (methods.build(methods.parse(name), model, None) for name in ("suffix:fixed", "suffix:fixed:warm"))
    warm.prepare([expected])
    outs = [runner.run(prompt, 24) for runner in (cold, warm)]
    assert all(out.token_ids == expected for out in outs)
    assert len(outs[1].tokens_per_step) < len(outs[0].tokens_per_step)
    # its drafts grow with the match (factor 1: as long as the match), so about log2 steps
    assert len(outs[1].tokens_per_step) < len(expected) / 3


def test_copy_oracle():
    # everything copied from the prompt: one step of 3 accepted + 1 bonus
    assert harness.copy_oracle([([1, 2, 3, 4, 5], [1, 2, 3, 9])], [])["tokens_per_step"] == 4.0
    # nothing to copy: one token per step
    assert harness.copy_oracle([([1, 2], [7, 8, 9])], [])["tokens_per_step"] == 1.0
    # the output so far is readable: 7 | 8 | 7 8 + bonus 7 | 8 (the last token alone)
    assert harness.copy_oracle([([1], [7, 8, 7, 8, 7, 8])], [])["tokens_per_step"] == 6 / 4
    # depth caps a step at depth + 1 tokens
    assert harness.copy_oracle([(list(range(20)), list(range(20)))], [], depth=4)["tokens_per_step"] == 5.0
    # an earlier output and the warm corpus are readable; an earlier prompt is not
    runs = [([50, 51, 52], [1, 2]), ([3], [50, 51, 52, 1, 2])]
    # second run: 50 | 51 | 52 | 1 2 (from the first output)
    assert harness.copy_oracle(runs, [])["tokens_per_step"] == (2 + 5) / (2 + 4)
    # with 50 51 52 in the corpus: 50 51 52 + bonus 1 | 2
    assert harness.copy_oracle(runs, [[50, 51, 52]])["tokens_per_step"] == (2 + 5) / (2 + 2)


def test_a_matched_copy_oracle_enters_a_copy_only_after_a_token_it_has_seen():
    # the prompt ends in 5, never followed by 1: 1 alone, then 2 3 (after 1) + bonus 9
    assert harness.copy_oracle([([1, 2, 3, 4, 5], [1, 2, 3, 9])], [], context=1)["tokens_per_step"] == 2.0
    # 7 was never seen, so 2 3 after it cannot be entered: 7 | 2 | 3 (after 2)
    assert harness.copy_oracle([([1, 2, 3], [7, 2, 3])], [], context=0)["tokens_per_step"] == 1.5
    assert harness.copy_oracle([([1, 2, 3], [7, 2, 3])], [], context=1)["tokens_per_step"] == 1.0
    # never above the unmatched oracle, on any run
    runs = [([50, 51, 52, 7], [1, 2]), ([3, 7], [50, 51, 52, 1, 2, 9, 50, 51])]
    assert (harness.copy_oracle(runs, [], context=1)["tokens_per_step"]
            <= harness.copy_oracle(runs, [])["tokens_per_step"])


def _fake_results():
    records = []
    for method, seconds, steps, ids, fed in [("plain", 4.0, [1] * 8, [5] * 8, [10] + [1] * 7),
                                             ("trie", 1.0, [4, 4], [5] * 8, [14, 5]),
                                             ("trie:warm", 2.0, [2] * 4, [5] * 7 + [6], [11, 2, 2, 2])]:
        records.append(dict(workload="qa", task="qa/0", turn=0, method=method, prompt_tokens=10, new_tokens=8,
                            seconds=seconds, tokens_per_step=steps, draft_seconds=0.1 if method != "plain" else 0.0,
                            peak_mb=1.0, token_ids=ids, fed=fed))
    results = {"config": {**harness.Config(n=1).__dict__, "methods": ["plain", "trie", "trie:warm"]},
               "machine": {"cpu": "test", "cores": 2, "cpu_capability": "x", "memory_gb": 1, "torch": "t",
                           "transformers": "t", "date": "now"},
               "oracle": {"qa": {"cold": {"tokens_per_step": 5.0}, "warm": {"tokens_per_step": 3.0}}},
               "cost_curve": {"context": 10, "sizes": [1, 2, 4, 8], "seconds": [1.0, 1.0, 2.0, 4.0]},
               "records": records}
    results["summary"] = harness.summarise(results)
    return results


def test_summary_figures():
    s = _fake_results()["summary"]["qa"]
    assert s["plain"]["speedup"] == 1.0 and s["plain"]["tokens_per_step"] == 1.0
    assert s["trie"]["speedup"] == 4.0 and s["trie"]["tokens_per_step"] == 4.0
    assert s["trie"]["oracle_share"] == 0.75  # (4 - 1) / (5 - 1), against the cold bound
    assert s["trie:warm"]["oracle_share"] == 0.5  # (2 - 1) / (3 - 1), against the warm bound
    assert s["trie"]["agreement"] == 1.0 and s["trie:warm"]["agreement"] == 0.0
    assert s["trie"]["step_histogram"] == {4: 2}
    assert s["trie"]["draft_share"] == 0.1
    # modelled: the forwards after the prefill priced by the curve, drafting as measured
    assert s["plain"]["speedup_modelled"] == 1.0  # 7 tokens in 7 forwards of 1 s
    assert s["trie"]["speedup_modelled"] == round((4 / (2.5 + 0.1)) / (7 / 7), 3)  # 5 fed: 2.5 s
    assert s["trie:warm"]["speedup_modelled"] == round((6 / (3 * 1.0 + 0.1)) / 1.0, 3)
    assert (s["plain"]["fed_per_step"], s["trie"]["fed_per_step"], s["trie:warm"]["fed_per_step"]) == (1, 5, 2)


def test_modelled_figure_prices_each_forward_at_its_context():
    record = dict(new_tokens=5, tokens_per_step=[1, 4], fed=[10, 5], cached=[0, 10], draft_seconds=0.5)
    curve = {"context": 10, "sizes": [1, 8], "seconds": [1.0, 1.0], "per_context": [0.0, 0.01]}
    assert harness.modelled([record], curve) == (4, 1.5)  # at the measured context
    assert harness.modelled([{**record, "cached": [0, 110]}], curve) == (4, pytest.approx(6.5))  # + 100 x 0.01 x 5
    # runs before 2026-11-27: one context measured, none recorded; every forward at the curve's
    one_context = {k: v for k, v in curve.items() if k != "per_context"}
    assert harness.modelled([{**record, "cached": [0, 110]}], one_context) == (4, 1.5)
    assert harness.modelled([{k: v for k, v in record.items() if k != "cached"}], curve) == (4, 1.5)


def test_after_prefill_figure_leaves_out_the_first_forward():
    plain = dict(new_tokens=5, tokens_per_step=[1, 1, 1, 1, 1], seconds=9.0, forward_seconds=[5.0, 1, 1, 1, 1])
    fast = dict(new_tokens=5, tokens_per_step=[1, 4], seconds=7.0, forward_seconds=[6.0, 0.9])
    assert harness.after_prefill([plain]) == (4, 4.0) and harness.after_prefill([fast]) == (4, 1.0)
    assert harness.after_prefill([plain, {**fast, "forward_seconds": []}]) is None  # a run before it was timed
    results = _fake_results()
    assert results["summary"]["qa"]["trie"]["speedup_decode"] is None  # the fake records time no forward
    times = {"plain": [1.0] * 8, "trie": [1.0, 0.4, 0.4], "trie:warm": [1.0] + [0.3] * 4}
    for r in results["records"]:
        r["forward_seconds"] = times[r["method"]]
        r["seconds"] = sum(times[r["method"]]) + 0.1  # drafting and the loop around the forwards
    s = harness.summarise(results)["qa"]
    # plain: 7 tokens in 7.1 s after the prefill; trie: 4 tokens (its first step's 4 are the prefill's) in 0.9 s
    assert s["trie"]["speedup_decode"] == round((4 / 0.9) / (7 / 7.1), 3)
    assert s["plain"]["speedup_decode"] == 1.0


def test_modelled_figure_over_the_generations_every_method_agreed_on():
    results = _fake_results()
    s = results["summary"]["qa"]
    assert s["trie"]["agreed_generations"] == 0 and s["trie"]["speedup_modelled_agreed"] is None  # trie:warm differs
    results["records"][2]["token_ids"] = [5] * 8  # now every method wrote plain's text
    s = harness.summarise(results)["qa"]
    assert s["trie"]["agreed_generations"] == 1
    assert s["trie"]["speedup_modelled_agreed"] == s["trie"]["speedup_modelled"]


def test_no_modelled_figure_without_counted_forwards():
    results = _fake_results()
    for r in results["records"]:
        r.pop("fed")
    s = harness.summarise(results)["qa"]
    assert s["trie"]["speedup_modelled"] is None and s["trie"]["speedup"] == 4.0
    assert "| trie |" in report.markdown({**results, "summary": {"qa": s}})


def test_no_copy_oracle_share_for_draft_models():
    results = _fake_results()
    for r in results["records"]:
        r["method"] = {"trie": "model", "trie:warm": "assisted"}.get(r["method"], r["method"])
    s = harness.summarise(results)["qa"]
    assert s["model"]["oracle_share"] is None and s["assisted"]["oracle_share"] is None
    assert s["model"]["speedup"] == 4.0


def test_report_files(tmp_path):
    paths = report.write(_fake_results(), tmp_path, "triespec bench --quick")
    loaded = json.loads(paths["json"].read_text())
    assert loaded["summary"]["qa"]["trie"]["speedup"] == 4.0
    md = paths["markdown"].read_text()
    assert "triespec bench --quick" in md and "| trie:warm |" in md and "4.00×" in md
    assert "1.54×" in md and "2: 1000," in md  # the modelled speed-up; the cost curve in ms
    for key in ("speedup", "steps"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the plots take the summary as it comes back from JSON (string keys)
    report.plot_steps(loaded, tmp_path / "again.png")
    assert (tmp_path / "again.png").stat().st_size > 1000


def test_cli_rejects_bad_bench_arguments(capsys):
    assert main(["bench", "--methods", "trie"]) == 2
    assert "plain" in capsys.readouterr().err
    assert main(["bench", "--workloads", "code,poetry"]) == 2
    assert "poetry" in capsys.readouterr().err


@pytest.mark.slow
def test_harness_on_smollm2(tmp_path):
    """Two tasks per workload on the real model: the accounting, not the speed."""
    config = harness.Config(n=2, n_warm=1, max_new_tokens=12, methods=("plain", "prompt-lookup", "trie", "trie:warm"))
    results = harness.run(config, log=lambda m: None, progress=False)
    turns = {r["task"]: r["turn"] for r in results["records"]}
    assert set(results["summary"]) == set(config.workloads)
    for workload, rows in results["summary"].items():
        n = sum(1 for r in results["records"] if r["workload"] == workload and r["method"] == "plain")
        assert n >= 2
        for method, row in rows.items():
            assert row["generations"] == n
            assert row["agreement"] == 1.0, (workload, method)  # fp32: every method is exact
            assert row["oracle_tokens_per_step"] >= 1.0
        assert rows["plain"]["speedup"] == 1.0 and rows["plain"]["speedup_modelled"] == 1.0
    assert max(turns.values()) == 1  # the chat workload's second turn ran
    for r in results["records"]:
        assert len(r["prompt_ids"]) == r["prompt_tokens"]  # the prompt itself: a replay needs nothing else
        assert sum(r["tokens_per_step"]) == r["new_tokens"] == len(r["token_ids"]) <= 12
        assert len(r["fed"]) == len(r["tokens_per_step"]) == len(r["cached"]) == len(r["forward_seconds"])
        assert 0 < sum(r["forward_seconds"]) <= r["seconds"] and min(r["forward_seconds"]) > 0
        # the adaptive engine's curve after the call: (tokens, seconds), every size; none for the others
        assert (r["curve"] is not None) == r["method"].startswith("trie"), r["method"]
        if r["curve"]:
            assert [n for n, _ in r["curve"]] == list(range(1, len(r["curve"]) + 1))
        # the cache before each forward: empty at the prefill, then what the steps before left
        assert r["cached"] == [0] + [r["prompt_tokens"] + sum(r["tokens_per_step"][:i]) - 1
                                     for i in range(1, len(r["fed"]))]
    assert results["cost_curve"]["sizes"][:5] == [1, 2, 3, 4, 5]  # every size
    assert min(results["cost_curve"]["per_context"]) >= 0
    assert results["cost_curve"]["long_context"] >= max(r["prompt_tokens"] for r in results["records"])
    paths = report.write(results, tmp_path)
    assert all(p.exists() for p in paths.values())
