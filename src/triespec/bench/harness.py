"""Run methods over workloads with one model, interleaved prompt by prompt.

For each workload: load its eval tasks (and, when a method warms, the warm split and
the model's own answers to it), build every method with a fresh drafter memory (what
the adaptive budget learned carries over, as in one server: `Triespec.carry`), then for
each task and turn run every method in turn, rotating their order from task to task, so
machine drift and order effects fall on all methods alike. Multi-turn tasks carry each
method's own earlier answers. Every call is recorded raw; `summarise` turns records into figures.
"""

from __future__ import annotations

import inspect
import os
import platform
import statistics
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import psutil
import torch

from ..drafters.trie import TrieDrafter
from ..kernels import check as check_kernels, set_kernels
from . import methods as M

# the deepest branch the oracle may accept per step: triespec's default branch length
ORACLE_DEPTH = inspect.signature(TrieDrafter).parameters["branch_length"].default


@dataclass
class Config:
    model: str | None = None  # a name from `triespec models`, a hub id, a folder or a .gguf; None: SmolLM2
    dtype: str = "float32"
    workloads: tuple[str, ...] = ("code", "chat", "summarize", "qa", "open")
    methods: tuple[str, ...] | None = None  # None: methods.DEFAULT (+ WITH_DRAFT_MODEL given a draft model)
    n: int = 5  # eval tasks per workload
    n_warm: int | None = None  # warm tasks per workload (None: n)
    max_new_tokens: int = 128
    draft_model: str | None = None
    kernels: str = "auto"  # what triespec's methods run on (plain: torch's; plain-packed: packed)

    def method_names(self) -> tuple[str, ...]:
        if self.methods:
            return tuple(self.methods)
        return M.DEFAULT + (M.WITH_DRAFT_MODEL if self.draft_model else ())


@dataclass
class Record:
    workload: str
    task: str
    turn: int
    method: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    tokens_per_step: list[int]
    draft_seconds: float
    peak_mb: float  # resident memory above the level before the call
    token_ids: list[int] = field(repr=False)
    fed: list[int] = field(default_factory=list)  # tokens each target forward was fed, the prefill first
    cached: list[int] = field(default_factory=list)  # tokens cached before each target forward
    forward_seconds: list[float] = field(default_factory=list)  # each target forward's wall clock
    curve: list[tuple[int, float]] | None = None  # an adaptive engine's cost curve after the call: (tokens, seconds)
    prompt_ids: list[int] = field(default_factory=list, repr=False)  # what was fed: replays need no data set
    kernels: str = "torch"  # what the model's linear layers ran on (triespec.kernels)


def check(config: Config) -> list[M.Spec]:
    """Validate everything that can be checked before loading a model."""
    from .workloads import WORKLOADS

    if config.n < 1 or (config.n_warm is not None and config.n_warm < 1):
        raise ValueError("n and n_warm must be >= 1")
    if config.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {config.max_new_tokens}")
    check_kernels(config.kernels)
    unknown = [w for w in config.workloads if w not in WORKLOADS]
    if unknown or not config.workloads:
        raise ValueError(f"unknown workloads {unknown}; choose from {', '.join(WORKLOADS)}")
    specs = [M.parse(name) for name in config.method_names()]
    if M.PLAIN not in [s.name for s in specs]:
        raise ValueError("the methods must include 'plain': every speed-up is measured against it")
    if len({s.name for s in specs}) != len(specs):
        raise ValueError("a method is listed twice")
    if any(s.needs_draft_model for s in specs) and not config.draft_model:
        raise ValueError(f"methods {[s.name for s in specs if s.needs_draft_model]} need --draft-model")
    for spec in specs:
        M.check(spec)  # the drafter's settings, before hours of loading and running
    return specs


def run(config: Config, log=print, progress: bool = True) -> dict:
    """Run the benchmark; returns {"config", "machine", "records", "oracle", "summary"}."""
    from tqdm.auto import tqdm

    from . import workloads as W

    specs = check(config)
    model, tokenizer = _load(config.model, config.dtype, log)
    draft = _load(config.draft_model, config.dtype, log)[0] if config.draft_model else None
    chosen = _warm_up(model, tokenizer, config.kernels)  # what triespec's methods run on
    n_warm = config.n_warm or config.n
    plan = {w: W.load(w, config.n, "eval", log=log) for w in config.workloads}
    prompts = [len(chat_prompt(tokenizer, [{"role": "user", "content": t.turns[0]}])) for ts in plan.values() for t in ts]
    # one cost curve per kernels the methods run on: each method's forwards are priced by its own
    curves = {}
    for kernels in sorted({M.kernels_of(s, chosen) for s in specs} | {"torch"}):
        curves[set_kernels(model, kernels)] = cost_curve(model, long_context=max(prompts) + config.max_new_tokens)
    log("kernels: " + ", ".join(f"{s.name} on {M.kernels_of(s, chosen)}" for s in specs))
    total = sum(len(t.turns) for tasks in plan.values() for t in tasks) * len(specs)
    bar = tqdm(total=total, desc="bench", unit="gen", disable=not progress)
    records: list[Record] = []
    oracle: dict[str, dict] = {}
    runners: dict[str, object] = {}
    for workload, tasks in plan.items():
        corpus = []  # the model's own answers to the warm split: what a warmed memory holds
        if any(s.warm for s in specs):
            warm_tasks = W.load(workload, n_warm, "warm", log=log)
            log(f"{workload}: answering {len(warm_tasks)} warm-split tasks to warm the trie")
            corpus = _answers(model, tokenizer, warm_tasks, config.max_new_tokens, config.kernels)
        before, runners = runners, {s.name: M.build(s, model, tokenizer, draft, config.kernels) for s in specs}
        for name, runner in runners.items():
            if name in before:
                runner.carry(before[name])
            runner.prepare(corpus)
        history = {s.name: [] for s in specs}  # (task_id, turn) -> messages, per method
        for i, task in enumerate(tasks):
            order = specs[i % len(specs):] + specs[: i % len(specs)]
            chats = {s.name: [] for s in specs}
            for turn, text in enumerate(task.turns):
                for spec in order:
                    chats[spec.name].append({"role": "user", "content": text})
                    ids = chat_prompt(tokenizer, chats[spec.name])
                    ran = set_kernels(model, runners[spec.name].kernels)  # outside the measured call: it repacks
                    out, peak = _measure(lambda: runners[spec.name].run(ids, config.max_new_tokens))
                    chats[spec.name].append({"role": "assistant", "content": answer_text(tokenizer, out.token_ids)})
                    history[spec.name].append((ids, out.token_ids))
                    records.append(Record(workload, task.id, turn, spec.name, len(ids), len(out.token_ids),
                                          out.seconds, out.tokens_per_step, out.draft_seconds, peak, out.token_ids,
                                          out.fed, out.cached, out.forward_seconds, out.curve, ids,
                                          ran))
                    bar.update()
        oracle[workload] = {
            "cold": copy_oracle(history[M.PLAIN], []),
            "warm": copy_oracle(history[M.PLAIN], corpus),
            # what a drafter that matches at least the last token can reach
            "cold_matched": copy_oracle(history[M.PLAIN], [], context=1),
            "warm_matched": copy_oracle(history[M.PLAIN], corpus, context=1),
        }
    bar.close()
    results = {
        "config": {**asdict(config), "methods": list(config.method_names())},
        "machine": machine(),
        "oracle": oracle,
        "cost_curve": curves["torch"],  # plain's (torch's kernels)
        "cost_curves": curves,  # by kernels
        "records": [asdict(r) for r in records],
    }
    results["summary"] = summarise(results)
    results["comparisons"] = comparisons(results)
    return results


def copy_oracle(generations: list[tuple[list[int], list[int]]], corpus: list[list[int]],
                depth: int = ORACLE_DEPTH, context: int = 0) -> dict:
    """Tokens per step of a perfect retrieval drafter, on the reference outputs.

    At each step it accepts the longest continuation (up to `depth` tokens) that occurs
    anywhere in what a retrieval drafter may read: the prompt, the output so far, the
    earlier outputs of the run and the warm corpus; plus the bonus token. With `context`
    = c, only a continuation that occurs right after the same c tokens as here: what a
    drafter that finds its copy by matching the last tokens (the trie, prompt lookup,
    SuffixDecoding: at least one) can reach at best; 0 also counts a copy entered after
    a token that its first token follows nowhere before, which no such drafter can enter.
    generations: [(prompt ids, output ids)] in run order.
    """
    most = depth + context
    memory: list[set] = [set() for _ in range(most + 1)]  # memory[L]: every L-gram of past outputs

    def read(grams: list[set], ids: list[int]) -> None:
        for L in range(1, most + 1):
            grams[L].update(tuple(ids[i : i + L]) for i in range(len(ids) - L + 1))

    for text in corpus:
        read(memory, text)
    steps = tokens = 0
    for prompt, output in generations:
        seen = [set(g) for g in memory]
        read(seen, prompt)
        full, start = prompt + output, len(prompt)
        i = 0
        while i < len(output):
            at = start + i
            lead = tuple(full[at - context : at]) if at >= context else None
            L = 0
            while (lead is not None and L < depth and i + L < len(output)
                   and lead + tuple(output[i : i + L + 1]) in seen[context + L + 1]):
                L += 1
            advance = min(L + 1, len(output) - i)
            # the output so far becomes readable (with the prompt's end, for n-grams across the seam)
            read(seen, full[max(0, at + advance - (advance + most)) : at + advance])
            i += advance
            steps += 1
        tokens += len(output)
        read(memory, output)
    return {"tokens_per_step": tokens / max(steps, 1), "depth": depth, "context": context}


def cost_curve(model, long_context: int, max_tokens: int = 64, repeats: int = 3, every: int = 33) -> dict:
    """Seconds per forward by tokens fed after 64 cached tokens (each size up to `every`,
    every tree of the default decoding length with its pending token, then doubling), and
    per cached token up to `long_context`, measured once (the fastest of `repeats`): what
    `summarise` prices every method's forwards with, each at its own context."""
    from ..budget import CostModel

    measured = CostModel.measure(model, model.config, max_tokens, repeats=repeats, long_context=long_context,
                                 every=every)
    return {"context": measured.context, "sizes": measured.sizes, "seconds": measured.seconds,
            "long_context": long_context, "per_context": list(measured.per_context)}


def modelled(records: list[dict], curve: dict) -> tuple[float, float] | None:
    """(tokens, seconds) of `records` after their prefill, every forward priced by the
    run's cost curve at its own context and the drafting time as measured: free of the
    machine's load between methods. None if a record did not count its forwards. (Runs
    before 2026-11-27 measured one context, and priced every forward at it.)"""
    if not all(r.get("fed") for r in records):
        return None
    cost = _cost_model(curve)
    tokens = _decoded(records)
    seconds = sum(sum(cost(f, c) for f, c in zip(r["fed"][1:], r.get("cached", [None] * len(r["fed"]))[1:]))
                  + r["draft_seconds"] for r in records)
    return tokens, seconds


def after_prefill(records: list[dict]) -> tuple[float, float] | None:
    """(tokens, seconds) of `records` after their prefill, by the wall clock: the prefill
    is the same forward for every method, and over long prompts its own noise (a 900-token
    prefill takes 3-10 s) outweighed the decoding's differences (qa in fp32: 0.90x plain
    measured with it, 1.06x after it). None for runs before 2026-11-27 (no forward timed)."""
    if not all(r.get("forward_seconds") for r in records):
        return None
    return _decoded(records), sum(r["seconds"] - r["forward_seconds"][0] for r in records)


def _cost_model(curve: dict):
    """The budget.CostModel a run's stored curve describes."""
    from ..budget import CostModel

    return CostModel(curve["sizes"], curve["seconds"], context=curve["context"],
                     per_context=curve.get("per_context", (0.0, 0.0)))


def _decoded(records: list[dict]) -> int:
    """Tokens the records generated after their prefill's (the first forward's) own."""
    return sum(r["new_tokens"] - r["tokens_per_step"][0] for r in records)


def summarise(results: dict) -> dict:
    """Per workload and method: the figures of the report."""
    by_key = _by_method(results["records"])
    # the generations where some method's output was not plain's: in bf16 a method can
    # take another path (rounding), and speeds over different texts are not comparable
    plain_ids = {_gen(r): r["token_ids"] for r in results["records"] if r["method"] == M.PLAIN}
    differ = {_gen(r) for r in results["records"] if r["token_ids"] != plain_ids[_gen(r)]}
    curves = _curves(results)
    summary: dict[str, dict] = {}
    for (workload, method), rows in by_key.items():
        plain = {(r["task"], r["turn"]): r for r in by_key[(workload, M.PLAIN)]}
        tokens = sum(r["new_tokens"] for r in rows)
        seconds = sum(r["seconds"] for r in rows)
        steps = [s for r in rows for s in r["tokens_per_step"]]
        plain_tokens = sum(plain[(r["task"], r["turn"])]["new_tokens"] for r in rows)
        plain_seconds = sum(plain[(r["task"], r["turn"])]["seconds"] for r in rows)
        per_prompt = [_tps(r) / _tps(plain[(r["task"], r["turn"])]) for r in rows]
        same = [r["token_ids"] == plain[(r["task"], r["turn"])]["token_ids"] for r in rows]
        spec = M.parse(method)
        oracles = results["oracle"][workload]
        bound = oracles["warm" if spec.warm else "cold"]["tokens_per_step"]
        matched = oracles.get("warm_matched" if spec.warm else "cold_matched", {}).get("tokens_per_step")
        mean_step = tokens / max(len(steps), 1)
        same_rows = [r for r in rows if _gen(r) not in differ]

        def modelled_speedup(subset: list[dict]) -> float | None:
            if not subset or spec.base in UNPRICED:
                return None
            return _ratio(_priced(subset, "modelled", curves),
                          _priced([plain[(r["task"], r["turn"])] for r in subset], "modelled", curves))

        def decode_speedup(subset: list[dict]) -> float | None:
            return _ratio(after_prefill(subset), after_prefill([plain[(r["task"], r["turn"])] for r in subset]))

        decode_fed = [f for r in rows for f in r.get("fed", [])[1:]]
        intervals = {key: None if figure == "modelled" and spec.base in UNPRICED else _interval(rows, plain, figure, curves)
                     for key, figure in FIGURES.items()}
        summary.setdefault(workload, {})[method] = {
            **{f"{key}_interval": None if i is None else i.as_list() for key, i in intervals.items()},
            "generations": len(rows),
            "tokens": tokens,
            "tokens_per_second": round(tokens / seconds, 3),
            "speedup": round((tokens / seconds) / (plain_tokens / plain_seconds), 3),
            "speedup_median": round(statistics.median(per_prompt), 3),
            "speedup_decode": decode_speedup(rows),
            "tokens_per_step": round(mean_step, 3),
            # the forwards after the prefill: tokens fed to each (1 + the nodes verified, for a tree)
            "fed_per_step": round(statistics.mean(decode_fed), 2) if decode_fed else None,
            "speedup_modelled": modelled_speedup(rows),
            # the same over the generations where every method agreed with plain
            "speedup_modelled_agreed": modelled_speedup(same_rows),
            "agreed_generations": len(same_rows),
            "step_histogram": dict(sorted(Counter(steps).items())),
            "draft_share": round(sum(r["draft_seconds"] for r in rows) / seconds, 3),
            "peak_mb": round(max(r["peak_mb"] for r in rows), 1),
            "agreement": round(sum(same) / len(same), 3),
            "oracle_tokens_per_step": round(bound, 3),
            "oracle_share": _share(mean_step, bound, spec),
            # the same against the oracle that enters a copy only after a matched token (runs
            # before 2026-12-03: none)
            "matched_oracle_tokens_per_step": None if matched is None else round(matched, 3),
            "matched_oracle_share": _share(mean_step, matched, spec),
        }
    return summary


# the figures that get a bootstrap interval over tasks: summary key -> how a record set is priced
FIGURES = {"speedup": "wall", "speedup_decode": "after_prefill", "speedup_modelled": "modelled"}


def _curves(results: dict) -> dict[str, dict]:
    """The run's cost curves by the kernels they were measured on (runs before 2026-12-03
    measured torch's only). Where methods ran on more than one kernels, each curve is
    scaled to what its kernels' forwards took over the whole run (`_level`): each was timed
    once, at the start, and one timing of a shared machine can be a third off the run's
    (torch's one-token forward 187 ms at the start of docs/benchmarks/p27-packed, 280 ms
    in the median of plain's 991), which would price one kernels against the other by
    that moment. Within one kernels a scale cancels, so those runs are priced as timed."""
    curves = results.get("cost_curves") or ({"torch": results["cost_curve"]} if results.get("cost_curve") else {})
    ran = {r.get("kernels", "torch") for r in results["records"]}
    if len(ran) < 2:
        return curves
    scaled = {}
    for kernels, curve in curves.items():
        level = _level([r for r in results["records"] if r.get("kernels", "torch") == kernels], curve)
        scaled[kernels] = {**curve, "seconds": [t * level for t in curve["seconds"]],
                           "per_context": [t * level for t in curve.get("per_context", (0.0, 0.0))]}
    return scaled


def _level(records: list[dict], curve: dict) -> float:
    """The median over `records`' forwards after their prefill of seconds taken / seconds
    the curve prices (1 without any): the methods on one kernels run interleaved with the
    others through the run, so their medians meet the same machine."""
    cost = _cost_model(curve)
    ratios = [taken / cost(fed, cached) for r in records if r.get("forward_seconds") and r.get("cached")
              for taken, fed, cached in zip(r["forward_seconds"][1:], r["fed"][1:], r["cached"][1:])]
    return statistics.median(ratios) if ratios else 1.0


def _priced(records: list[dict], figure: str, curves: dict[str, dict]) -> tuple[float, float] | None:
    """(tokens, seconds) of `records` by one of FIGURES' ways, each record's forwards priced
    by the curve of the kernels it ran on; None where it cannot be had."""
    if figure == "wall":
        return sum(r["new_tokens"] for r in records), sum(r["seconds"] for r in records)
    if figure == "after_prefill":
        return after_prefill(records)
    own = [modelled([r], curves[r.get("kernels", "torch")]) if curves.get(r.get("kernels", "torch")) else None
           for r in records]
    if not own or any(o is None for o in own):
        return None
    return sum(t for t, _ in own), sum(s for _, s in own)


def _per_task(rows: list[dict], figure: str, curves: dict[str, dict]) -> tuple[list, list] | None:
    """Per task (its turns together): tokens and seconds, aligned by task order of `rows`."""
    tasks: dict[str, list[dict]] = {}
    for r in rows:
        tasks.setdefault(r["task"], []).append(r)
    priced = [_priced(records, figure, curves) for records in tasks.values()]
    if any(p is None for p in priced):
        return None
    return [p[0] for p in priced], [p[1] for p in priced]


def _interval(rows: list[dict], plain: dict, figure: str, curves: dict[str, dict]):
    """The bootstrap interval over tasks of `rows`' speed-up over plain's on the same generations."""
    return _paired(_per_task(rows, figure, curves),
                   _per_task([plain[(r["task"], r["turn"])] for r in rows], figure, curves))


def _paired(mine, theirs):
    """ratio_interval of two _per_task results, None where either has none or nothing was
    decoded after the prefill (one-token answers): a finished run's report never fails on it."""
    from .stats import ratio_interval

    if mine is None or theirs is None:
        return None
    try:
        return ratio_interval(mine, theirs)
    except ValueError:
        return None


def comparisons(results: dict, figure: str = "modelled") -> dict[str, list[dict]]:
    """Per workload: each triespec method against each peer in the run (transformers' own
    speculation, SuffixDecoding), the ratio of their speed-ups with a paired bootstrap
    interval over tasks; `real` when the interval excludes 1."""
    curves = _curves(results)
    out: dict[str, list[dict]] = {}
    by_key = _by_method(results["records"])
    for workload in dict.fromkeys(r["workload"] for r in results["records"]):
        names = [m for (w, m) in by_key if w == workload]
        ours = [m for m in names if M.parse(m).base in OURS]
        peers = [m for m in names if m != M.PLAIN and M.parse(m).base not in OURS]
        for method in ours:
            for peer in peers:
                # a method whose draft forwards are not timed cannot be modelled: by the clock instead
                how = "after_prefill" if figure == "modelled" and M.parse(peer).base in UNPRICED else figure
                i = _paired(*(_per_task(by_key[(workload, m)], how, curves) for m in (method, peer)))
                if i is None:
                    continue
                out.setdefault(workload, []).append({"method": method, "peer": peer, "figure": how,
                                                     "ratio": i.as_list(), "real": i.real})
    return out


OURS = ("trie", "model", "hybrid")  # triespec's own drafters; every other method is a peer
# methods whose draft model's forwards are not timed (transformers' assisted generation runs
# them inside generate): their modelled figure would price the target's forwards alone
UNPRICED = ("assisted",)


def _share(tokens_per_step: float, bound: float | None, spec: M.Spec) -> float | None:
    """Accepted draft tokens per step as a share of an oracle's (the bonus token is free);
    only for retrieval: a draft model is not bound by what can be copied."""
    if bound is None or bound <= 1 or spec.needs_draft_model:
        return None
    return round((tokens_per_step - 1) / (bound - 1), 3)


def _by_method(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(workload, method) -> its records, in run order."""
    by_key: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        by_key.setdefault((r["workload"], r["method"]), []).append(r)
    return by_key


def _gen(record: dict) -> tuple[str, str, int]:
    """Which generation a record is, whatever the method."""
    return record["workload"], record["task"], record["turn"]


def _ratio(priced, priced_plain) -> float | None:
    """Tokens per modelled second over plain's, from two `modelled` (tokens, seconds)."""
    if not priced or not priced_plain or priced[1] <= 0 or priced_plain[0] <= 0 or priced_plain[1] <= 0:
        return None
    return round((priced[0] / priced[1]) / (priced_plain[0] / priced_plain[1]), 3)


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    import transformers

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _tps(record: dict) -> float:
    return record["new_tokens"] / record["seconds"]


def _load(name: str | None, dtype: str, log):
    from ..loading import load

    path = model_path(name, log)
    log(f"loading {name or 'SmolLM2-135M-Instruct (default)'} in {dtype}")
    return load(path, dtype=dtype)


def model_path(name: str | None, log=print) -> str:
    """What a benchmark's model name loads from: the default model's file, a benchmark
    model's dense copy (fetched on first use), or the hub id or path as given."""
    from ..loading import default_model_path
    from . import models

    if name is None:
        return default_model_path()
    if name in models.MODELS:
        return str(models.dense(name, log=log))
    return name


def chat_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt the benchmark feeds for a chat: through the chat template, or for a base
    model (no template) the turns' plain text. A replay rebuilds a run's prompts with it."""
    from ..engine import chat_ids

    if getattr(tokenizer, "chat_template", None):
        return chat_ids(tokenizer, messages)
    return tokenizer("\n\n".join(m["content"] for m in messages))["input_ids"]  # a base model: the plain text


def answer_text(tokenizer, ids: list[int]) -> str:
    """An answer's text as the next turn of a chat carries it."""
    return tokenizer.decode(ids, skip_special_tokens=True)


def _answers(model, tokenizer, tasks, max_new_tokens: int, kernels: str = "auto") -> list[list[int]]:
    """The model's own greedy answers to every turn of `tasks` (token ids), on the
    kernels triespec's methods run on."""
    engine = M.Triespec(M.parse("trie"), model, tokenizer, kernels=kernels)
    answers = []
    for task in tasks:
        chat = []
        for text in task.turns:
            chat.append({"role": "user", "content": text})
            out = engine.run(chat_prompt(tokenizer, chat), max_new_tokens).token_ids
            chat.append({"role": "assistant", "content": answer_text(tokenizer, out)})
            answers.append(out)
    return answers


def _warm_up(model, tokenizer, kernels: str = "auto") -> str:
    """One short untimed generation each way, so first-call costs are not measured (and,
    with kernels="auto", the kernels are chosen once here)."""
    ids = chat_prompt(tokenizer, [{"role": "user", "content": "Say hello."}])
    set_kernels(model, "torch")
    M.Generate(M.parse("plain"), model).run(ids, 4)
    runner = M.Triespec(M.parse("trie"), model, tokenizer, kernels=kernels)
    runner.run(ids + ids, 4)
    if runner.kernels == "packed":
        M.Generate(M.parse("plain"), model).run(ids, 4)
    return runner.kernels


def _measure(call):
    """Run `call`, sampling resident memory every 5 ms; returns (result, peak MB above the start)."""
    process = psutil.Process()
    start = peak = process.memory_info().rss
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.wait(0.005):
            peak = max(peak, process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = call()
    finally:
        done.set()
        sampler.join()
    peak = max(peak, process.memory_info().rss)
    return result, (peak - start) / 2**20
