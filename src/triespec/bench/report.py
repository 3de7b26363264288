"""Write a benchmark's results: raw JSON, a Markdown table, PNG plots."""

from __future__ import annotations

import json
import os
from pathlib import Path

COLUMNS = [  # (summary key, header, format)
    ("tokens_per_second", "tok/s", "{:.2f}"),
    ("speedup", "speedup", "{:.2f}×"),
    ("speedup_median", "median", "{:.2f}×"),
    ("speedup_decode", "after prefill", "{:.2f}×"),
    ("speedup_modelled", "modelled", "{:.2f}×"),
    ("speedup_modelled_agreed", "modelled, = all", "{:.2f}×"),
    ("tokens_per_step", "tok/step", "{:.2f}"),
    ("fed_per_step", "fed/step", "{:.1f}"),
    ("oracle_share", "of oracle", "{:.0%}"),
    ("matched_oracle_share", "of matched", "{:.0%}"),
    ("draft_share", "drafting", "{:.0%}"),
    ("peak_mb", "peak MB", "{:.0f}"),
    ("agreement", "= plain", "{:.0%}"),
]


def write(results: dict, out: str | os.PathLike, command: str = "") -> dict[str, Path]:
    """Write results.json, results.md, speedup.png and steps.png into `out`; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md",
             "speedup": out / "speedup.png", "steps": out / "steps.png"}
    paths["json"].write_text(json.dumps(results, indent=1))
    paths["markdown"].write_text(markdown(results, command, plots=("speedup.png", "steps.png")))
    plot_speedup(results, paths["speedup"])
    plot_steps(results, paths["steps"])
    return paths


def markdown(results: dict, command: str = "", plots: tuple[str, ...] = ()) -> str:
    config, machine = results["config"], results["machine"]
    lines = []
    if command:
        lines += ["```bash", command, "```", ""]
    lines += [
        f"Model `{config['model'] or 'SmolLM2-135M-Instruct'}` in {config['dtype']}"
        + (f", draft model `{config['draft_model']}`" if config.get("draft_model") else "")
        + f"; {config['n']} tasks per workload, {config['max_new_tokens']} new tokens, greedy, batch 1.",
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['cpu_capability']}), "
        f"{machine['memory_gb']} GB; torch {machine['torch']}, transformers {machine['transformers']}; {machine['date']}.",
        "",
        "speedup: tokens/s against plain decoding over the same generations (aggregate; median: per generation). "
        "after prefill: the same by the wall clock after each generation's first forward (the prompt's, the same "
        "for every method; its noise swamps short answers after long prompts). "
        "modelled: the same, with every forward after the prefill priced by the cost curve below (measured once "
        "in the run; where methods ran on different kernels, each kernels' curve scaled to the median of what "
        "its forwards took over the run) and drafting as measured, so the machine's load between methods does "
        "not count; "
        "= all: the same over the generations where every method's output was plain's (in bf16 a method can "
        "round its way to another text). "
        "tok/step: tokens per target forward. fed/step: tokens fed to each forward after the prefill (1 + the "
        "nodes verified). of oracle: accepted draft tokens per step as a share of a perfect "
        "retrieval drafter's (copying from the prompt, past outputs and, for warm methods, the warm split). "
        "of matched: the same against the oracle that enters a copy only after a token it has seen before "
        "(the bound of any drafter that finds its copy by matching the last tokens: trie, prompt lookup, "
        "SuffixDecoding). "
        "= plain: share of generations identical to plain greedy decoding. "
        "In brackets: 90% bootstrap intervals over tasks (a task's turns resampled together); a comparison "
        "resamples both methods' tasks together and calls a difference real when its interval excludes 1.",
        "",
    ]
    curve = results.get("cost_curve")
    if curve:
        lines += [f"Cost curve ({curve['context']} tokens cached), ms per forward by tokens fed: "
                  + ", ".join(f"{n}: {1000 * t:.0f}" for n, t in zip(curve["sizes"], curve["seconds"])), ""]
        if "per_context" in curve:
            a, b = curve["per_context"]
            lines += [f"Each 1000 more tokens cached (measured up to {curve['long_context']}) add "
                      + ", ".join(f"{n}: {1e6 * (a + b * n):.1f}" for n in (1, curve["sizes"][-1]))
                      + " ms; every forward is priced at its own context.", ""]
    for workload, methods in results["summary"].items():
        oracle = results["oracle"][workload]
        lines += [f"### {workload}", "",
                  f"copy oracle: {oracle['cold']['tokens_per_step']:.2f} tokens/step cold, "
                  f"{oracle['warm']['tokens_per_step']:.2f} warm"
                  + (f"; after a matched token: {oracle['cold_matched']['tokens_per_step']:.2f} cold, "
                     f"{oracle['warm_matched']['tokens_per_step']:.2f} warm" if "warm_matched" in oracle else ""), "",
                  "| method | " + " | ".join(h for _, h, _ in COLUMNS) + " |",
                  "|---|" + "---:|" * len(COLUMNS)]
        for method, row in methods.items():
            cells = [_cell(row, k, fmt) for k, _, fmt in COLUMNS]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += comparison_table(results.get("comparisons", {}).get(workload, []))
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _cell(row: dict, key: str, fmt: str) -> str:
    """A figure, with its 90% interval over tasks where it has one."""
    if row.get(key) is None:
        return "—"
    interval = row.get(f"{key}_interval")
    if interval is None:
        return fmt.format(row[key])
    return f"{fmt.format(row[key])} ({interval[1]:.2f}–{interval[2]:.2f})"


def comparison_table(rows: list[dict]) -> list[str]:
    """triespec against each peer: the ratio of speed-ups and its paired 90% interval."""
    if not rows:
        return []
    lines = ["| triespec | against | speed-up ratio, modelled (90% interval) | difference |", "|---|---|---:|---|"]
    for c in rows:
        value, low, high = c["ratio"]
        verdict = ("faster" if low > 1 else "slower") if c["real"] else "within the noise"
        clock = " (wall clock)" if c.get("figure") == "after_prefill" else ""
        lines.append(f"| {c['method']} | {c['peer']}{clock} | {value:.2f}× ({low:.2f}–{high:.2f}) | {verdict} |")
    return lines + [""]


def page_table(results: dict, workload: str) -> list[str]:
    """The results page's table for one workload: the figures a user compares methods by."""
    rows = results["summary"][workload]
    lines = ["| method | speed-up, modelled (90% interval) | after prefill, wall clock | tokens/forward "
             "| of copy oracle | of matched oracle | = plain |", "|---|---:|---:|---:|---:|---:|---:|"]
    for method, row in rows.items():
        lines.append(f"| {method} | {_cell(row, 'speedup_modelled', '{:.2f}×')} "
                     f"| {_cell(row, 'speedup_decode', '{:.2f}×')} | {row['tokens_per_step']:.2f} "
                     f"| {_cell(row, 'oracle_share', '{:.0%}')} | {_cell(row, 'matched_oracle_share', '{:.0%}')} "
                     f"| {row['agreement']:.0%} |")
    return lines + [""]


def plot_speedup(results: dict, path: Path) -> None:
    plt = _pyplot()
    summary = results["summary"]
    workloads = list(summary)
    methods = list(next(iter(summary.values())))
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(workloads), 4))
    width = 0.8 / len(methods)
    for m, method in enumerate(methods):
        xs = [w + (m - (len(methods) - 1) / 2) * width for w in range(len(workloads))]
        ax.bar(xs, [summary[w][method]["speedup"] for w in workloads], width, label=method)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(workloads)), workloads)
    ax.set_ylabel("speed-up over plain decoding")
    ax.set_title(f"{results['config']['model'] or 'SmolLM2-135M-Instruct'}, {results['config']['dtype']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_steps(results: dict, path: Path) -> None:
    """Histogram of tokens per forward step, per method, all workloads together."""
    plt = _pyplot()
    totals: dict[str, dict[int, int]] = {}
    for methods in results["summary"].values():
        for method, row in methods.items():
            for k, count in row["step_histogram"].items():
                totals.setdefault(method, {}).setdefault(int(k), 0)
                totals[method][int(k)] += count
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, hist in totals.items():
        steps = sum(hist.values())
        ks = sorted(hist)
        ax.plot(ks, [hist[k] / steps for k in ks], marker="o", markersize=3, label=method)
    ax.set_xlabel("tokens per forward step (accepted + bonus)")
    ax.set_ylabel("share of steps")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    return plt
