"""Throughput of a batch: one triespec batch of N prompts against N sequential plain
`model.generate` calls and N sequential single-prompt triespec calls, same process.

    python scripts/batch_speed.py [--rows 8] [--dtype float32] [--max-new-tokens 96]

Each method gets a fresh engine (an empty trie memory), so no method drafts from
answers another one produced.
"""

from __future__ import annotations

import argparse
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
# answers that copy their prompt (a summary, a question on a passage, a code edit) and ones that cannot
PROMPTS = [
    f"{PASSAGE}\n\nSummarise the passage above in three sentences.",
    f"{PASSAGE}\n\nWhere do the light-independent reactions take place, and what happens there?",
    f"{CODE}\nRewrite this function to add a docstring and type hints.",
    "Give three tips for staying focused while studying.",
]
QUESTIONS = [
    "What is the boiling point of water at sea level?",
    "Name three planets of the solar system.",
    "Explain what a hash table is.",
    "Write a Python function that checks whether a number is prime.",
]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()

    model, tokenizer = load(args.model or default_model_path(), dtype=args.dtype)
    texts = (PROMPTS + QUESTIONS) * (args.rows // 8 + 1)
    prompts = [[{"role": "user", "content": t}] for t in texts[: args.rows]]
    ids = [Engine(model, tokenizer).encode(p) for p in prompts]
    n = args.max_new_tokens

    warm = ids[0][:16]
    model.generate(torch.tensor([warm]), do_sample=False, max_new_tokens=4)
    Engine(model, tokenizer).generate([warm, warm], max_new_tokens=4)

    start = time.perf_counter()
    plain = [model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=n)[0, len(p):].tolist() for p in ids]
    plain_time = time.perf_counter() - start

    engine = Engine(model, tokenizer)
    start = time.perf_counter()
    single = [engine.generate(p, max_new_tokens=n) for p in ids]
    single_time = time.perf_counter() - start

    engine = Engine(model, tokenizer)
    start = time.perf_counter()
    batch = engine.generate(ids, max_new_tokens=n)
    batch_time = time.perf_counter() - start

    tokens = sum(len(t) for t in plain)
    same_single = sum(r.token_ids == t for r, t in zip(single, plain))
    same_batch = sum(r.token_ids == t for r, t in zip(batch, plain))
    print(f"model {args.model or 'SmolLM2-135M-Instruct'}  dtype {args.dtype}  rows {args.rows}  "
          f"max_new_tokens {n}  tokens {tokens}")
    print(f"{'method':<28} {'seconds':>8} {'tokens/s':>9} {'vs plain':>9} {'rows identical':>15}")
    for name, seconds, same in (("plain generate, sequential", plain_time, args.rows),
                                ("triespec, sequential", single_time, same_single),
                                ("triespec, one batch", batch_time, same_batch)):
        print(f"{name:<28} {seconds:>8.1f} {tokens / seconds:>9.1f} {plain_time / seconds:>8.2f}x "
              f"{same:>11}/{args.rows}")


if __name__ == "__main__":
    main()
