"""First speed figure: triespec against plain `model.generate`, same prompts, same process.

    python scripts/speed.py [--model PATH] [--dtype bfloat16] [--max-new-tokens 128]

Methods are interleaved prompt by prompt after a warm-up, so machine drift hits both
alike; the figure that counts is the ratio. Each prompt runs twice through one engine:
the second run shows what the memory trie adds when a similar request comes again.
(The full benchmark with real data sets and peers is `triespec bench`, its own issue.)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from triespec import Engine
from triespec.loading import default_model_path, load

PASSAGE = (
    "Photosynthesis is the process by which green plants, algae and some bacteria convert light energy "
    "into chemical energy. During photosynthesis, light energy is captured by chlorophyll and used to "
    "convert water and carbon dioxide into glucose and oxygen. The process takes place mainly in the "
    "chloroplasts of leaf cells. The light-dependent reactions occur in the thylakoid membranes, where "
    "water is split and oxygen is released. The light-independent reactions, known as the Calvin cycle, "
    "take place in the stroma, where carbon dioxide is fixed into sugars."
)
CODE = '''def moving_average(values, window):
    if window <= 0:
        raise ValueError("window must be positive")
    result = []
    for i in range(len(values) - window + 1):
        result.append(sum(values[i:i + window]) / window)
    return result
'''
PROMPTS = {
    "summarise": f"{PASSAGE}\n\nSummarise the passage above in three sentences.",
    "passage-qa": f"{PASSAGE}\n\nWhere do the light-independent reactions take place, and what happens there?",
    "code-edit": f"{CODE}\nRewrite this function to add a docstring and type hints.",
    "open": "Give three tips for staying focused while studying.",
}


def plain_generate(model, ids, max_new_tokens):
    start = time.perf_counter()
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, len(ids):].tolist(), time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--decoding-length", type=int, default=32)
    parser.add_argument("--branch-length", type=int, default=12)
    parser.add_argument("--min-score", type=float, default=0.0)
    parser.add_argument("--adaptive", action="store_true", help="cut each tree to the size that pays (experimental)")
    args = parser.parse_args()

    model, tokenizer = load(args.model or default_model_path(), dtype=args.dtype)
    engine = Engine(model, tokenizer, decoding_length=args.decoding_length, branch_length=args.branch_length,
                    min_score=args.min_score, adaptive=args.adaptive)
    warm = engine.encode([{"role": "user", "content": "Hello"}])
    plain_generate(model, warm, 8)
    Engine(model, tokenizer).generate(warm, max_new_tokens=8)

    print(f"model {args.model or 'SmolLM2-135M-Instruct'}  dtype {args.dtype}  torch threads {torch.get_num_threads()}  "
          f"decoding_length {args.decoding_length}  branch_length {args.branch_length}  min_score {args.min_score}  "
          f"adaptive {args.adaptive}")
    print(f"{'prompt':<12} {'run':<6} {'tokens':>6} {'plain tok/s':>11} {'triespec tok/s':>14} {'speedup':>8} "
          f"{'tokens/step':>11} {'same':>5}")
    totals = {"plain": 0.0, "first": 0.0, "second": 0.0, "tokens": 0}
    ratios = {"first": [], "second": []}
    for name, text in PROMPTS.items():
        ids = engine.encode([{"role": "user", "content": text}])
        for run in ("first", "second"):
            expected, plain_time = plain_generate(model, ids, args.max_new_tokens)
            result = engine.generate(ids, max_new_tokens=args.max_new_tokens)
            n = len(expected)
            speedup = plain_time / result.stats.total_time
            ratios[run].append(speedup)
            totals[run] += result.stats.total_time
            totals["plain"] += plain_time / 2
            totals["tokens"] += n / 2
            same = result.token_ids == expected
            print(f"{name:<12} {run:<6} {n:>6} {n / plain_time:>11.1f} {result.stats.tokens_per_second:>14.1f} "
                  f"{speedup:>7.2f}x {result.stats.mean_tokens_per_step:>11.2f} {str(same):>5}")
    for run in ("first", "second"):
        print(f"aggregate {run}: {totals['plain'] / totals[run]:.2f}x "
              f"(median per prompt {statistics.median(ratios[run]):.2f}x)")


if __name__ == "__main__":
    main()
