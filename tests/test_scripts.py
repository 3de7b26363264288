"""The scripts run end to end with their smallest settings and print the figures they promise."""

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str, timeout: float = 120) -> str:
    """The script's standard output; it must exit cleanly. One torch thread: on a shared
    2-core machine a second one only waits on the first, and these check what the
    scripts print, not how fast."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_batch_speed():
    out = run_script("batch_speed.py", "--rows", "2", "--max-new-tokens", "8")
    for method in ("plain generate, sequential", "triespec, sequential", "triespec, one batch"):
        line = next(line for line in out.splitlines() if line.startswith(method))
        seconds, tokens_per_second, ratio, identical = line[len(method):].split()
        assert float(seconds) > 0 and float(tokens_per_second) > 0 and ratio.endswith("x")
        assert identical == "2/2"  # every row is its plain output


@pytest.mark.slow
def test_serve_load():
    out = run_script("serve_load.py", "--clients", "2", "--tokens", "8", "--rounds", "1")
    [line] = out.splitlines()
    round_ = json.loads(line)
    assert round_["identical"] is True and round_["clients"] == 2
    assert round_["speculative_tokens_per_second"] > 0 and round_["plain_tokens_per_second"] > 0
    assert round_["ratio"] == pytest.approx(round_["speculative_tokens_per_second"]
                                            / round_["plain_tokens_per_second"], abs=0.01)


def synthetic_run(path: Path) -> None:
    """A results.json whose plain records carry their prompts: answers that copy their
    prompt ("copy") and answers that do not ("fresh"), forwards timed at 1.1x the curve."""
    rng = random.Random(0)
    sizes = list(range(1, 34))
    curve = {"context": 64, "sizes": sizes, "seconds": [0.5 + 0.01 * n for n in sizes], "per_context": [0.0, 0.0]}
    records = []
    for workload in ("copy", "fresh"):
        for task in range(3):
            prompt = [rng.randrange(1, 500) for _ in range(40)]
            output = prompt[5:35] if workload == "copy" else [rng.randrange(1, 500) for _ in range(30)]
            cached = [0] + [len(prompt) + i for i in range(len(output) - 1)]
            fed = [len(prompt)] + [1] * (len(output) - 1)
            seconds = [1.1 * (0.5 + 0.01 * min(f, 33)) for f in fed]
            records.append({"workload": workload, "task": f"{workload}/{task}", "turn": 0, "method": "plain",
                            "prompt_tokens": len(prompt), "prompt_ids": prompt, "token_ids": output,
                            "fed": fed, "cached": cached, "forward_seconds": seconds})
    path.write_text(json.dumps({"config": {"model": None, "workloads": ["copy", "fresh"], "n": 3},
                                "cost_curve": curve, "records": records}))


@pytest.mark.slow
def test_replay_budget(tmp_path):
    synthetic_run(tmp_path / "results.json")
    # the adaptive budget from a cold start whose timing of 8 tokens a burst of load slowed
    out = run_script("replay_budget.py", str(tmp_path / "results.json"), "--sizes", "4,8", "--start-load", "8:3")
    assert "steps charged by the run's timed forwards" in out
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.splitlines()
            if re.match(r"\| (copy|fresh) \|", line)}
    assert set(rows) == {"copy", "fresh"}
    for cells in rows.values():
        assert len(cells) == 4  # fixed dl=4, fixed dl=8, adaptive, adaptive / best fixed
        speedups = [float(cell.strip().rstrip("×")) for cell in cells[:3]]
        # the ratio of the cells as printed, rounded
        assert float(cells[3]) == pytest.approx(speedups[2] / max(speedups[:2]), rel=0.01)
    # copying answers pay under this curve (a token fed costs 0.01 s more): every budget beats plain decoding
    assert all(float(cell.strip().rstrip("×")) > 1.5 for cell in rows["copy"][:3])


@pytest.mark.slow
def test_replay_drafters(tmp_path):
    synthetic_run(tmp_path / "results.json")
    out = run_script("replay_drafters.py", str(tmp_path / "results.json"), "--drafters", "trie,trie:bl=2,suffix")
    rows = {line.split("|")[1].split()[0]: line.split("|")[2:-1] for line in out.splitlines()
            if re.match(r"\| (copy|fresh) ", line)}
    assert set(rows) == {"copy", "fresh"}
    oracle, matched, trie, short, suffix = (cell.strip() for cell in rows["copy"])
    per_step = {name: float(cell.split()[0]) for name, cell in (("trie", trie), ("short", short), ("suffix", suffix))}
    # on answers that copy, every drafter yields more than a token per forward; branches of 2 at most 3
    assert all(v > 1.2 for v in per_step.values()) and per_step["short"] <= 3 < float(oracle)
    assert per_step["trie"] > per_step["short"]
    # no drafter that matches the last tokens beats the oracle that needs a match too
    assert max(per_step.values()) <= float(matched) <= float(oracle)

    # held out from a run that holds the first two copy tasks: one copy task is replayed
    held = json.loads((tmp_path / "results.json").read_text())
    held["records"] = [r for r in held["records"] if r["task"] in ("copy/0", "copy/1")]
    (tmp_path / "tuned.json").write_text(json.dumps(held))
    out = run_script("replay_drafters.py", str(tmp_path / "results.json"), "--drafters", "trie",
                     "--held-out-from", str(tmp_path / "tuned.json"))
    assert re.search(r"\| copy \(1\) \|", out) and re.search(r"\| fresh \(3\) \|", out)


def test_results_tables_on_a_committed_run():
    """The results page's tables from a run the page cites: per workload the page table, the
    comparisons, and the oracles recomputed from the records' prompts."""
    out = run_script("results_tables.py", str(Path(__file__).parent.parent / "docs" / "benchmarks" / "p20-copy"))
    assert "#### summarize (copy oracle: " in out and "after a matched token: " in out
    rows = [line for line in out.splitlines() if re.match(r"\| trie \| [\d.]+×", line)]
    assert len(rows) == 2  # one page-table row per workload
    shares = [float(cell.strip().rstrip("%")) for row in rows for cell in row.split("|")[5:7]]
    # a share of the oracle after a matched token is larger than of the copy oracle, and at most all of it
    assert all(0 < copy < matched <= 100 for copy, matched in zip(shares[::2], shares[1::2]))
    assert re.search(r"\| trie \| prompt-lookup \| [\d.]+× \([\d.]+–[\d.]+\) \| (faster|slower|within the noise) \|", out)


@pytest.mark.slow
def test_ablate_budget(tmp_path):
    synthetic_run(tmp_path / "results.json")
    steep = json.loads((tmp_path / "results.json").read_text())
    steep["cost_curve"]["seconds"] = [0.5 + 0.2 * n for n in steep["cost_curve"]["sizes"]]
    (tmp_path / "steep.json").write_text(json.dumps(steep))
    out = run_script("ablate_budget.py", str(tmp_path / "results.json"), "--curve", f"steep={tmp_path / 'steep.json'}",
                     "--knobs", "prior,forgetting", "--json", str(tmp_path / "figures.json"), timeout=300)
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert set(figures) == {"own", "steep"}
    for curve in figures.values():
        assert set(curve) == {"shipped", "memory-17", "shuffled-1", "shuffled-2", "prior", "forgetting"}
        assert all(set(rows) == {"copy", "fresh", "all"} for rows in curve.values())
    # copying answers pay where a token fed costs 0.01 s more, and do not where it costs 0.2 s
    assert figures["own"]["shipped"]["copy"] > 1.5
    assert figures["steep"]["shipped"]["fresh"] == pytest.approx(1.0, abs=0.05)
    rows = [line for line in out.splitlines() if line.startswith("| prior 2 -> 0.01 |")]
    assert len(rows) == 2 and all(re.search(r"\((costs|helps|within noise)\) \|$", row) for row in rows)


def test_memory_load_stays_within_its_bound_and_measures_each_size():
    out = run_script("memory_load.py", "--max-nodes", "5000", "--tokens", "4000", "--at", "1000,3000")
    figures = json.loads(out[out.index("{"):])
    assert figures["max_nodes"] == 5000 and figures["push"]["pushes"] > 1
    assert figures["push"]["bytes_per_token"] > 0 and figures["push"]["learn_us_per_token"] > 0
    sizes = [s["nodes"] for s in figures["snapshots"]]
    assert len(sizes) >= 2 and max(sizes) <= 5000  # pruned back under the bound
    # a snapshot is the arrays persist writes: 12 bytes per node
    assert all(s["snapshot_bytes"] == 12 * s["nodes"] for s in figures["snapshots"])


@pytest.mark.slow
def test_forward_kernels_times_both_kernels_and_checks_their_output():
    out = run_script("forward_kernels.py", "--repeats", "1", "--new-tokens", "2", "--profile", "--caches", timeout=300)
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line for line in out.splitlines()
            if re.match(r"\| (torch|packed) \| (wall|cpu) \|", line)}
    assert set(rows) == {(k, c) for k in ("torch", "packed") for c in ("wall", "cpu")}
    # fp32 kernels sum in other orders: two logits within rounding may pick another token
    assert re.search(r"greedy output of model.generate identical on both kernels \(2 tokens\): (True|False)", out)
    # --profile: each kernel's breakdown, the packed one's linear op among the top ops, shares summing to 100%
    assert out.count("share of a forward's CPU time by op") == 2 and "| mkldnn::_linear_pointwise |" in out
    for table in out.split("share of a forward's CPU time by op")[1:]:
        shares = [[float(c.strip().rstrip("%")) for c in line.split("|")[2:-1]]
                  for line in table.splitlines() if line.startswith("| ") and "%" in line]
        assert len(shares) == 7 and all(abs(sum(col) - 100) < 0.5 for col in zip(*shares))
    # --caches: the engine's in-place cache against DynamicCache, same logits
    caches = re.findall(r"^\| (\d+) \| [\d.]+ \| [\d.]+ \| [\d.]+ \| (True|False) \|$", out, re.M)
    assert caches == [("1", "True"), ("16", "True")]
