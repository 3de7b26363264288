"""Command line: `triespec generate [PROMPT]`, `serve`, `warm CORPUS`, `bench`, `models`."""

from __future__ import annotations

import argparse
import json
import sys

# `--drafter`: drafters.DRAFTERS less 'none' (kept here so that --help imports no torch; a test
# checks the two agree)
DRAFTER_CHOICES = ("trie", "model", "hybrid", "suffix", "lookup")
# TrieDrafter's defaults, for --help without torch (a test checks they agree)
DECODING_LENGTH, BRANCH_LENGTH = 32, 24


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv  # the bench report quotes its command
    try:
        return getattr(args, "run", _generate)(args)
    except ValueError as e:
        print(f"triespec: error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triespec", description="Lossless speculative generation")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate text from a prompt (stdin when omitted)")
    gen.add_argument("prompt", nargs="?", help="the prompt; read from stdin when omitted")
    gen.add_argument("--model", help="hub id, local folder or .gguf file (default: SmolLM2-135M-Instruct)")
    gen.add_argument("--dtype", default="float32", help="float32 (exact), bfloat16 (fast on CPUs with AMX), float16, auto")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--decoding-length", type=int, default=DECODING_LENGTH,
                     help="most draft tokens verified per step")
    gen.add_argument("--branch-length", type=int, default=BRANCH_LENGTH, help="deepest draft branch")
    gen.add_argument("--mode", default="hierarchical", choices=["hierarchical", "parallel", "single"])
    gen.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True,
                     help="cut each draft to the size that pays on this machine (default; --no-adaptive "
                          "verifies --decoding-length tokens every step)")
    gen.add_argument("--draft-model", action="append", metavar="PATH",
                     help="small model with the same tokenizer, drafting token trees (repeatable)")
    gen.add_argument("--drafter", choices=DRAFTER_CHOICES,
                     help="where drafts come from (default: trie; hybrid with --draft-model; suffix: "
                          "SuffixDecoding's cache, needs arctic-inference; lookup: transformers' prompt lookup)")
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--temperature", type=float, help="sample at this temperature (default and 0: greedy)")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--min-p", type=float)
    gen.add_argument("--repetition-penalty", type=float)
    gen.add_argument("--seed", type=int, help="makes sampling reproducible")
    gen.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
    gen.add_argument("--json", action="store_true", help="print text, token ids and stats as one JSON object")
    _budget_cache_arguments(gen)
    _kernels_argument(gen)
    bench = commands.add_parser("bench", help="benchmark methods x workloads side by side (see docs/benchmarks.md)",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_methods_help())
    bench.add_argument("--model", help="a name from `triespec models`, hub id, folder or .gguf (default: SmolLM2)")
    bench.add_argument("--dtype", default="float32")
    bench.add_argument("--draft-model", help="draft model for assisted, model and hybrid methods")
    bench.add_argument("--workloads", help="comma-separated (default: code,chat,summarize,qa,open)")
    bench.add_argument("--methods", help="comma-separated method specs (default: see below)")
    bench.add_argument("--n", type=int, help="eval tasks per workload (default 5; --quick: 2)")
    bench.add_argument("--warm-n", type=int, help="warm-split tasks per workload (default: --n)")
    bench.add_argument("--max-new-tokens", type=int, default=128)
    bench.add_argument("--quick", action="store_true", help="2 tasks per workload: minutes, not hours")
    bench.add_argument("--out", default="bench-results", help="folder for results.json, results.md and plots")
    bench.add_argument("--kernels", default="auto", choices=["auto", "torch", "packed"],
                       help="the kernels triespec's methods run on (default auto: the faster here, timed at the "
                            "start); plain, prompt-lookup and assisted always run on torch's, plain-packed on packed")
    bench.set_defaults(run=_bench)
    models = commands.add_parser("models", help="list the benchmark models, or fetch them (`models fetch NAME...`)")
    models.add_argument("action", nargs="?", choices=["list", "fetch"], default="list")
    models.add_argument("names", nargs="*", help="models to fetch: the GGUF file, verified, and its dense fp32 copy")
    models.set_defaults(run=_models)
    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server with a shared, persistent trie")
    serve.add_argument("--model", help="hub id, local folder or .gguf file (default: SmolLM2-135M-Instruct)")
    serve.add_argument("--model-name", help="the name clients ask for (default: the hub id, or the local "
                                            "file's or folder's name without .gguf)")
    serve.add_argument("--dtype", default="float32")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="answer 401 to requests without 'Authorization: Bearer KEY'")
    serve.add_argument("--decoding-length", type=int, default=DECODING_LENGTH,
                     help="most draft tokens verified per step")
    serve.add_argument("--branch-length", type=int, default=BRANCH_LENGTH, help="deepest draft branch")
    serve.add_argument("--no-draft", action="store_true", help="plain decoding (for comparison)")
    serve.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True,
                       help="cut each row's draft to what pays given the whole batch (default; --no-adaptive "
                            "verifies --decoding-length tokens per row every step)")
    serve.add_argument("--max-batch", type=int, default=32, help="most requests in one forward pass")
    serve.add_argument("--max-queue", type=int, default=64, help="most requests waiting; more get 429")
    serve.add_argument("--trie", help="file the trie is loaded from at start and saved to (.npz)")
    serve.add_argument("--save-interval", type=float, default=300.0, help="seconds between trie saves")
    serve.add_argument("--warm-from", help="JSONL corpus of past prompts and answers to fill the trie with")
    scale = serve.add_argument_group("scale out on Ray Serve (pip install triespec[ray])")
    scale.add_argument("--replicas", type=int, help="engine replicas behind the same app, sharing one memory of "
                                                    "answers (Ray Serve; without it, one process and no Ray)")
    scale.add_argument("--ray-address", help="join this Ray cluster (e.g. HOST:6379, as `ray start --head` "
                                             "prints) instead of starting one on this machine")
    scale.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs Ray reserves per replica "
                                                                            "(fractions allowed)")
    scale.add_argument("--sync-interval", type=float, default=2.0,
                       help="seconds between a replica's pushes of its answers to the shared memory and pulls of "
                            "the merged one")
    scale.add_argument("--max-nodes", type=int, default=500_000, help="node budget of the memory trie")
    _budget_cache_arguments(serve)
    _kernels_argument(serve)
    warm = commands.add_parser("warm", help="fill a trie file from a JSONL corpus of past prompts and answers")
    warm.add_argument("corpus", help='JSON Lines: {"prompt", "completion"}, {"messages"} or {"text"} per line')
    warm.add_argument("--trie", required=True, help="trie file (.npz) to add to (created if missing)")
    warm.add_argument("--model", help="the model whose tokenizer the trie is for (default: SmolLM2-135M-Instruct)")
    warm.add_argument("--branch-length", type=int, default=BRANCH_LENGTH, help="as the server will use it")
    serve.set_defaults(run=_serve)
    warm.set_defaults(run=_warm)
    return parser


def _generate(args) -> int:
    from .engine import Engine
    from .loading import default_model_path

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise ValueError("prompt is empty")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    _quiet_transformers()
    _notices()
    drafting = dict(draft_model=args.draft_model, drafter=args.drafter)
    if (args.drafter or ("hybrid" if args.draft_model else "trie")) in ("trie", "hybrid"):  # trie settings
        drafting.update(decoding_length=args.decoding_length, branch_length=args.branch_length, mode=args.mode)
    engine = Engine.from_pretrained(
        args.model or default_model_path(),
        dtype=args.dtype,
        adaptive=args.adaptive,
        budget_cache=_budget_cache(args),
        kernels=args.kernels,
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


def _bench(args) -> int:
    import shlex

    from .bench import harness, report

    config = harness.Config(
        model=args.model,
        dtype=args.dtype,
        draft_model=args.draft_model,
        n=args.n or (2 if args.quick else 5),
        n_warm=args.warm_n,
        max_new_tokens=args.max_new_tokens,
        **({"workloads": _csv(args.workloads)} if args.workloads else {}),
        methods=_csv(args.methods) if args.methods else None,
        kernels=args.kernels,
    )
    harness.check(config)  # before loading anything
    _quiet_transformers()
    results = harness.run(config, log=lambda msg: print(msg, file=sys.stderr))
    command = "triespec " + shlex.join(sys.argv[1:] if args.argv is None else args.argv)
    paths = report.write(results, args.out, command)
    print(paths["markdown"].read_text())
    print(f"written: {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 0


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _methods_help() -> str:
    from .bench import methods

    return (methods.__doc__.split("\n\n", 1)[1] + "\ndefault methods: " + ", ".join(methods.DEFAULT)
            + " (+ " + ", ".join(methods.WITH_DRAFT_MODEL) + " with --draft-model)")


def _models(args) -> int:
    from .bench import models

    if args.action == "list":
        if args.names:
            raise ValueError("`models list` takes no names; did you mean `models fetch NAME...`?")
        for name, spec in models.MODELS.items():
            s = models.status(name)
            gguf = (f"cached {s.size / 1e9:.2f} GB" if s.gguf else
                    f"not fetched ({s.size / 1e9:.2f} GB)" if s.size else "not installed")
            dense = f"dense {models.dense_size(s.dense) / 1e9:.2f} GB" if s.dense else "no dense copy"
            print(f"{name:20} {gguf:24} {dense:20} {spec.description}")
        return 0
    if not args.names:
        raise ValueError(f"name the models to fetch: {', '.join(models.MODELS)}")
    for name in args.names:  # check every name before the first long download
        models.spec(name)
    _quiet_transformers()
    for name in args.names:
        print(f"{name}: {models.dense(name, log=lambda line: print(line, file=sys.stderr))}")
    return 0


def _serve(args) -> int:
    import logging
    from pathlib import Path

    import uvicorn

    from .loading import default_model_path
    from .server import create_app

    if args.warm_from and not Path(args.warm_from).is_file():
        raise ValueError(f"--warm-from {args.warm_from}: no such file")
    _quiet_transformers()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = args.model or default_model_path()
    local = Path(path.rstrip("/"))
    # a hub id as given; a local file or folder by its name (without .gguf)
    name = args.model_name or ((local.stem if local.suffix == ".gguf" else local.name) if local.exists() else path)
    if args.replicas is not None:
        return _serve_replicas(args, path, name)
    if args.ray_address:
        raise ValueError("--ray-address needs --replicas")
    engine = _serving_engine(args, path)
    app = create_app(engine, name, api_key=args.api_key, max_batch=args.max_batch, max_queue=args.max_queue,
                     trie_path=args.trie, save_interval=args.save_interval, warm_from=args.warm_from)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def _serve_replicas(args, path: str, name: str) -> int:
    """`serve --replicas N`: Ray Serve replicas, one shared memory; runs until Ctrl-C."""
    import signal
    import threading

    if args.warm_from:
        raise ValueError("--warm-from is not taken with --replicas: fill the trie file first with "
                         "`triespec warm CORPUS --trie FILE`, then serve it with --trie FILE")
    try:
        from .scale import ScaleConfig, start, stop
    except ImportError as e:
        raise ValueError(f"--replicas needs Ray Serve: pip install 'triespec[ray]' ({e})") from e
    engine = dict(model=path, dtype=args.dtype, no_draft=args.no_draft)
    if not args.no_draft:
        engine.update(decoding_length=args.decoding_length, branch_length=args.branch_length, adaptive=args.adaptive,
                      budget_cache=_budget_cache(args), max_nodes=args.max_nodes)
    config = ScaleConfig(args.replicas, engine,
                         dict(model_name=name, api_key=args.api_key, max_batch=args.max_batch, max_queue=args.max_queue),
                         cpus_per_replica=args.cpus_per_replica, trie=args.trie, save_interval=args.save_interval,
                         sync_interval=args.sync_interval, max_nodes=args.max_nodes)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    memory = start(config, host=args.host, port=args.port, ray_address=args.ray_address)
    print(f"triespec: {args.replicas} replicas serving at http://{args.host}:{args.port} "
          "(GET /health shows them); Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        done.wait()
    finally:
        import ray
        from ray import serve

        stop(memory, config.app_name)
        if not args.ray_address:  # Serve and Ray were ours: end them; a cluster's stay up
            serve.shutdown()
        ray.shutdown()
    return 0


def _serving_engine(args, path):
    from .drafters import NoDraft
    from .engine import Engine
    from .loading import load

    if args.no_draft:
        model, tokenizer = load(path, dtype=args.dtype)
        return Engine(model, tokenizer, drafter=NoDraft(), adaptive=False, budget_cache=_budget_cache(args),
                      kernels=args.kernels)
    return Engine.from_pretrained(path, dtype=args.dtype, decoding_length=args.decoding_length,
                                  branch_length=args.branch_length, adaptive=args.adaptive,
                                  budget_cache=_budget_cache(args), kernels=args.kernels)


def _budget_cache_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--budget-cache", metavar="DIR",
                       help="folder the adaptive budget (cost curve, calibration) is kept in between runs "
                            "(default: $TRIESPEC_CACHE/budget, ~/.cache/triespec/budget)")
    where.add_argument("--no-budget-cache", action="store_true",
                       help="keep no budget between runs: time the model at every start")


def _kernels_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kernels", default="auto", choices=["auto", "torch", "packed"],
                        help="what the model's linear layers run on: torch's kernels, oneDNN on weights packed "
                             "once (CPU), or auto (default): the faster here, timed once and kept with the budget")


def _budget_cache(args) -> str | bool:
    return False if args.no_budget_cache else args.budget_cache or True


def _warm(args) -> int:
    from pathlib import Path

    from .engine import Engine
    from .loading import default_model_path, load
    from .persist import fingerprint, load_calibration, load_trie, save_trie, warm

    if not Path(args.corpus).is_file():
        raise ValueError(f"{args.corpus}: no such file")
    _quiet_transformers()
    model, tokenizer = load(args.model or default_model_path(), dtype="float32")
    engine = Engine(model, tokenizer, branch_length=args.branch_length, adaptive=False, kernels="torch")  # it only learns
    fp = fingerprint(tokenizer, engine.vocab_size)
    calibration = None
    if Path(args.trie).exists():
        engine.drafter.memory = load_trie(args.trie, fp, engine.drafter.memory.max_nodes)
        calibration = load_calibration(args.trie)  # a server's learned budget: kept as it was
    count = warm(engine, args.corpus)
    size = save_trie(engine.drafter.memory, args.trie, fp, calibration)
    print(f"learned {count} answers; {args.trie}: {len(engine.drafter.memory)} nodes, {size} bytes", file=sys.stderr)
    return 0


def _notices() -> None:
    """triespec's own notices on stderr, as bare lines: a first start says what it times
    and which kernels it chose (a start with the budget saved says nothing)."""
    import logging

    logger = logging.getLogger("triespec")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
