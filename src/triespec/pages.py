"""Give back the resident memory of a weight that a model no longer uses.

A checkpoint loaded from safetensors is memory-mapped: each weight is a view of the
file's pages, which become resident in the process as they are read. Packing a weight
(kernels.pack) reads it and makes a new copy in another layout; the dense one is
dropped, but its pages stay resident as long as the mapping exists, i.e. as long as any
weight of the same file is alive (the embeddings, the norms). Packing a whole model
would hold two copies of its weights at once (measured: peak RSS +116% on
Qwen2.5-Coder-1.5B in fp32, docs/kernels.md).

`release(tensor)` drops this process's resident pages of `tensor`'s bytes when they are
clean pages of a mapped file: the process's page table lets go of them (madvise
MADV_DONTNEED), the file keeps them, and a later read would fault them back in from it
unchanged. So nothing can be lost, and only such pages are ever released:

- only mappings of a file, never anonymous memory (where MADV_DONTNEED would zero it);
- only a mapping that has no page written since it was mapped (`Anonymous: 0 kB` in
  /proc/self/smaps: in a private mapping a written page becomes a private copy, which
  MADV_DONTNEED would discard);
- only whole pages inside the tensor's bytes, so neighbouring tensors keep theirs.

Linux only (/proc/self/smaps, madvise); elsewhere `release` does nothing and says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass

import torch

MADV_DONTNEED = 4
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True)
class Mapping:
    """One mapping of /proc/self/smaps: the address range, the file mapped (None for
    anonymous memory), the kB of its pages resident in this process, and the kB written
    since it was mapped."""

    start: int
    end: int
    path: str | None
    resident_kb: int
    written_kb: int


def mappings() -> list[Mapping]:
    """This process's memory mappings, or [] where /proc/self/smaps is not readable."""
    try:
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    found, current = [], None
    for line in lines:
        fields = line.split()
        if fields and "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header line
            if current:
                found.append(Mapping(**current))
            start, end = (int(x, 16) for x in fields[0].split("-"))
            inode = fields[4] if len(fields) > 4 else "0"
            path = fields[5] if len(fields) > 5 and inode != "0" else None
            current = {"start": start, "end": end, "path": path, "resident_kb": 0, "written_kb": 0}
        elif current and fields[:1] in (["Rss:"], ["Anonymous:"]):
            current["resident_kb" if fields[0] == "Rss:" else "written_kb"] = int(fields[1])
    if current:
        found.append(Mapping(**current))
    return found


def file_mapping(tensor: torch.Tensor, maps: list[Mapping] | None = None) -> Mapping | None:
    """The mapping of a file that holds all of `tensor`'s bytes, or None."""
    if tensor.device.type != "cpu" or tensor.is_mkldnn or tensor.numel() == 0:
        return None
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    for m in mappings() if maps is None else maps:
        if m.start <= start and end <= m.end:
            return m if m.path is not None else None
    return None


def releasable(tensor: torch.Tensor, maps: list[Mapping] | None = None) -> bool:
    """Whether `release(tensor)` would give its pages back (see the module's docstring)."""
    mapping = file_mapping(tensor, maps)
    return mapping is not None and mapping.written_kb == 0 and tensor.is_contiguous() and _madvise is not None


def release(tensor: torch.Tensor, maps: list[Mapping] | None = None) -> bool:
    """Drop the resident pages of `tensor`'s bytes if they are clean pages of a mapped
    file; returns whether it did. `maps`: `mappings()` read once for many tensors (a
    mapping's written pages only change when something writes to it)."""
    if not releasable(tensor, maps):
        return False
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // PAGE) * PAGE, end // PAGE * PAGE
    if last > first and _madvise(first, last - first, MADV_DONTNEED) != 0:
        return False
    return True


def _libc_madvise():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_madvise = _libc_madvise()

__all__ = ["Mapping", "file_mapping", "mappings", "releasable", "release"]
