"""Where an adaptive budget's state lives on disk, so that a new engine starts from what
the last one learned instead of timing the model again.

One small JSON file per *key*: the model (a hash of its config without its path, of its
weights' names and shapes, and of its tokenizer's vocabulary), its dtype and device, the
largest forward the budget prices (`max_tokens`: the decoding length + 1), the kernels its
linear layers run on (`kernels.current`: "torch" or "packed"), and the machine (CPU model name and flags, torch and transformers versions, torch's threads):
what a forward costs depends on all of these. Weights are keyed by shape, not value, so
two fine-tunes of one model share a file: the curve is the same for both, and the
calibration forgets (`Calibration.observe`). The file holds the cost curve
(`budget.CostModel`: sizes, seconds, which sizes are confirmed and which stepped, the
context it was measured after and the per-cached-token cost) and the calibration
(`budget.Calibration.state()`), with a magic string, the format version and the full
key, compared on loading: a file name is a hash, and two keys could share one.

Beside them, in the folder's `kernels/`, `KernelStore` keeps which kernels
`kernels="auto"` chose for the model and machine (the same key, with "kernels": "auto"),
so that a second start times nothing.

Files live in `$TRIESPEC_BUDGET_CACHE`, else `$TRIESPEC_CACHE/budget`, else
`~/.cache/triespec/budget`, or the directory an engine is given. Writes go to a
temporary file that replaces the old one only when complete. A file that is corrupt, of
another format version or made for another key is ignored with a warning: it is a cache,
and the engine measures again and writes over it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import transformers

from .budget import Calibration, CostModel
from .kernels import current as current_kernels
from .loading import cache_dir
from .persist import atomic_write, fingerprint as vocabulary_fingerprint

MAGIC = "triespec-budget"
VERSION = 2  # 2: the calibration has one cell per score bin and kind (no depth classes, no scale)


def default_directory() -> Path:
    """$TRIESPEC_BUDGET_CACHE if set, else the `budget` folder of triespec's cache
    ($TRIESPEC_CACHE, default ~/.cache/triespec). Its own variable, so that tests can move
    the budgets without moving the models' dense copies."""
    own = os.environ.get("TRIESPEC_BUDGET_CACHE")
    return Path(own) if own else cache_dir() / "budget"


def directory(where) -> Path | None:
    """The folder `where` names: True, the default one; False or None, none (nothing is
    kept); a path, that folder. ValueError for anything else."""
    if where is True:
        return default_directory()
    if where is False or where is None:
        return None
    if isinstance(where, (str, os.PathLike)) and str(where):
        return Path(where).expanduser()
    raise ValueError(f"budget_cache must be True, False, None or a folder path, got {where!r}")


def model_fingerprint(model, tokenizer) -> str:
    """A hash of what makes a model's forwards cost what they do and its drafts fare as
    they do: its config (without the path it was loaded from: a copy elsewhere is the same
    model), its weights' names and shapes (not their values: hashing 1.5B weights would
    cost more than timing them), and its tokenizer's vocabulary."""
    config = model.config.to_dict()
    config.pop("_name_or_path", None)
    config["attn_implementation"] = model.config._attn_implementation
    weights = [(name, list(tensor.shape)) for name, tensor in model.state_dict().items()]
    vocab = vocabulary_fingerprint(tokenizer, model.get_output_embeddings().weight.shape[0])
    text = json.dumps([config, weights, vocab], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def machine() -> dict:
    """What a forward's cost depends on besides the model: the CPU (model name and a hash
    of its flags: AMX or AVX512_BF16 change the curve several times over), the versions of
    torch and transformers (the kernels they pick) and torch's threads."""
    cpu, flags = None, ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                field, _, value = (part.strip() for part in line.partition(":"))
                if field == "model name" and cpu is None:
                    cpu = value
                elif field == "flags" and not flags:
                    flags = value
    except OSError:  # not Linux: the platform's name for the processor
        pass
    return {"cpu": cpu or platform.processor() or platform.machine(),
            "cpu_flags": hashlib.sha256(flags.encode()).hexdigest()[:16], "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads()}


def budget_key(model, tokenizer, max_tokens: int) -> dict:
    """Everything a saved budget belongs to (see the module's docstring)."""
    device = model.device
    key = {"model": model_fingerprint(model, tokenizer), "model_type": model.config.model_type,
           "dtype": str(model.dtype).removeprefix("torch."), "device": str(device), "max_tokens": max_tokens,
           "kernels": current_kernels(model), **machine()}
    if device.type == "cuda":
        key["gpu"] = torch.cuda.get_device_name(device)
    return key


class BudgetStore:
    """The file of one budget key in `folder`: `load` at an engine's start, `save` after
    its generations (every call rewrites the whole file, a few kilobytes)."""

    def __init__(self, folder: str | os.PathLike, key: dict):
        self.key = key
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        prefix = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{key.get('model_type', 'model')}-{key.get('dtype', '')}")
        self.path = Path(folder) / f"{prefix}-{digest}.json"
        self._save_failed = False

    @classmethod
    def open(cls, where, model, tokenizer, max_tokens: int) -> BudgetStore | None:
        """The store of this model's budget in the folder `where` names (see `directory`),
        or None when `where` says to keep nothing."""
        folder = directory(where)
        return None if folder is None else cls(folder, budget_key(model, tokenizer, max_tokens))

    def load(self) -> tuple[CostModel, Calibration] | None:
        """The saved cost curve and calibration, or None: nothing saved yet, or (with a
        warning) a file that is unreadable, corrupt, of another format version or of
        another key."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            return self._ignore(f"cannot be read ({e})")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            return self._ignore(f"is not JSON ({e})")
        if not isinstance(data, dict) or data.get("magic") != MAGIC:
            return self._ignore("is not a triespec budget file")
        if data.get("version") != VERSION:
            return self._ignore(f"has budget format version {data.get('version')!r}; this triespec reads {VERSION}")
        if data.get("key") != self.key:
            return self._ignore(f"was made for another model or machine ({_difference(data.get('key'), self.key)})")
        try:
            return _cost(data["curve"]), _calibration(data["calibration"])
        except (KeyError, TypeError, ValueError) as e:
            return self._ignore(f"is corrupt ({e})")

    def save(self, cost: CostModel, calibration: Calibration) -> None:
        """Write the curve and calibration atomically (a temporary file in the same folder,
        then os.replace): a crash mid-save leaves the previous file whole. A failure (a
        read-only folder, a full disk) warns once and never stops a generation."""
        data = {"magic": MAGIC, "version": VERSION, "key": self.key,
                "curve": {"sizes": cost.sizes, "seconds": cost.seconds, "confirmed": cost.confirmed,
                          "stepped": cost.stepped,
                          "context": cost.context, "per_context": list(cost.per_context)},
                "calibration": calibration.state().tolist()}
        try:
            _write_json(self.path, data)
        except (OSError, ValueError) as e:  # ValueError: a time that is not finite
            if not self._save_failed:
                self._save_failed = True
                warnings.warn(f"triespec: the adaptive budget could not be saved to {self.path}: {e}",
                              RuntimeWarning, stacklevel=2)

    def _ignore(self, why: str) -> None:
        warnings.warn(f"triespec: ignoring the saved budget {self.path}: it {why}; measuring again",
                      RuntimeWarning, stacklevel=3)
        return None


class KernelStore:
    """Which kernels `kernels.use(..., "auto")` chose for a model on this machine, and the
    forward timings it chose by: one small JSON file in `kernels/` beside the budgets, keyed like them
    with "kernels": "auto". `load` gives "torch", "packed" or None (nothing saved, or, with
    a warning, a file that is not one of ours or was made for another key)."""

    def __init__(self, folder: str | os.PathLike, key: dict):
        self.key = {**key, "kernels": "auto"}
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:24]
        prefix = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{key.get('model_type', 'model')}-{key.get('dtype', '')}")
        self.path = Path(folder) / "kernels" / f"{prefix}-{digest}.json"

    @classmethod
    def open(cls, where, model, tokenizer, max_tokens: int) -> KernelStore | None:
        """The store of this model's choice in the folder `where` names (see `directory`),
        or None when `where` says to keep nothing."""
        folder = directory(where)
        return None if folder is None else cls(folder, budget_key(model, tokenizer, max_tokens))

    def load(self) -> str | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            return self._ignore(f"cannot be read ({e})")
        if not isinstance(data, dict) or data.get("magic") != MAGIC + "-kernels" or data.get("version") != VERSION:
            return self._ignore("is not a triespec kernel choice of this version")
        if data.get("key") != self.key:
            return self._ignore(f"was made for another model or machine ({_difference(data.get('key'), self.key)})")
        if data.get("kernels") not in ("torch", "packed"):
            return self._ignore(f"names no kernels ({data.get('kernels')!r})")
        return data["kernels"]

    def save(self, choice: str, seconds: dict) -> None:
        """Write the choice atomically; a failure warns and is otherwise ignored."""
        data = {"magic": MAGIC + "-kernels", "version": VERSION, "key": self.key, "kernels": choice,
                "seconds": seconds}
        try:
            _write_json(self.path, data)
        except (OSError, ValueError) as e:
            warnings.warn(f"triespec: the kernel choice could not be saved to {self.path}: {e}",
                          RuntimeWarning, stacklevel=2)

    def _ignore(self, why: str) -> None:
        warnings.warn(f"triespec: ignoring the saved kernel choice {self.path}: it {why}; timing again",
                      RuntimeWarning, stacklevel=3)
        return None


def _write_json(path: Path, data: dict) -> None:
    """Write `data` to `path` atomically (persist.atomic_write). OSError, or ValueError for a
    number JSON cannot hold."""
    atomic_write(path, lambda f: json.dump(data, f, allow_nan=False))


def _cost(curve: dict) -> CostModel:
    """The CostModel a file's curve describes; ValueError where it cannot be one."""
    sizes, seconds, confirmed = curve["sizes"], curve["seconds"], curve["confirmed"]
    context, per_context = curve["context"], curve["per_context"]
    if not all(isinstance(n, int) and n >= 1 for n in sizes) or len(set(sizes)) != len(sizes):
        raise ValueError("sizes must be distinct integers >= 1")
    if not all(isinstance(t, (int, float)) and math.isfinite(t) and t > 0 for t in seconds):
        raise ValueError("seconds must be finite and > 0")
    if not all(isinstance(c, bool) for c in confirmed) or not any(confirmed):
        raise ValueError("confirmed must be flags, one size confirmed at least")
    # a curve saved before `stepped` was kept: every size is shown by a real step again
    stepped = curve.get("stepped", [False] * len(sizes))
    if not all(isinstance(c, bool) for c in stepped):
        raise ValueError("stepped must be flags")
    if not isinstance(context, int) or context < 0 or \
            not all(isinstance(t, (int, float)) and math.isfinite(t) for t in per_context):
        raise ValueError("context must be an integer >= 0 and per_context finite")
    return CostModel(sizes, [float(t) for t in seconds], context=context,
                     per_context=tuple(float(t) for t in per_context), confirmed=confirmed, stepped=stepped)


def _calibration(state: list) -> Calibration:
    calibration = Calibration()
    calibration.restore(np.asarray(state, dtype=np.float64))  # ValueError: not one of its shape
    return calibration


def _difference(saved, wanted: dict) -> str:
    """The key's fields that differ, for the warning."""
    if not isinstance(saved, dict):
        return "no key"
    fields = sorted(k for k in {*saved, *wanted} if saved.get(k) != wanted.get(k))
    return ", ".join(f"{k}: {saved.get(k)!r} here {wanted.get(k)!r}" for k in fields)
