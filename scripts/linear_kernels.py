"""Micro-benchmark: each linear shape of a model, fed M = 1..32 rows, on torch's kernel
(`F.linear`) and on oneDNN with the weight packed once (`triespec.kernels`); a markdown
table of milliseconds per call (the fastest of --repeats), the largest difference
between the two, and whether a row's packed result is bit-identical alone and among
the other rows. Random weights of the model's shapes: nothing is downloaded.

    python scripts/linear_kernels.py --model smollm2-135m --dtype float32
    python scripts/linear_kernels.py --model path/to/folder_with_config.json --dtype bfloat16
    python scripts/linear_kernels.py --clock cpu    # CPU time: on a machine shared with other load

Run it alone: the other load of a shared machine moves every figure.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from triespec.kernels import pack_weight, packed_linear, unavailable

# hidden, intermediate, attention heads x head size, kv heads x head size, vocabulary, tied output
PRESETS = {
    "smollm2-135m": dict(hidden=576, intermediate=1536, q=9 * 64, kv=3 * 64, vocab=49152, tied=True),
    "qwen2.5-coder-0.5b": dict(hidden=896, intermediate=4864, q=14 * 64, kv=2 * 64, vocab=151936, tied=False),
    "qwen2.5-coder-1.5b": dict(hidden=1536, intermediate=8960, q=12 * 128, kv=2 * 128, vocab=151936, tied=False),
}
ROWS = (1, 2, 4, 8, 16, 32)


def shapes(model: str) -> dict:
    if model in PRESETS:
        p = PRESETS[model]
    else:
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(model).get_text_config()
        head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        p = dict(hidden=c.hidden_size, intermediate=c.intermediate_size, q=c.num_attention_heads * head,
                 kv=c.num_key_value_heads * head, vocab=c.vocab_size, tied=c.tie_word_embeddings)
    h = p["hidden"]
    return {"q_proj": (h, p["q"]), "k_proj, v_proj": (h, p["kv"]), "o_proj": (p["q"], h),
            "gate_proj, up_proj": (h, p["intermediate"]), "down_proj": (p["intermediate"], h),
            "lm_head" + (" (tied)" if p["tied"] else ""): (h, p["vocab"])}


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def best_ms(calls: list, repeats: int, clock=time.perf_counter) -> list[float]:
    """The fastest of `repeats` timings of each call, in milliseconds by `clock`; the calls
    take turns, so that a burst of another process's load falls on all of them alike."""
    for f in calls:
        f()
    best = [float("inf")] * len(calls)
    for _ in range(repeats):
        for i, f in enumerate(calls):
            t = clock()
            f()
            best[i] = min(best[i], clock() - t)
    return [1000 * b for b in best]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help=f"{', '.join(PRESETS)} or a folder with a config.json")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=15, help="best of this many calls per cell")
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                        help="wall: elapsed time; cpu: the process's CPU time, all threads (on a machine "
                             "shared with other load, what the call itself used; ~threads x wall when alone)")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="comma-separated M")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    why = unavailable(dtype)
    if why:
        raise SystemExit(f"packed kernels unavailable: {why}")
    rows = [int(m) for m in args.rows.split(",")]
    g = torch.Generator().manual_seed(0)
    print(f"{args.model}, {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}; {args.clock} ms per call, best of {args.repeats}; "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| layer | K→N | kernel | " + " | ".join(f"M={m}" for m in rows) + " | max abs diff | row alone = among M |")
    print("|---|---|---|" + "---:|" * len(rows) + "---:|---|")
    with torch.inference_mode():
        for name, (k, n) in shapes(args.model).items():
            w = (torch.randn(n, k, generator=g) * 0.02).to(dtype)
            packed = pack_weight(w)
            xs = {m: torch.randn(m, k, generator=g).to(dtype) for m in rows}
            pairs = [best_ms([lambda x=xs[m]: F.linear(x, w), lambda x=xs[m]: packed_linear(x, packed)], args.repeats,
                             CLOCKS[args.clock])
                     for m in rows]
            plain, fast = [a for a, _ in pairs], [b for _, b in pairs]
            diff = max((packed_linear(x, packed).float() - F.linear(x, w).float()).abs().max().item() for x in xs.values())
            x = xs[max(rows)]
            alone = all(torch.equal(packed_linear(x[i:i + 1], packed), packed_linear(x, packed)[i:i + 1])
                        for i in range(x.shape[0]))
            alone_torch = all(torch.equal(F.linear(x[i:i + 1], w), F.linear(x, w)[i:i + 1]) for i in range(x.shape[0]))
            same = f"packed {'yes' if alone else 'NO'}, F.linear {'yes' if alone_torch else 'no'}"
            print(f"| {name} | {k}→{n} | F.linear | " + " | ".join(f"{t:.2f}" for t in plain) + " | | |")
            print("| | | packed | " + " | ".join(f"{t:.2f}" for t in fast) + f" | {diff:.1e} | {same} |", flush=True)


if __name__ == "__main__":
    main()
