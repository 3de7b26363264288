"""The shared memory's load as it grows (scale.SharedMemory, in this process, no Ray):
what a replica sends per push, what learning it costs the memory, and what a snapshot
costs at several sizes: its bytes, the CPU ms to make it (at most once per half sync
interval, for every replica), to load it on a replica (unflatten, off the replica's
decoding thread) and to save it to the `--trie` file.

The answers are text a server might produce: the Python standard library's sources
(code and docstrings) cut into answers of `--answer-tokens` tokens by SmolLM2's
tokenizer, learned as n-grams of `serve`'s default branch length, pushed `--batch` answers at a time, as a replica pushes what it finished in
one sync interval. Prints a table and JSON.

    python scripts/memory_load.py --max-nodes 500000
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import sysconfig
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from triespec.cli import BRANCH_LENGTH
from triespec.persist import unflatten, write_arrays
from triespec.scale import SharedMemory

FP = "vocab=49152:sha256=memory-load"


def answers(tokens: int, total: int):
    """(prompt tail, answer ids) pairs from the standard library's sources."""
    from transformers import AutoTokenizer

    from triespec.loading import default_model_path, dense_copy

    tokenizer = AutoTokenizer.from_pretrained(dense_copy(Path(default_model_path())))
    ids: list[int] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        ids += tokenizer.encode(path.read_text(errors="replace"))
        if len(ids) >= total:
            break
    return [(ids[i - 2 : i], ids[i : i + tokens]) for i in range(2, len(ids) - tokens, tokens)]


def ms(f, repeat: int = 3):
    """The best of `repeat` CPU times of f() (this process's, so that other work on the
    machine does not count), in ms, and its result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        t = time.process_time()
        result = f()
        best = min(best, time.process_time() - t)
    return round(1000 * best, 2), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-nodes", type=int, default=500_000, help="the memory's bound (serve's default)")
    parser.add_argument("--branch-length", type=int, default=BRANCH_LENGTH,
                        help="the n-grams' length, as `serve --branch-length` (its default)")
    parser.add_argument("--answer-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4, help="answers per push")
    parser.add_argument("--tokens", type=int, default=150_000, help="tokens of text to push in all")
    parser.add_argument("--at", default="10000,30000,100000,300000,490000",
                        help="node counts at which a snapshot is measured (and at the end)")
    args = parser.parse_args()

    pool = answers(args.answer_tokens, args.tokens)
    memory = SharedMemory(max_nodes=args.max_nodes, branch_length=args.branch_length)
    checkpoints = sorted(int(n) for n in args.at.split(",") if int(n) < args.max_nodes)
    folder = tempfile.mkdtemp(prefix="memory-load-")
    pushes, snapshots = [], []

    def measure(pushed: int) -> None:
        made_ms, (version, arrays, _) = ms(lambda: (setattr(memory, "_snapshot", None), memory.snapshot())[1])
        load_ms, trie = ms(lambda: unflatten(arrays, args.max_nodes))
        tracemalloc.start()
        held = unflatten(arrays, args.max_nodes)  # a replica's memory trie: Python objects, not the arrays
        trie_mb = round(tracemalloc.get_traced_memory()[0] / 2**20, 1)
        tracemalloc.stop()
        del held
        path = os.path.join(folder, "trie.npz")
        save_ms, size = ms(lambda: write_arrays(arrays, path, FP), repeat=1)
        snapshots.append({"answers": pushed, "nodes": len(trie), "snapshot_bytes": int(sum(a.nbytes for a in arrays)),
                          "pickled_bytes": len(pickle.dumps((version, arrays, None), protocol=5)),
                          "make_ms": made_ms, "load_ms": load_ms, "save_ms": save_ms, "file_bytes": size,
                          "trie_mb": trie_mb})
        print(f"{snapshots[-1]}", file=sys.stderr)

    pushed = 0
    for i in range(0, len(pool), args.batch):
        batch = pool[i : i + args.batch]
        t = time.process_time()
        memory.push("replica", FP, batch)
        pushes.append((len(pickle.dumps(("replica", FP, batch), protocol=5)), time.process_time() - t,
                       sum(len(a) for _, a in batch)))
        pushed += len(batch)
        if checkpoints and len(memory.drafter.memory) >= checkpoints[0]:
            checkpoints = [c for c in checkpoints if c > len(memory.drafter.memory)]
            measure(pushed)
    measure(pushed)

    sent, seconds, tokens = (np.array(column, dtype=float) for column in zip(*pushes))
    per_push = {"answers": args.batch, "answer_tokens": args.answer_tokens, "pushes": len(pushes),
                "bytes_mean": round(sent.mean()), "bytes_per_token": round(sent.sum() / tokens.sum(), 2),
                "learn_ms_median": round(1000 * float(np.median(seconds)), 2),
                "learn_ms_p99": round(1000 * float(np.percentile(seconds, 99)), 2),
                "learn_ms_max": round(1000 * float(seconds.max()), 2),  # a push that pruned the memory to its bound
                "learn_us_per_token": round(1e6 * seconds.sum() / tokens.sum(), 1)}
    print("| nodes | snapshot bytes | make ms | load ms (replica) | save ms | file bytes | trie MB (replica) |\n"
          "|---:|---:|---:|---:|---:|---:|---:|")
    for s in snapshots:
        print(f"| {s['nodes']:,} | {s['snapshot_bytes']:,} | {s['make_ms']} | {s['load_ms']} | {s['save_ms']} | "
              f"{s['file_bytes']:,} | {s['trie_mb']} |")
    print(json.dumps({"max_nodes": args.max_nodes, "branch_length": args.branch_length, "push": per_push,
                      "snapshots": snapshots}, indent=1))


if __name__ == "__main__":
    main()
