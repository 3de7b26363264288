"""A model's forward cost by tokens fed, on torch's kernels and on packed ones
(triespec.kernels), and each way's peak resident memory: a markdown table.

Each kernel runs in a process of its own (so that peak memory is each one's alone):
load the model, put it on the kernels, time forwards of 1, 2, 4, 8, 16 and 32 tokens
after 64 cached tokens (budget.CostModel.measure, the fastest of --repeats passes over
the sizes), then generate --new-tokens greedily with model.generate; peak RSS is the
process's maximum. Run it alone: the other load of a shared machine moves every figure.
`--profile`: where a forward's time goes, by torch op (share of CPU time), for forwards of
1 and 16 tokens after --context cached tokens. `--caches`: on packed kernels, forwards of 1
and 16 tokens after --context cached tokens appending to the engine's cache
(triespec.kv.KVCache, in place) and to transformers' DynamicCache (torch.cat), interleaved in
one process, medians of 4 x --repeats, and whether their logits are identical.

    python scripts/forward_kernels.py --dtype float32
    python scripts/forward_kernels.py --model qwen2.5-coder-1.5b --dtype bfloat16
    python scripts/forward_kernels.py --model qwen2.5-coder-1.5b --context 1500 --profile
    python scripts/forward_kernels.py --model qwen2.5-coder-1.5b --dtype bfloat16 --context 1500 --caches
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

SIZES = (1, 2, 4, 8, 16, 32)


PROFILED = (1, 16)  # forward sizes --profile breaks down


def forwarder(model, context: int, cache=None):
    """A function n -> the logits of one forward over n tokens (a chain) after `context`
    cached tokens, the cache put back after it: budget.CostModel.measure's forward, on
    `cache` (default: the engine's, triespec.kv.KVCache)."""
    import torch

    from triespec.kv import KVCache, keep_paths
    from triespec.masks import Row, forward, pack, with_cache
    from triespec.tree import TokenTree

    cache = KVCache() if cache is None else cache
    vocab = model.get_input_embeddings().weight.shape[0]
    model(input_ids=torch.arange(context, device=model.device)[None] % vocab, **with_cache(model, cache))

    def run(n: int) -> None:
        packed = pack([Row([1], TokenTree.chain([1] * (n - 1)), context)], context, model.dtype, model.config,
                      model.device)
        logits = forward(model, packed, cache, logits_to_keep=n).logits
        keep_paths(cache, [(context, [])])
        return logits

    return run


def cache_times(model, context: int, repeats: int) -> dict:
    """{n: (DynamicCache's median seconds, the engine's, logits identical?)} for n in
    PROFILED: forwards after `context` cached tokens on each cache, interleaved."""
    import statistics

    from transformers import DynamicCache

    from triespec.kv import KVCache

    runs = {"dynamic": forwarder(model, context, DynamicCache()), "engine": forwarder(model, context, KVCache())}
    out = {}
    for n in PROFILED:
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        logits = {name: run(n) for name, run in runs.items()}  # warms up
        for _ in range(4 * repeats):
            for name, run in runs.items():
                t = time.perf_counter()
                run(n)
                seconds[name].append(time.perf_counter() - t)
        out[n] = (statistics.median(seconds["dynamic"]), statistics.median(seconds["engine"]),
                  bool((logits["dynamic"] == logits["engine"]).all()))
    return out


def forward_times(run, repeats: int) -> tuple[dict, dict]:
    """Wall and CPU seconds (all threads) of `run(n)` for each n in SIZES: the fastest of
    `repeats` passes over the sizes, after a warm-up pass."""
    wall, cpu = {n: float("inf") for n in SIZES}, {n: float("inf") for n in SIZES}
    for attempt in range(repeats + 1):
        for n in SIZES:
            w, c = time.perf_counter(), time.process_time()
            run(n)
            w, c = time.perf_counter() - w, time.process_time() - c
            if attempt:  # the first pass warms up
                wall[n], cpu[n] = min(wall[n], w), min(cpu[n], c)
    return wall, cpu


def profile(run, passes: int = 3) -> dict:
    """{n: {op: share of the forward's CPU time, by the op's own time}} for n in PROFILED."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    shares = {}
    for n in PROFILED:
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(passes):
                run(n)
        ops = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
        total = sum(ops.values()) or 1.0
        shares[n] = {op: t / total for op, t in ops.items()}
    return shares


def one(model_name: str | None, dtype: str, kernels: str, repeats: int, new_tokens: int, context: int = 64,
        profiled: bool = False, caches: bool = False) -> dict:
    """Measure one kernel in this process."""
    import torch
    from transformers.utils import logging

    from triespec.bench.harness import model_path
    from triespec.kernels import set_kernels
    from triespec.loading import load

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    t0 = time.perf_counter()
    model, tokenizer = load(model_path(model_name, log=lambda line: None), dtype=dtype)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t1 = time.perf_counter()
    ran = set_kernels(model, kernels)
    switch = time.perf_counter() - t1
    with torch.inference_mode():
        run = forwarder(model, context)
        wall, cpu = forward_times(run, repeats)
        shares = profile(run) if profiled else None
        cached = cache_times(model, context, repeats) if caches and kernels == "packed" else None
        ids = torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog. " * 4)["input_ids"]])
        t2 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens)
        gen = time.perf_counter() - t2
    return {"kernels": ran, "seconds": wall, "cpu_seconds": cpu, "load_s": round(t1 - t0, 1), "switch_s": round(switch, 2),
            "generate_tok_s": round((out.shape[1] - ids.shape[1]) / gen, 2), "rss_loaded_mb": round(loaded),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "tokens": out[0, ids.shape[1]:].tolist(), "profile": shares, "caches": cached}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a name from `triespec models`, a folder or .gguf (default: SmolLM2-135M)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated for the tokens/s column")
    parser.add_argument("--context", type=int, default=64, help="cached tokens before each timed forward")
    parser.add_argument("--profile", action="store_true", help="also break forwards of 1 and 16 tokens down by op")
    parser.add_argument("--caches", action="store_true",
                        help="also time the engine's cache against DynamicCache on packed kernels")
    parser.add_argument("--one", choices=["torch", "packed"], help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.context < 1:
        parser.error(f"--context must be >= 1, got {args.context}")
    if args.one:
        print(json.dumps(one(args.model, args.dtype, args.one, args.repeats, args.new_tokens, args.context,
                             args.profile, args.caches)))
        return
    rows = []
    for kernels in ("torch", "packed"):
        cmd = [sys.executable, __file__, "--dtype", args.dtype, "--repeats", str(args.repeats),
               "--new-tokens", str(args.new_tokens), "--context", str(args.context), "--one", kernels] \
            + (["--model", args.model] if args.model else []) + (["--profile"] if args.profile else []) \
            + (["--caches"] if args.caches else [])
        done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if done.returncode:
            raise SystemExit(done.stderr)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{args.model or 'SmolLM2-135M-Instruct'}, {args.dtype}: ms per forward after {args.context} cached tokens "
          f"(best of {args.repeats}) by tokens fed, wall clock and CPU time (both threads); greedy "
          f"model.generate tokens/s; peak RSS; load average {os.getloadavg()[0]:.1f}\n")
    print("| kernels | clock | " + " | ".join(map(str, SIZES)) + " | 8 / 1 | 16 / 1 | generate tok/s | "
          "peak RSS MB | packing s |")
    print("|---|---|" + "---:|" * (len(SIZES) + 5))
    for r in rows:
        for clock, key in (("wall", "seconds"), ("cpu", "cpu_seconds")):
            s = {int(n): t for n, t in r[key].items()}
            extra = f"{r['generate_tok_s']} | {r['peak_rss_mb']} | {r['switch_s']}" if clock == "wall" else " | |"
            print(f"| {r['kernels']} | {clock} | " + " | ".join(f"{1000 * s[n]:.0f}" for n in SIZES)
                  + f" | {s[8] / s[1]:.2f} | {s[16] / s[1]:.2f} | {extra} |")
    same = rows[0]["tokens"] == rows[1]["tokens"]
    print(f"\ngreedy output of model.generate identical on both kernels ({args.new_tokens} tokens): {same}")
    for r in rows if args.profile else []:
        print(f"\n{r['kernels']}: share of a forward's CPU time by op, after {args.context} cached tokens\n")
        print("| op | " + " | ".join(f"{n} token{'s' * (n > 1)}" for n in PROFILED) + " |")
        print("|---|" + "---:|" * len(PROFILED))
        shares = [r["profile"][str(n)] for n in PROFILED]
        top = sorted(set().union(*shares), key=lambda op: -max(s.get(op, 0.0) for s in shares))[:6]
        for op in top:
            print(f"| {op} | " + " | ".join(f"{100 * s.get(op, 0.0):.1f}%" for s in shares) + " |")
        print("| other | " + " | ".join(f"{100 * (1 - sum(s.get(op, 0.0) for op in top)):.1f}%" for s in shares) + " |")

    for r in rows:
        if r["caches"]:
            print(f"\n{r['kernels']} kernels: ms per forward after {args.context} cached tokens, appending to "
                  "transformers' DynamicCache and to the engine's cache, interleaved (medians)\n")
            print("| tokens fed | DynamicCache | engine's cache | ratio | logits identical |")
            print("|---:|---:|---:|---:|---|")
            for n, (dynamic, engine, same) in r["caches"].items():
                print(f"| {n} | {1000 * dynamic:.1f} | {1000 * engine:.1f} | {engine / dynamic:.3f} | {same} |")


if __name__ == "__main__":
    main()
