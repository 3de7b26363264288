"""Print the results page's tables for benchmark runs: `python scripts/results_tables.py DIR...`.

For each run (a folder written by `triespec bench --out DIR`): the command, the model and
machine, and per workload the compact table of `report.page_table` (speed-up with its
90% interval over tasks, tokens per forward, share of the copy oracles, agreement with
plain) and each triespec method against each peer (`report.comparison_table`). A run
whose records carry their prompts gets its cold oracles as this version computes them
(depth, and the oracle after a matched token, which older runs did not record).
"""

import argparse
import json
from pathlib import Path

from triespec.bench import harness, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="folders holding a results.json")
    for folder in parser.parse_args().runs:
        results = json.loads((Path(folder) / "results.json").read_text())
        md = (Path(folder) / "results.md").read_text().splitlines()
        command = md[1] if md and md[0] == "```bash" else folder  # report.write quotes the command first
        recompute_oracles(results)
        results["summary"] = harness.summarise(results)  # figures as this version computes them
        results["comparisons"] = harness.comparisons(results)
        config, machine = results["config"], results["machine"]
        print(f"`{command}`: {config['model']} in {config['dtype']}, {config['n']} tasks, "
              f"{config['max_new_tokens']} new tokens; {machine['cpu']} ({machine['cpu_capability']}), {machine['date']}\n")
        for workload in results["summary"]:
            oracle = results["oracle"][workload]
            matched = oracle.get("cold_matched", {}).get("tokens_per_step")
            print(f"#### {workload} (copy oracle: {oracle['cold']['tokens_per_step']:.2f} tokens per forward"
                  + (f"; after a matched token: {matched:.2f}" if matched else "") + ")\n")
            print("\n".join(report.page_table(results, workload)))
            print("\n".join(report.comparison_table(results["comparisons"].get(workload, []))))


def recompute_oracles(results: dict) -> None:
    """The cold copy oracles from the run's own plain outputs, where the records carry
    their prompts (the warm one needs the warm split, which is not recorded)."""
    for workload, oracle in results["oracle"].items():
        plain = [r for r in results["records"] if r["workload"] == workload and r["method"] == "plain"]
        if plain and all("prompt_ids" in r for r in plain):
            generations = [(r["prompt_ids"], r["token_ids"]) for r in plain]
            oracle["cold"] = harness.copy_oracle(generations, [])
            oracle["cold_matched"] = harness.copy_oracle(generations, [], context=1)


if __name__ == "__main__":
    main()
