"""Compare drafters on a benchmark's recorded outputs, offline and deterministically.

    python scripts/replay_drafters.py RESULTS_JSON [--drafters trie,suffix,trie:bl=12:ml=2] [--fixed]
                                      [--held-out-from RESULTS_JSON ...]

Every drafter is named as a benchmark method (`triespec bench --help`: `trie:bl=12`,
`suffix:tree:factor=2`, `lookup:fixed`: transformers' prompt lookup, each chain verified
whole as transformers does). Each replays the run's plain greedy outputs through the
engine's own decode step (`triespec.replay`: an oracle stands in for the model), so the
tokens per forward are exact, not measured, and two drafters differ by what they draft
and nothing else; the speed-up is modelled by the run's own cost curve (the adaptive
budget cuts by it too). Prints, per workload, the copy oracle and the oracle after a matched
token (harness.copy_oracle), and per drafter tokens per forward, the share of the copy
oracle and the modelled speed-up over plain decoding. `--held-out-from` replays only the
tasks that none of the given runs holds: settings chosen by replaying those runs are
then judged on tasks they were not chosen on.
"""

import argparse
import json

import torch
from replay_budget import recorded  # scripts/: the run's (prompt, plain output) pairs

from triespec.bench import methods
from triespec.bench.harness import copy_oracle
from triespec.budget import Calibration, CostModel
from triespec.drafters import build
from triespec.replay import replay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="results.json of a triespec bench run with a `plain` method")
    parser.add_argument("--drafters", default="trie,lookup:fixed,lookup:fixed:dl=4,suffix,suffix:tree:factor=2",
                        help="comma-separated, named as benchmark methods without a draft model")
    parser.add_argument("--fixed", action="store_true",
                        help="verify every tree whole (no adaptive budget); `NAME:fixed` does it for one drafter")
    parser.add_argument("--workloads", help="comma-separated (default: every one in the run)")
    parser.add_argument("--curve-from", metavar="RESULTS_JSON",
                        help="price forwards by another run's cost curve (another machine or dtype)")
    parser.add_argument("--held-out-from", nargs="+", default=(), metavar="RESULTS_JSON",
                        help="replay only the tasks none of these runs holds")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small tensors: more threads only wait on each other
    results = json.load(open(args.results))
    priced = json.load(open(args.curve_from)) if args.curve_from else results
    if "cost_curve" not in priced:
        raise SystemExit("the run has no cost curve (runs before 2026-11-27)")
    c = priced["cost_curve"]
    cost = CostModel(c["sizes"], c["seconds"], context=c["context"], per_context=c.get("per_context", (0.0, 0.0)))
    specs = [methods.parse(name) for name in args.drafters.split(",")]
    if any(s.needs_draft_model or s.base in methods.TRANSFORMERS for s in specs):
        raise SystemExit("replays take drafters without a draft model (trie, suffix, lookup)")
    seen = {(r["workload"], r["task"]) for path in args.held_out_from for r in json.load(open(path))["records"]}
    runs = recorded({**results, "records": [r for r in results["records"] if (r["workload"], r["task"]) not in seen]})
    chosen = args.workloads.split(",") if args.workloads else list(runs)
    config, machine = priced["config"], priced.get("machine", {})
    source = f"the cost curve of {args.curve_from}" if args.curve_from else "the run's cost curve"
    print(f"{'fixed trees' if args.fixed else 'adaptive budget (fixed where named)'}, modelled by {source} "
          f"({config.get('model') or 'SmolLM2-135M-Instruct'}, {config.get('dtype', '?')}, {machine.get('cpu', '?')})\n")
    print("| workload | copy oracle | after a match | " + " | ".join(s.name for s in specs) + " |")
    print("|---|---:|---:|" + "---:|" * len(specs))
    for workload in chosen:
        generations = runs[workload]
        oracle = copy_oracle(generations, [])["tokens_per_step"]
        matched = copy_oracle(generations, [], context=1)["tokens_per_step"]
        cells = []
        for spec in specs:
            adaptive = spec.adaptive and not args.fixed
            out = replay(generations, cost, Calibration() if adaptive else None, adaptive=adaptive,
                         drafter=build(spec.base, **spec.drafter))
            steps = out.tokens_per_step
            per = sum(steps) / len(steps)
            cells.append(f"{per:.2f} ({(per - 1) / (oracle - 1):.0%}), {out.speedup:.2f}×")
        print(f"| {workload} ({len(generations)}) | {oracle:.2f} | {matched:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
