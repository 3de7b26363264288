"""Save and load a memory trie, so what a server learned survives a restart.

The file is a NumPy `.npz` of flat arrays, one entry per node in breadth-first order
(`parent` index, -1 for the root's children; `token`; `count`), and a JSON header with a
magic string, the format version and a fingerprint of the tokenizer: token ids mean
nothing under another vocabulary, so such a file is refused. No pickle: loading a
foreign file must not run its code. Writes go to a temporary file that replaces the old
one only when complete, so a crash mid-save leaves the previous trie intact. The file
stays readable by its owner only (as mkstemp makes it): it holds pieces of the prompts
and answers the server saw.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import weakref
import zipfile
from pathlib import Path

import numpy as np

from .drafters.trie import Node, Trie, gc_paused

MAGIC = "triespec-trie"
VERSION = 1


_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (its length, digest)


def fingerprint(tokenizer, vocab_size: int) -> str:
    """The vocabulary size and a hash of the vocabulary (token -> id), if there is one.
    The hash is kept per tokenizer while its length stays the same (tokens added make a
    new one): a 150,000-token vocabulary takes 0.3 s to hash, and an engine's start asks
    for it more than once."""
    digest = "none"
    if tokenizer is not None:
        kept = _DIGESTS.get(tokenizer)
        if kept is not None and kept[0] == len(tokenizer):
            digest = kept[1]
        else:
            vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
            digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:32]
            _DIGESTS[tokenizer] = (len(tokenizer), digest)
    return f"vocab={vocab_size}:sha256={digest}"


def flatten(trie: Trie) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """parent [N] (int64), token [N] (int64), count [N] (int64), breadth-first."""
    parents, tokens, counts = [], [], []
    level = [(-1, trie.root)]
    while level:
        nxt = []
        for index, node in level:
            for token, child in (node.children or {}).items():
                nxt.append((len(tokens), child))
                parents.append(index)
                tokens.append(token)
                counts.append(child.count)
        level = nxt
    return (np.array(parents, dtype=np.int64), np.array(tokens, dtype=np.int64), np.array(counts, dtype=np.int64))


def save_trie(trie: Trie, path: str | os.PathLike, fingerprint: str, calibration: np.ndarray | None = None) -> int:
    """Write the trie (and a budget calibration, see write_arrays) atomically; returns the file's size in bytes."""
    return write_arrays(flatten(trie), path, fingerprint, calibration)


def write_arrays(arrays: tuple[np.ndarray, np.ndarray, np.ndarray], path: str | os.PathLike, fingerprint: str,
                 calibration: np.ndarray | None = None) -> int:
    """Write a flattened trie atomically (a server flattens between two steps, then
    writes while it decodes); returns the file's size in bytes. `calibration`: the
    adaptive budget's learned acceptance rates (budget.Calibration.state), kept with the
    trie whose drafts they rate."""
    path = Path(path)
    parent, token, count = arrays
    header = json.dumps({"magic": MAGIC, "version": VERSION, "fingerprint": fingerprint, "nodes": len(token)})
    extra = {} if calibration is None else {"calibration": calibration}
    atomic_write(path, lambda f: np.savez_compressed(f, header=np.array(header), parent=parent, token=token,
                                                     count=count, **extra), binary=True)
    return path.stat().st_size


def atomic_write(path: str | os.PathLike, write, binary: bool = False) -> None:
    """Call `write(file)` on a temporary file in `path`'s folder, sync it, then put it in
    `path`'s place (os.replace): a crash mid-write leaves the previous file whole. Whatever
    `write` raises is raised, with no temporary file left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_trie(path: str | os.PathLike, fingerprint: str, max_nodes: int | None = None) -> Trie:
    """The trie saved at `path`, within the node budget `max_nodes`.

    Raises ValueError, saying why, for a file that is not a triespec trie, is corrupt,
    or was made with another tokenizer.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
            parent, token, count = data["parent"], data["token"], data["count"]
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable triespec trie file: {e}") from e
    if not isinstance(header, dict) or header.get("magic") != MAGIC:
        raise ValueError(f"{path} is not a triespec trie file")
    if header.get("version") != VERSION:
        raise ValueError(f"{path} has trie format version {header.get('version')}; this triespec reads {VERSION}")
    if header.get("fingerprint") != fingerprint:
        raise ValueError(f"{path} was made with another tokenizer ({header.get('fingerprint')}; "
                         f"this model's is {fingerprint})")
    return unflatten((parent, token, count), max_nodes, source=str(path))


def unflatten(arrays: tuple[np.ndarray, np.ndarray, np.ndarray], max_nodes: int | None = None,
              source: str = "the snapshot") -> Trie:
    """The trie of `flatten`'s arrays (from a file, or sent by another process), within
    `max_nodes`. Raises ValueError, naming `source`, for arrays that are not a trie."""
    parent, token, count = (np.asarray(a) for a in arrays)
    _check_arrays(source, parent, token, count)
    return _build(parent, token, count, max_nodes)


def load_calibration(path: str | os.PathLike) -> np.ndarray | None:
    """The calibration saved with a trie (see write_arrays), or None if it has none.
    Read after load_trie has accepted the file."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return np.array(data["calibration"]) if "calibration" in data.files else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None


def _check_arrays(path, parent: np.ndarray, token: np.ndarray, count: np.ndarray) -> None:
    n = len(token)
    arrays = (parent, token, count)
    if any(a.shape != (n,) or a.dtype.kind != "i" for a in arrays):
        raise ValueError(f"{path} is corrupt: the node arrays differ in shape or type")
    index = np.arange(n)
    if n and ((parent < -1).any() or (parent >= index).any()):
        raise ValueError(f"{path} is corrupt: a node's parent does not come before it")
    if n and ((count < 1).any() or (token < 0).any()):
        raise ValueError(f"{path} is corrupt: counts must be >= 1 and tokens >= 0")
    inner = parent >= 0
    if n and (count[inner] > count[parent[inner]]).any():
        raise ValueError(f"{path} is corrupt: a child outcounts its parent")
    pairs = np.unique(np.stack([parent, token]), axis=1).shape[1] if n else 0
    if pairs != n:
        raise ValueError(f"{path} is corrupt: a node has two children for the same token")


def _build(parent: np.ndarray, token: np.ndarray, count: np.ndarray, max_nodes: int | None) -> Trie:
    trie = Trie(max_nodes)
    nodes: list[Node] = []
    with gc_paused():
        for p, t, c in zip(parent.tolist(), token.tolist(), count.tolist()):
            up = trie.root if p < 0 else nodes[p]
            if up.children is None:
                up.children = {}
            node = up.children[t] = Node()
            node.count = c
            nodes.append(node)
    trie.num_nodes = len(nodes)
    trie.enforce_budget()  # a file saved under a larger budget
    return trie


def warm(engine, path: str | os.PathLike) -> int:
    """Teach the engine's memory trie a corpus of past answers; returns how many.

    `path`: JSON Lines, one object a line, either {"prompt": text, "completion": text},
    {"messages": [...chat..., {"role": "assistant", "content": text}]} (the last message
    is the answer, the ones before it the prompt, through the chat template) or
    {"text": text}. As when serving, each answer is learned with the prompt tokens just
    before it.
    """
    drafter = engine.drafter
    if drafter.memory is None:
        raise ValueError(f"{type(drafter).__name__} has no memory to warm")
    engine.require_tokenizer("warming from text")
    count = 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                prompt, answer = _example(json.loads(line))
                ids = engine.tokenizer(answer, add_special_tokens=False)["input_ids"]
                context = engine.encode(prompt) if prompt is not None else []
            except (json.JSONDecodeError, ValueError, TypeError, KeyError) as e:
                raise ValueError(f"{path}, line {number}: {e}") from e
            drafter.learn_text(ids, context)
            count += 1
    return count


def _example(record) -> tuple[object, str]:
    """(prompt or None, answer text) of one corpus record."""
    if not isinstance(record, dict):
        raise ValueError("each line must be a JSON object")
    if "completion" in record:
        prompt, answer = record.get("prompt"), record["completion"]
    elif "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict) \
                or messages[-1].get("role") != "assistant":
            raise ValueError('"messages" must be a list ending with the assistant\'s answer')
        prompt, answer = messages[:-1] or None, messages[-1].get("content")
    elif "text" in record:
        prompt, answer = None, record["text"]
    else:
        raise ValueError('expected "prompt" and "completion", "messages", or "text"')
    if not isinstance(answer, str) or (prompt is not None and not isinstance(prompt, (str, list))):
        raise ValueError("prompt and answer must be text (or chat messages for the prompt)")
    return prompt, answer
