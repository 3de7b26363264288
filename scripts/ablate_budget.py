"""Ablate the adaptive budget: replay recorded outputs with each of its knobs removed alone.

    python scripts/ablate_budget.py RESULTS_JSON... [--curve LABEL=RESULTS_JSON] [--knobs a,b] [--json OUT]

Every plain output a benchmark run recorded (`triespec bench`'s results.json, whose records
carry `prompt_ids`) is generated again through the engine's own decode step
(triespec.replay): the default trie drafter proposes, the adaptive budget cuts, an oracle
stands in for the model, and each forward is charged by a cost curve. Each workload gets a
fresh engine, as a benchmark run does: a cold start (the curve timed at the sizes
`CostModel.measure` times, the others interpolated, for real steps to confirm) and a fresh
calibration. The row "all" replays every workload in turn on one engine, as a server
would serve them.

Each knob is removed alone, by its simplest replacement, through public settings or a
subclass defined here; the table gives the modelled speed-up over plain decoding of the
shipped budget and each variant's change from it. (The knobs that went, and the variants
that removed them, are in this script at commit f83c9e7; docs/budget.md has their
figures.) Perturbations that should not matter (a cell's memory 16 -> 17 edges, the
tasks in another order) give the replay's noise floor on each row. A knob whose removal
costs some row more than max(3%, that row's floor) earns its place ("costs"); one whose
removal changes no row by more is "within noise", and one whose removal only gains
beyond it "helps". "all" shares the first run's own curve.

The curves: each run's own (`cost_curve` of the file), and any `--curve LABEL=FILE`
(another run's `cost_curve`, for every workload). A simulation under a curve, not a speed
claim.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
from dataclasses import dataclass
from typing import Callable

import torch

from triespec.budget import Calibration, CostModel
from triespec.replay import replay

MOST = 33  # the engine's curve: decoding_length + 1 tokens
COLD_SIZES = (1, 2, 4, 8, 16, 32, 33)  # what CostModel.measure times at a cold start


# --- the variants: each removes one knob by its simplest replacement ---

@dataclass
class Variant:
    label: str  # what the variant removes (or changes), as the table shows it
    calibration: Callable[[], Calibration] = Calibration
    order: int | None = None  # tasks shuffled with this seed (None: as recorded)


KNOBS: dict[str, Variant] = {
    "prior": Variant("prior 2 -> 0.01", lambda: Calibration(prior=0.01)),
    "forgetting": Variant("forgetting off", lambda: Calibration(memory=None)),
    "bins": Variant("score bins off", lambda: Calibration(bins=1)),
}
NOISE: dict[str, Variant] = {
    "memory-17": Variant("noise: memory 16 -> 17", lambda: Calibration(memory=17.0)),
    "shuffled-1": Variant("noise: tasks shuffled (seed 1)", order=1),
    "shuffled-2": Variant("noise: tasks shuffled (seed 2)", order=2),
}
NOT_ABLATABLE = {
    "two passes": "times the machine at start-up; a replay times nothing",
    "Gate.enough, MODEL kind": "need a draft model's proposals; the runs recorded only the target's outputs",
}


# --- the replay ---

Task = list[tuple[list[int], list[int]]]  # a task's turns: (prompt ids, plain output ids)


def load(path: str) -> tuple[dict[str, list[Task]], CostModel]:
    """workload -> its tasks in run order (each its turns in order), and the run's curve."""
    results = json.load(open(path))
    workloads: dict[str, dict[str, Task]] = {}
    for r in results["records"]:
        if r["method"] == "plain":
            if "prompt_ids" not in r:
                raise ValueError(f"{path}: plain records without prompt_ids (run before 2026-12): replay_budget.py "
                                 "rebuilds their prompts")
            workloads.setdefault(r["workload"], {}).setdefault(r["task"], []).append((r["prompt_ids"], r["token_ids"]))
    return {w: list(tasks.values()) for w, tasks in workloads.items()}, curve_of(results)


def dense(workloads: dict[str, list[Task]]) -> dict[str, list[Task]]:
    """The same tasks with every token id replaced by its rank among the ids that occur:
    the drafter compares tokens only for equality and order, and the oracle's logits and
    the stand-in model shrink from the model's vocabulary to the replay's."""
    ids = sorted({t for tasks in workloads.values() for task in tasks for turn in task for part in turn for t in part})
    rank = {t: i for i, t in enumerate(ids)}
    return {w: [[([rank[t] for t in prompt], [rank[t] for t in output]) for prompt, output in task] for task in tasks]
            for w, tasks in workloads.items()}


def curve_of(results: dict) -> CostModel:
    c = results["cost_curve"]
    return CostModel(c["sizes"], c["seconds"], context=c["context"], per_context=tuple(c.get("per_context", (0, 0))))


def cold(charge: CostModel) -> CostModel:
    """The curve a cold engine decides by: `charge` at the sizes a cold start times, the
    sizes between on the line, unconfirmed (as CostModel.measure builds it); the timed
    sizes taken as known (stepped), so that the budget never probes them: the ablation
    weighs the budget's parts on a start that timed the machine right."""
    timed = [n for n in COLD_SIZES if n <= MOST]
    curve = CostModel.from_timings(timed, [charge(n) for n in timed], MOST, charge.context, charge.per_context)
    curve.stepped = list(curve.confirmed)
    return curve


def speedup(tasks: list[Task], charge: CostModel, variant: Variant) -> float:
    """Modelled speed-up over plain decoding of one engine generating every task's turns."""
    if variant.order is not None:
        tasks = random.Random(variant.order).sample(tasks, len(tasks))
    generations = [turn for task in tasks for turn in task]
    decide = cold(charge)
    figure = replay(generations, charge, variant.calibration(), cost=decide).speedup
    gc.collect()  # the collector is off during replays (main): one pass per replay, not one per trie feed
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="results.json of triespec bench runs with a `plain` method")
    parser.add_argument("--curve", action="append", default=[], metavar="LABEL=RESULTS_JSON",
                        help="replay under this run's cost_curve too")
    parser.add_argument("--knobs", help=f"comma-separated, of {', '.join(KNOBS)} (default: all; 'none': no knob)")
    parser.add_argument("--no-noise", action="store_true", help="skip the noise-floor perturbations")
    parser.add_argument("--no-own", action="store_true", help="replay under the --curve curves only")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    gc.disable()
    runs = [load(path) for path in args.results]
    tasks = dense({w: tasks for by_workload, _ in runs for w, tasks in by_workload.items()})
    workloads = {w: (tasks[w], own) for by_workload, own in runs for w in by_workload}
    gc.freeze()  # what was loaded lives to the end: no collection needs to walk it
    others = {label: curve_of(json.load(open(path))) for label, path in (c.split("=", 1) for c in args.curve)}
    knobs = KNOBS if not args.knobs else {k: KNOBS[k] for k in args.knobs.split(",") if k != "none"}
    variants = {"shipped": Variant("shipped"), **({} if args.no_noise else NOISE), **knobs}
    curves = ([] if args.no_own else ["own"]) + list(others)
    rows = [*workloads, "all"]
    figures: dict[str, dict[str, dict[str, float]]] = {}  # curve -> variant -> row -> speed-up
    for label in curves:
        for name, variant in variants.items():
            cell = figures.setdefault(label, {}).setdefault(name, {})
            for w, (tasks, own) in workloads.items():
                cell[w] = speedup(tasks, own if label == "own" else others[label], variant)
            # every workload on one engine; its own curves differ by run: the first run's
            everything = [task for tasks, _ in workloads.values() for task in tasks]
            cell["all"] = speedup(everything, runs[0][1] if label == "own" else others[label], variant)
            print(f"{label:>4} {variant.label:<32} " + " ".join(f"{r}={x:.3f}" for r, x in cell.items()), flush=True)
    print()
    for label in curves:
        print(f"curve: {'each run' + chr(39) + 's own' if label == 'own' else label}\n")
        print("| knob removed | " + " | ".join(rows) + " | largest change |")
        print("|---|" + "---:|" * (len(rows) + 1))
        base = figures[label]["shipped"]
        change = {name: [figures[label][name][r] / base[r] - 1 for r in rows] for name in variants}
        noise = [max([abs(change[n][i]) for n in variants if n in NOISE], default=0.0) for i in range(len(rows))]
        print("| (shipped) | " + " | ".join(f"{base[r]:.3f}×" for r in rows) + " | |")
        for name, variant in variants.items():
            if name == "shipped":
                continue
            costs = any(c < -max(0.03, floor) for c, floor in zip(change[name], noise))
            helps = any(c > max(0.03, floor) for c, floor in zip(change[name], noise))
            verdict = "" if name in NOISE else f" ({'costs' if costs else 'helps' if helps else 'within noise'})"
            print(f"| {variant.label} | " + " | ".join(f"{100 * c:+.1f}%" for c in change[name])
                  + f" | {100 * max(change[name], key=abs):+.1f}%{verdict} |")
        print()
    for name, why in NOT_ABLATABLE.items():
        print(f"not ablated: {name}: {why}")
    if args.json:
        json.dump(figures, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
