"""Command line: `triespec generate [PROMPT]`."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="triespec", description="Lossless speculative generation")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate text from a prompt (stdin when omitted)")
    gen.add_argument("prompt", nargs="?", help="the prompt; read from stdin when omitted")
    gen.add_argument("--model", help="hub id, local folder or .gguf file (default: SmolLM2-135M-Instruct)")
    gen.add_argument("--dtype", default="float32", help="float32 (exact), bfloat16 (fast on CPUs with AMX), float16, auto")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--decoding-length", type=int, default=32, help="most draft tokens verified per step")
    gen.add_argument("--branch-length", type=int, default=12, help="deepest draft branch")
    gen.add_argument("--mode", default="hierarchical", choices=["hierarchical", "parallel", "single"])
    gen.add_argument("--adaptive", action="store_true",
                     help="experimental: cut each draft to the size that pays on this machine (measured at start)")
    gen.add_argument("--draft-model", action="append", metavar="PATH",
                     help="small model with the same tokenizer, drafting token trees (repeatable)")
    gen.add_argument("--drafter", choices=["trie", "model", "hybrid"],
                     help="where drafts come from (default: trie; hybrid with --draft-model)")
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--temperature", type=float, help="sample at this temperature (default and 0: greedy)")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--min-p", type=float)
    gen.add_argument("--repetition-penalty", type=float)
    gen.add_argument("--seed", type=int, help="makes sampling reproducible")
    gen.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
    gen.add_argument("--json", action="store_true", help="print text, token ids and stats as one JSON object")
    args = parser.parse_args(argv)

    try:
        return _generate(args)
    except ValueError as e:
        print(f"triespec: error: {e}", file=sys.stderr)
        return 2


def _generate(args) -> int:
    from .engine import Engine
    from .loading import default_model_path

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise ValueError("prompt is empty")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    _quiet_transformers()
    drafting = dict(draft_model=args.draft_model, drafter=args.drafter)
    if (args.drafter or ("hybrid" if args.draft_model else "trie")) != "model":  # trie settings
        drafting.update(decoding_length=args.decoding_length, branch_length=args.branch_length, mode=args.mode)
    engine = Engine.from_pretrained(
        args.model or default_model_path(),
        dtype=args.dtype,
        adaptive=args.adaptive,
        **drafting,
    )
    chat = not args.raw and getattr(engine.tokenizer, "chat_template", None)
    request = [{"role": "user", "content": prompt}] if chat else prompt
    sampling = {name: getattr(args, name) for name in ("top_k", "top_p", "min_p", "repetition_penalty", "seed")
                if getattr(args, name) is not None}
    sampling["do_sample"] = bool(args.temperature)  # 0 means greedy, as in OpenAI's API
    if args.temperature:
        sampling["temperature"] = args.temperature
    if args.json:
        result = engine.generate(request, max_new_tokens=args.max_new_tokens, stop=args.stop, **sampling)
        print(json.dumps({"text": result.text, "token_ids": result.token_ids,
                          "finish_reason": result.finish_reason, "stats": result.stats.as_dict()}))
    else:
        pieces = engine.stream(request, max_new_tokens=args.max_new_tokens, stop=args.stop, **sampling)
        for piece in pieces:
            print(piece, end="", flush=True)
        print()
        s = pieces.result().stats
        print(f"[{s.new_tokens} tokens, {s.steps} steps, {s.mean_tokens_per_step:.2f} tokens/step, "
              f"{s.tokens_per_second:.1f} tokens/s]", file=sys.stderr)
    return 0


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
