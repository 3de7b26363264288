"""Load on the server: N concurrent streaming chat clients, with speculation and without.

Starts a server on 127.0.0.1 twice over the same model (a TrieDrafter engine, then a
NoDraft one), sends the same requests to each with the `openai` client, checks that
every answer is complete and the same on both, and prints throughput and the ratio.
`--rounds 2` sends the load twice: the second round is drafted from what the shared
trie learned in the first (the server's intended steady state).

    python scripts/serve_load.py --clients 32 --tokens 64 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import openai

from triespec import Engine, NoDraft
from triespec.loading import default_model_path, load
from triespec.server import create_app, serving

QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "Write a haiku about the sea.",
    "What is 12 times 12?", "Give one tip for learning to code.", "What do bees make?",
    "Why is the sky blue? Answer briefly.", "Say hello in Spanish.", "List the planets of the solar system.",
    "What is photosynthesis?", "Translate 'good morning' into French.", "Explain recursion in one sentence.",
]


async def _one(client, name, question, tokens):
    text = []
    stream = await client.chat.completions.create(model=name, messages=[{"role": "user", "content": question}],
                                                  max_tokens=tokens, temperature=0, stream=True,
                                                  stream_options={"include_usage": True})
    usage = None
    async for chunk in stream:
        text += [c.delta.content or "" for c in chunk.choices]
        usage = chunk.usage or usage
    return "".join(text), usage.completion_tokens


async def _load(url, name, jobs, tokens):
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=3600) as client:
        return await asyncio.gather(*(_one(client, name, q, tokens) for q in jobs))


def run(engine: Engine, jobs: list[str], tokens: int, rounds: int) -> list[dict]:
    out = []
    with serving(create_app(engine, "model", max_batch=len(jobs))) as url:
        for _ in range(rounds):
            t0 = time.perf_counter()
            answers = asyncio.run(_load(url, "model", jobs, tokens))
            seconds = time.perf_counter() - t0
            made = sum(n for _, n in answers)
            out.append({"seconds": round(seconds, 2), "tokens": made, "tokens_per_second": round(made / seconds, 1),
                        "answers": [a for a, _ in answers]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--decoding-length", type=int, default=8)
    parser.add_argument("--branch-length", type=int, default=6)
    args = parser.parse_args()
    model, tokenizer = load(args.model or default_model_path(), dtype=args.dtype)
    jobs = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.clients)]
    spec = run(Engine(model, tokenizer, decoding_length=args.decoding_length, branch_length=args.branch_length),
               jobs, args.tokens, args.rounds)
    plain = run(Engine(model, tokenizer, drafter=NoDraft()), jobs, args.tokens, args.rounds)
    for r, (s, p) in enumerate(zip(spec, plain), 1):
        same = s["answers"] == p["answers"]
        print(json.dumps({"round": r, "clients": args.clients, "max_tokens": args.tokens, "identical": same,
                          "speculative_tokens_per_second": s["tokens_per_second"],
                          "plain_tokens_per_second": p["tokens_per_second"],
                          "ratio": round(s["tokens_per_second"] / p["tokens_per_second"], 2)}))
        if not same:
            raise SystemExit("answers differ between the speculative and the plain server")


if __name__ == "__main__":
    main()
