"""Replay a benchmark's recorded outputs through the engine's own decode step, offline,
to compare draft budgets (fixed sizes, the adaptive cut) under a forward cost curve.

    python scripts/replay_budget.py RESULTS_JSON [--curve 1:0.519,2:1.135,...] [--sizes 4,8,16,32]

Greedy output does not depend on the drafts, so with the plain outputs of a run
(`triespec bench`'s results.json) every step can be replayed by the product's own step
(triespec.replay): a real TrieDrafter proposes, the real budget cuts, an oracle in place
of the model accepts the longest path that matches the recorded output, and each forward
is charged cost(tokens fed, cache width) from the curve. Each workload shares one
drafter memory, and the whole run one calibration, as in the harness. The result is a
*simulation*: it is how the budget was tuned in minutes rather than hours, not a speed
claim (those come from `triespec bench`). The curve is the one the run measured
(results.json's `cost_curve`, recorded since 2026-11-27, each forward priced at its
context where the run measured two); for older runs, Qwen2.5-Coder-1.5B in fp32 on a
2-core AVX2 EPYC (seconds by tokens fed), unless `--curve` is given.

Prompts are the records' own (`prompt_ids`) where every plain record carries them, else
they are rebuilt from the benchmark's data sets with the run model's tokenizer, as the
harness built them.

`--start-load 16:2,32:2` starts the adaptive budget as a cold start would (the sizes
`CostModel.measure` times, no real step seen yet), each listed size timed that many
times dearer than the charge: a burst of load while the start-up timed it.
`--no-probes` turns the budget's probes of sizes no real step has shown off, to see
what they are worth.

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
import torch
from transformers import AutoTokenizer

from triespec.bench import workloads as W
from triespec.bench.harness import answer_text, chat_prompt, model_path
from triespec.budget import Budget, Calibration, CostModel, timed_sizes
from triespec.replay import replay

FP32_CURVE = "1:0.519,2:1.135,4:1.525,8:1.601,16:2.117,32:2.814"


def recorded(results: dict) -> dict[str, list[tuple[list[int], list[int]]]]:
    """workload -> [(prompt ids, plain output ids)] in run order."""
    plain = [r for r in results["records"] if r["method"] == "plain"]
    if not plain:
        raise ValueError("the run has no 'plain' records to replay")
    prompts = [r["prompt_ids"] for r in plain] if all("prompt_ids" in r for r in plain) \
        else rebuilt_prompts(results, plain)
    out: dict[str, list] = {}
    for r, ids in zip(plain, prompts):
        if len(ids) != r["prompt_tokens"]:
            raise ValueError(f"{r['task']}: the prompt has {len(ids)} tokens, the run had {r['prompt_tokens']}")
        out.setdefault(r["workload"], []).append((ids, r["token_ids"]))
    return out


def rebuilt_prompts(results: dict, plain: list[dict]) -> list[list[int]]:
    """Each plain record's prompt, from the benchmark's data sets and the run model's
    tokenizer; a later turn of a chat carries the earlier turns' recorded answers."""
    path = Path(model_path(results["config"]["model"]))
    tokenizer = (AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name) if path.suffix == ".gguf"
                 else AutoTokenizer.from_pretrained(path))
    tasks = {t.id: t for w in results["config"]["workloads"] for t in W.load(w, results["config"]["n"], "eval")}
    chats: dict[str, list[dict]] = {}
    prompts = []
    for r in plain:
        chat = chats.setdefault(r["task"], [])
        chat.append({"role": "user", "content": tasks[r["task"]].turns[r["turn"]]})
        prompts.append(chat_prompt(tokenizer, chat))
        chat.append({"role": "assistant", "content": answer_text(tokenizer, r["token_ids"])})
    return prompts


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


def cold_start(charge: CostModel, most: int, load: dict[int, float]) -> CostModel:
    """The curve a cold start would time from a machine whose forwards cost `charge`: the
    sizes CostModel.measure times, each `load[size]` times dearer, the rest on the line
    between them, no size stepped."""
    timed = timed_sizes(most)
    return CostModel.from_timings(timed, [charge(n) * load.get(n, 1.0) for n in timed], most, charge.context,
                                  charge.per_context)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="results.json of a triespec bench run with a `plain` method")
    parser.add_argument("--curve", help="tokens:seconds pairs of the forward cost (default: the run's own)")
    parser.add_argument("--sizes", default="4,8,16,32", help="fixed decoding lengths to compare")
    parser.add_argument("--start-load", metavar="SIZE:FACTOR,...",
                        help="start the adaptive budget cold, these timed sizes that many times dearer")
    parser.add_argument("--no-probes", action="store_true", help="the budget probes no size")
    args = parser.parse_args()
    if args.no_probes:
        Budget.probe_share = -1.0  # no probe's spending is ever within a negative share
    torch.set_num_threads(1)  # the replay's tensors are small: on a busy machine more threads only wait on each other
    results = json.load(open(args.results))
    if "cost_curve" in results and not args.curve:
        curve = results["cost_curve"]
        cost = CostModel(curve["sizes"], curve["seconds"], context=curve["context"],
                         per_context=curve.get("per_context", (0.0, 0.0)))
    else:
        points = [p.split(":") for p in (args.curve or FP32_CURVE).split(",")]
        cost = CostModel([int(t) for t, _ in points], [float(s) for _, s in points])
    sizes = [int(s) for s in args.sizes.split(",")]
    measured = None if args.curve else recorded_curve(results, cost)
    print("simulated speed-up over plain decoding, steps charged by "
          + ("the run's timed forwards" if measured else "the curve") + "\n")
    print("| workload | " + " | ".join(f"fixed dl={s}" for s in sizes) + " | adaptive | adaptive / best fixed |")
    print("|---|" + "---:|" * (len(sizes) + 2))
    charge = measured or cost
    calibration = Calibration()  # one for the whole run, as the harness carries it across workloads
    decide = copy.deepcopy(cost) if measured else cost  # the adaptive's own curve, refined as it goes
    if args.start_load is not None:
        load = {int(n): float(x) for n, x in (p.split(":") for p in args.start_load.split(","))}
        decide = cold_start(charge, max(sizes) + 1, load)
    for workload, generations in recorded(results).items():
        cells = [replay(generations, charge, adaptive=False, decoding_length=s) for s in sizes]
        cells.append(replay(generations, charge, calibration, cost=decide, decoding_length=max(sizes)))
        speedups = [cell.speedup for cell in cells]
        shown = " | ".join(f"{x:.2f}×" for x in speedups)
        print(f"| {workload} | {shown} | {speedups[-1] / max(speedups[:-1]):.3f} |")


if __name__ == "__main__":
    main()
