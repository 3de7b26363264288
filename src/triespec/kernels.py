"""Which CPU kernels a model's linear layers run on: torch's own, or oneDNN on weights
packed once.

torch sends a dense `nn.Linear` to a GEMM that may reorder (pack) the whole weight
matrix on every call with more than one row, while one row takes a GEMV: so a forward
over k tokens can cost several times one token's, although it reads the same weights.
oneDNN can run the same products on weights reordered once into its blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`, then `torch.ops.mkldnn._linear_pointwise`,
the ops Inductor's CPU freezing pass uses). Whether that is faster depends on the CPU,
the dtype and the shapes, so it is chosen by timing the model's own forwards, not by
the CPU's name (`choose`, `use`).

- `pack(model)` replaces every `nn.Linear` by a `PackedLinear` holding the packed
  weight, and drops the dense one: no second dense copy. An output layer tied to the
  input embeddings is left on torch's kernel: the embedding needs its dense rows, and a
  packed copy would add vocabulary x hidden weights (21% of SmolLM2-135M's).
- `unpack(model)` puts plain `nn.Linear` layers back, with the dense weights unchanged
  bit for bit (the packing only changes the layout).
- `current(model)` says which kernels a model runs on now ("torch" or "packed").

The ops are private, so they are used only with the torch release they were tested
with (`TESTED_TORCH`) and after a check against `F.linear` on this machine; anywhere
else, or where they fail, `use` falls back to torch's kernels with a one-line warning.

Exactness: the packed result of a row does not depend on the other rows fed with it
(checked by the tests); it differs from `F.linear`'s by rounding (summation order), so
greedy output on packed kernels is exactly plain greedy decoding on packed kernels, and
may differ from `model.generate` on torch's kernels where two logits are within
rounding, as in bf16.
"""

from __future__ import annotations

import logging
import warnings
import weakref

import psutil
import torch
import torch.nn.functional as F
from torch import nn

from triespec import pages

CHOICES = ("auto", "torch", "packed")
TESTED_TORCH = ("2.13.",)  # releases the private oneDNN ops are used with
DTYPES = (torch.float32, torch.bfloat16)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}  # max |packed - F.linear| of the start-up check

log = logging.getLogger(__name__)
_CHOSEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> what `choose` picked


def check(kernels) -> str:
    """`kernels` if it is one of CHOICES, else ValueError with the reason."""
    if kernels not in CHOICES:
        raise ValueError(f"kernels must be one of {', '.join(CHOICES)}, got {kernels!r}")
    return kernels


def unavailable(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> str | None:
    """Why packed kernels cannot run for `dtype` on `device` here, or None if they can."""
    if torch.device(device).type != "cpu":
        return f"packed kernels are for the CPU, the model is on {device}"
    if not torch.__version__.startswith(TESTED_TORCH):
        return f"packed kernels are tested with torch {', '.join(v + 'x' for v in TESTED_TORCH)}, not {torch.__version__}"
    if not torch.backends.mkldnn.is_available():
        return "this torch is built without oneDNN (mkldnn)"
    if not all(hasattr(torch.ops.mkldnn, op) for op in ("_reorder_linear_weight", "_linear_pointwise")):
        return "this torch lacks the oneDNN linear ops"
    if dtype not in DTYPES:
        return f"packed kernels take {', '.join(map(str, DTYPES))}, not {dtype}"
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "oneDNN has no bf16 kernels on this CPU"
    return _self_check(dtype)


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight: [N, K] dense -> the same values in oneDNN's blocked layout (an opaque tensor
    whose .shape is still [N, K])."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, W, bias) with `weight` = pack_weight(W). x: [..., K] -> [..., N]."""
    rows = x.reshape(-1, x.shape[-1])
    if not rows.is_contiguous():
        rows = rows.contiguous()
    out = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
    return out.reshape(*x.shape[:-1], weight.shape[0])


class PackedLinear(nn.Module):
    """An `nn.Linear` whose weight is packed once for oneDNN. `weight` is a buffer of the
    same name and shape (so state_dict names and shapes, and `.weight.shape`, are those
    of the linear it replaces), in the packed layout: use `to_linear()` to get a dense
    layer back."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            self.register_buffer("weight", pack_weight(linear.weight))
        self.bias = linear.bias  # the same Parameter (or None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.weight, self.bias)

    def to_linear(self) -> nn.Linear:
        """A dense nn.Linear with exactly the weights this one was made from."""
        dense = self.weight.to_dense()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta", dtype=dense.dtype)
        linear.weight = nn.Parameter(dense, requires_grad=False)
        if self.bias is not None:
            linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def current(model: nn.Module) -> str:
    """"packed" if some of the model's linear layers run on packed weights, else "torch"."""
    return "packed" if any(isinstance(m, PackedLinear) for m in model.modules()) else "torch"


def pack(model: nn.Module) -> int:
    """Put every nn.Linear of `model` (a tied output layer excepted, see the module's
    docstring) on packed weights; returns how many were packed. Layers whose weight is
    not of a packable dtype or not on the CPU are left as they are.

    Memory: the largest weights are packed first, and each dense weight is let go as
    soon as its packed copy exists (its pages given back when it is mapped from the
    checkpoint, pages.release), so the peak is the packed model plus one dense weight,
    not two copies of the model."""
    names = _packable(model)
    maps = pages.mappings()
    kept = False  # a packed weight whose dense pages stay resident with the checkpoint's mapping
    for name in sorted(names, key=lambda n: -model.get_submodule(n).weight.numel()):
        linear = model.get_submodule(name)
        _replace(model, name, PackedLinear(linear))
        if not pages.release(linear.weight, maps):
            kept = kept or pages.file_mapping(linear.weight, maps) is not None
        del linear  # the last reference: a dense weight of its own memory is freed here
    if kept:
        _own_parameters(model)
    return len(names)


def _packable(model: nn.Module) -> list[str]:
    """Names of the nn.Linear layers `pack` packs."""
    tied = _tied_output(model)
    return [name for name, m in model.named_modules()
            if type(m) is nn.Linear and m is not tied and m.weight.device.type == "cpu" and m.weight.dtype in DTYPES]


def _own_parameters(model: nn.Module) -> None:
    """Give the parameters left dense (embeddings, norms, biases) memory of their own,
    where the dropped dense weights' pages could not be given back (pages.release): one
    tensor still viewing the checkpoint's mapping keeps the whole file mapped, the
    dropped weights' resident pages included (docs/kernels.md). `.data` is replaced, not
    the Parameter, so weights tied to one another stay tied."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.data = parameter.data.clone()


def unpack(model: nn.Module) -> int:
    """Put every PackedLinear of `model` back as a dense nn.Linear; returns how many."""
    names = [name for name, module in model.named_modules() if isinstance(module, PackedLinear)]
    for name in names:  # by name, so each packed weight is freed once its dense copy is made
        _replace(model, name, model.get_submodule(name).to_linear())
    return len(names)


def set_kernels(model: nn.Module, kernels: str) -> str:
    """Put `model` on `kernels` ("torch" or "packed") and return it; packed kernels that
    cannot run here fall back to "torch" with a one-line warning saying why."""
    if kernels not in ("torch", "packed"):
        raise ValueError(f"set_kernels takes 'torch' or 'packed', got {kernels!r}")
    if kernels == current(model):
        return kernels
    if kernels == "torch":
        unpack(model)
        return "torch"
    why = unavailable(model.dtype, model.device) or _no_room(model)
    if why is None and not pack(model):
        why = "the model has no linear layer to pack"
    if why is not None:
        warnings.warn(f"triespec: using torch's kernels: {why}", RuntimeWarning, stacklevel=2)
        return "torch"
    return "packed"


def use(model: nn.Module, kernels: str = "auto", store=None, measure=None) -> str:
    """Put `model` on the kernels asked for and return which it runs on.

    kernels: "torch", "packed" (falls back to "torch" with a warning where it cannot
    run), or "auto": the faster of the two by `measure` (`choose`), once per model in a
    process and, given a `store` (an object with `load() -> str | None` and
    `save(choice, seconds)`, as budget_store.KernelStore), once per model and machine: a
    second start reads the choice and times nothing. `measure()`: the seconds of the
    forwards the caller will run, timed on the kernels the model is on (the engine's is
    its cold cost curve, budget.CostModel.measure, so that timing the two kernels is
    all the timing a cold start does); needed for "auto" only.
    """
    check(kernels)
    if kernels != "auto":
        return set_kernels(model, kernels)
    if model in _CHOSEN:
        return set_kernels(model, _CHOSEN[model])
    why = unavailable(model.dtype, model.device)
    if why is not None:  # nothing to choose from
        log.info("triespec: kernels: torch's (%s)", why)
        _CHOSEN[model] = "torch"
        return set_kernels(model, "torch")
    saved = store.load() if store is not None else None
    if saved in ("torch", "packed"):
        _CHOSEN[model] = saved
        return set_kernels(model, saved)
    if measure is None:
        raise ValueError("kernels='auto' needs measure: a function timing the model's forwards")
    choice, seconds = choose(model, measure)
    _CHOSEN[model] = choice
    if store is not None:
        store.save(choice, seconds)
    return choice


@torch.inference_mode()
def warm(model: nn.Module, sizes) -> None:
    """Call each distinct linear shape once with each number of rows in `sizes`, on the
    kernels it runs on: oneDNN makes (JIT-compiles) a kernel the first time it sees a
    shape and a row count (for packed weights, and for torch's own bf16 products), some
    milliseconds each, and a cost curve timed with those in it would price the sizes
    too dear. Plain float nn.Linear layers only: a subclass (a quantized one) may want
    other inputs."""
    seen = set()
    for module in model.modules():
        if (isinstance(module, PackedLinear) or type(module) is nn.Linear and module.weight.is_floating_point()) \
                and (key := (type(module), module.in_features, module.out_features, module.weight.dtype)) not in seen:
            seen.add(key)
            for n in sizes:
                module(torch.zeros(n, module.in_features, dtype=module.weight.dtype, device=module.weight.device))


def choose(model: nn.Module, measure) -> tuple[str, dict]:
    """Time the model's forwards on both kernels (`measure()`: seconds per forward size,
    on the kernels the model is on), leave it on the faster by the sum over the sizes
    (ties go to torch's), and return (choice, {kernels: seconds}). The sum weighs every
    size the engine may verify alike; one notice line says what was chosen and why."""
    timings = {}
    for kernels in ("torch", "packed"):
        if set_kernels(model, kernels) != kernels:  # packing failed (warned): torch it is
            return "torch", timings
        timings[kernels] = [float(t) for t in measure()]
    total = {k: sum(v) for k, v in timings.items()}
    choice = "packed" if total["packed"] < total["torch"] else "torch"
    set_kernels(model, choice)
    log.info("triespec: kernels: %s (forwards timed: torch %.3f s, packed %.3f s)", choice,
             total["torch"], total["packed"])
    return choice, timings


def _no_room(model: nn.Module) -> str | None:
    """Why packing would not fit in memory, or None. `pack` frees a dense weight of its
    own memory as soon as its packed copy is made, so those take room for one weight
    more; a weight mapped from the checkpoint leaves its pages to the file's cache (given
    back by pages.release, or reclaimable), so its packed copy is new memory. A process
    killed for memory at start-up is worse than torch's kernels."""
    weights = [model.get_submodule(name).weight for name in _packable(model)]
    maps = pages.mappings()
    sizes = [w.numel() * w.element_size() for w in weights]
    mapped = sum(size for w, size in zip(weights, sizes) if pages.file_mapping(w, maps) is not None)
    need = max(sizes, default=0) + mapped
    free = psutil.virtual_memory().available
    if need > free:
        what = "the packed copies of the weights mapped from the checkpoint" if mapped else "the largest weight"
        return f"packing needs {need / 2**30:.1f} GiB free for {what}, {free / 2**30:.1f} GiB are"
    return None


def _tied_output(model: nn.Module) -> nn.Module | None:
    """The output layer if it shares its weight with the input embeddings, else None."""
    get_out, get_in = getattr(model, "get_output_embeddings", None), getattr(model, "get_input_embeddings", None)
    out = get_out() if callable(get_out) else None
    emb = get_in() if callable(get_in) else None
    if out is None or emb is None:
        return None
    return out if getattr(out, "weight", None) is getattr(emb, "weight", None) else None


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


_CHECKED: dict = {}  # dtype -> reason the ops failed their check here, or None


def _self_check(dtype: torch.dtype) -> str | None:
    """Run the ops once on a small matrix against F.linear: a build whose ops are there but
    broken (or refuse this CPU) falls back instead of failing mid-generation."""
    if dtype not in _CHECKED:
        try:
            g = torch.Generator().manual_seed(0)
            w = torch.randn(48, 40, generator=g).to(dtype)
            x = torch.randn(5, 40, generator=g).to(dtype)
            with torch.no_grad():
                diff = (packed_linear(x, pack_weight(w)).float() - F.linear(x, w).float()).abs().max().item()
            _CHECKED[dtype] = None if diff <= TOLERANCE[dtype] * 10 else \
                f"the oneDNN linear differs from F.linear by {diff:.2g} here"
        except (RuntimeError, TypeError, AttributeError) as e:
            _CHECKED[dtype] = f"the oneDNN linear ops fail here ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return _CHECKED[dtype]


__all__: list[str] = ["CHOICES", "PackedLinear", "check", "choose", "current", "pack", "pack_weight",
                      "packed_linear", "set_kernels", "unavailable", "unpack", "use", "warm"]
