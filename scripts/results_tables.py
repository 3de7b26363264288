"""Print the results page's tables for benchmark runs: `python scripts/results_tables.py DIR...`.

For each run (a folder written by `triespec bench --out DIR`): the command, the model and
machine, and per workload the compact table of `report.page_table` (speed-up with its
90% interval over tasks, tokens per forward, share of the copy oracle, agreement with
plain) and each triespec method against each peer (`report.comparison_table`).
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
        results["summary"] = harness.summarise(results)  # figures as this version computes them
        results["comparisons"] = harness.comparisons(results)
        config, machine = results["config"], results["machine"]
        print(f"`{command}`: {config['model']} in {config['dtype']}, {config['n']} tasks, "
              f"{config['max_new_tokens']} new tokens; {machine['cpu']} ({machine['cpu_capability']}), {machine['date']}\n")
        for workload in results["summary"]:
            oracle = results["oracle"][workload]["cold"]["tokens_per_step"]
            print(f"#### {workload} (copy oracle: {oracle:.2f} tokens per forward)\n")
            print("\n".join(report.page_table(results, workload)))
            print("\n".join(report.comparison_table(results["comparisons"].get(workload, []))))


if __name__ == "__main__":
    main()
