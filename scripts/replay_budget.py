"""Replay the trie's decode loop on a benchmark's recorded outputs, offline, to compare
draft budgets (fixed sizes, the adaptive cut) under a forward cost curve.

    python scripts/replay_budget.py RESULTS_JSON [--curve 1:0.519,2:1.135,...] [--sizes 4,8,16,32]

Greedy output does not depend on the drafts, so with the plain outputs of a run
(`triespec bench`'s results.json) every step can be replayed: propose with a real
TrieDrafter, cut with the real budget code, accept the longest path that matches the
recorded output, learn, and charge the step cost(tokens fed) from the curve. Each
workload shares one drafter memory, and the whole run one calibration, as in the
harness. The result is a *simulation*: it is how the budget was tuned in minutes rather
than hours, not a speed claim (those come from `triespec bench`). The curve is the one
the run measured (results.json's `cost_curve`, recorded since 2026-11-27, each forward
priced at its context where the run measured two); for older runs, Qwen2.5-Coder-1.5B in
fp32 on a 2-core AVX2 EPYC (seconds by tokens fed), unless `--curve` is given.

Where the run timed its forwards (`forward_seconds`), steps are charged by what forwards
of each size really took: the curve times the median ratio of the run's forwards of
that size to it. The adaptive cut still decides by the start-up curve, refined by each
replayed step's charge as the engine refines it by real steps. Real forwards ran 1.2-1.35x
the start-up curve in bf16 here, one-token ones the most, which a replay charged by the
curve alone hid.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from triespec.bench import workloads as W
from triespec.bench.harness import _chat_ids, _decode, model_path
from triespec.budget import Calibration, CostModel, Watched, best_size, expected_tokens
from triespec.drafters import TrieDrafter

FP32_CURVE = "1:0.519,2:1.135,4:1.525,8:1.601,16:2.117,32:2.814"


def recorded(results: dict, tokenizer) -> dict[str, list[tuple[list[int], list[int]]]]:
    """workload -> [(prompt ids, plain output ids)] in run order, prompts rebuilt as the harness built them."""
    tasks = {t.id: t for w in results["config"]["workloads"] for t in W.load(w, results["config"]["n"], "eval")}
    chats: dict[str, list[dict]] = {}
    out: dict[str, list] = {}
    for r in results["records"]:
        if r["method"] != "plain":
            continue
        chat = chats.setdefault(r["task"], [])
        chat.append({"role": "user", "content": tasks[r["task"]].turns[r["turn"]]})
        ids = _chat_ids(tokenizer, chat)
        if len(ids) != r["prompt_tokens"]:
            raise ValueError(f"{r['task']}: rebuilt prompt has {len(ids)} tokens, the run had {r['prompt_tokens']}")
        chat.append({"role": "assistant", "content": _decode(tokenizer, r["token_ids"])})
        out.setdefault(r["workload"], []).append((ids, r["token_ids"]))
    return out


def accepted(tree, output: list[int]) -> int:
    node, n = -1, 0
    while n < len(output):
        node = next((c for c in tree.children.get(node, []) if tree.tokens[c] == output[n]), None)
        if node is None:
            break
        n += 1
    return n


def recorded_curve(results: dict, cost: CostModel, least: int = 5) -> CostModel | None:
    """`cost` scaled size by size by the median ratio of the run's timed forwards (after
    each generation's first) to it; sizes fed fewer than `least` times take the ratio
    interpolated between sizes that were. None if the run timed no forwards."""
    ratios: dict[int, list[float]] = {}
    for r in results["records"]:
        if not r.get("forward_seconds"):  # runs before 2026-11-27 timed no forward (nor kept `fed`, `cached`)
            continue
        for fed, cached, seconds in list(zip(r["fed"], r["cached"], r["forward_seconds"]))[1:]:
            ratios.setdefault(fed, []).append(seconds / cost(fed, cached))
    known = sorted((n, float(np.median(v))) for n, v in ratios.items() if len(v) >= least and n in cost.sizes)
    if not known:
        return None
    scale = np.interp(cost.sizes, [n for n, _ in known], [x for _, x in known])
    return CostModel(cost.sizes, [t * x for t, x in zip(cost.seconds, scale)], context=cost.context,
                     per_context=cost.per_context)


def replay(generations, cost: CostModel, decoding_length: int, calibration: Calibration | None = None,
           charge: CostModel | None = None) -> tuple[float, float]:
    """(simulated seconds, plain decoding's seconds) for one workload's generations, both
    for the tokens after each generation's first forward: the prefill costs every method
    the same, and leaving it out is how the harness's modelled speed-up counts too. With
    a `calibration`, the adaptive cut (which learns into it and decides by `cost`), else
    the fixed size. Steps are charged by `charge` (default: `cost`), and with one given
    `cost` is refined by each step's charge, as the engine refines its curve."""
    drafter = TrieDrafter(decoding_length=decoding_length)
    charge = charge or cost
    spent = plain = 0.0
    for prompt, output in generations:
        session = drafter.begin(prompt)
        seq, done, pending, watch = list(prompt), 0, len(prompt), []
        while done < len(output):
            tree = session.propose(max_nodes=10**6, max_depth=len(output) - done - 1)
            if calibration is not None and len(tree):
                size = best_size(tree, pending, cost, calibration, context=len(seq) - pending)
                watch.append(Watched(len(seq), tree, size, expected_tokens(tree, size, calibration)))
                tree = tree.prefix(max_nodes=size)
            new = output[done : done + accepted(tree, output[done:]) + 1]
            fed, context = pending + len(tree), len(seq) - pending
            if done:  # after the prefill: plain decoding would spend a forward per token
                spent += charge(fed, context)
                plain += len(new) * charge(1, len(seq))
            if charge is not cost:
                cost.observe(fed, charge(fed, context), context)
            done, pending = done + len(new), 1
            seq += new
            if calibration is not None:
                watch = [w for w in watch if not w.update(calibration, seq, done >= len(output))]
            session.learn(new)
        session.end()
    return spent, plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="results.json of a triespec bench run with a `plain` method")
    parser.add_argument("--curve", help="tokens:seconds pairs of the forward cost (default: the run's own)")
    parser.add_argument("--sizes", default="4,8,16,32", help="fixed decoding lengths to compare")
    args = parser.parse_args()
    results = json.load(open(args.results))
    path = Path(model_path(results["config"]["model"]))
    tokenizer = (AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name) if path.suffix == ".gguf"
                 else AutoTokenizer.from_pretrained(path))
    if "cost_curve" in results and not args.curve:
        curve = results["cost_curve"]
        cost = CostModel(curve["sizes"], curve["seconds"], context=curve["context"],
                         per_context=curve.get("per_context", (0.0, 0.0)))
    else:
        points = [p.split(":") for p in (args.curve or FP32_CURVE).split(",")]
        cost = CostModel([int(t) for t, _ in points], [float(s) for _, s in points])
    sizes = [int(s) for s in args.sizes.split(",")]
    charge = None if args.curve else recorded_curve(results, cost)
    print("simulated speed-up over plain decoding, steps charged by "
          + ("the run's timed forwards" if charge else "the curve") + "\n")
    print("| workload | " + " | ".join(f"fixed dl={s}" for s in sizes) + " | adaptive | adaptive / best fixed |")
    print("|---|" + "---:|" * (len(sizes) + 2))
    calibration = Calibration()  # one for the whole run, as the harness carries it across workloads
    decide = copy.deepcopy(cost) if charge else cost  # the adaptive's own curve, refined as it goes
    for workload, generations in recorded(results, tokenizer).items():
        cells = [replay(generations, charge or cost, s) for s in sizes]
        cells.append(replay(generations, decide, max(sizes), calibration, charge))
        speedups = [plain / spent for spent, plain in cells]
        print(f"| {workload} | " + " | ".join(f"{x:.2f}×" for x in speedups) + f" | {speedups[-1] / max(speedups[:-1]):.3f} |")


if __name__ == "__main__":
    main()
