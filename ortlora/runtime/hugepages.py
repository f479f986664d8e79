"""Back the weights onnxruntime pre-packs with 2 MB pages (Linux transparent huge pages), best effort; keep the KV
cache on small pages (`sparse_zeros`).

A decode step reads every weight once; with 4 KB pages that is a TLB miss every 4 KB. onnxruntime allocates its
pre-packed weights with plain malloc, and with the common THP mode `madvise` such memory never gets huge pages by
itself. `MADV_COLLAPSE` (Linux 6.1+) turns resident pages into huge pages in place, contents unchanged.

int4 decoding gains a few percent from it and fp32 nothing (benchmarks/NOTES.md#huge-pages), so the engine asks
for it on int4 (MatMulNBits) models only. `ORTLORA_HUGEPAGES=0` turns it off.

    before = anonymous_regions()
    session = ort.InferenceSession(...)     # pre-packs the weights into new anonymous memory
    collapse_new_regions(before)            # or collapse_in_background(before): the engine serves meanwhile
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading

import numpy as np

MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25
HUGE, PAGE = 2 << 20, 4096
MIN_REGION = 32 << 20  # weight buffers; smaller regions are not worth a look


def enabled() -> bool:
    return sys.platform.startswith("linux") and os.environ.get("ORTLORA_HUGEPAGES", "1") != "0"


def sparse_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """Zeros for memory written a little at a time at many places (the KV cache: each (slot, head) stripe of a
    layer fills from its start), in a fresh anonymous mapping kept on small pages. From np.zeros, such an array gets
    huge pages (numpy advises them for large arrays), and the first token written to a stripe makes 2 MB resident
    instead of 4 KB (benchmarks/NOTES.md#kv-pages). Elsewhere (no MADV_NOHUGEPAGE): plain zeros."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    if size < HUGE or not hasattr(mmap, "MADV_NOHUGEPAGE"):
        return np.zeros(shape, dtype)
    memory = mmap.mmap(-1, size)  # anonymous: zero-filled, resident only where written; the array keeps it alive
    try:
        memory.madvise(mmap.MADV_NOHUGEPAGE)
    except OSError:
        pass
    return np.frombuffer(memory, dtype).reshape(shape)


def anonymous_regions() -> set[tuple[int, int]]:
    """(start, end) of this process's private anonymous read-write mappings (empty where /proc is missing)."""
    out = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 5 and parts[1].startswith("rw") and parts[4] == "0":  # no backing file
                    lo, hi = parts[0].split("-")
                    out.add((int(lo, 16), int(hi, 16)))
    except OSError:
        pass
    return out


def _resident_runs(libc, lo: int, hi: int) -> list[tuple[int, int]]:
    """The runs of whole 2 MB pages inside [lo, hi) whose 4 KB pages are all resident (mincore)."""
    start, end = -(-lo // HUGE) * HUGE, hi // HUGE * HUGE
    if end <= start:
        return []
    vec = (ctypes.c_ubyte * ((end - start) // PAGE))()
    if libc.mincore(start, end - start, vec) != 0:
        return []
    full = (np.frombuffer(vec, np.uint8).reshape(-1, HUGE // PAGE) & 1).all(axis=1)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], full.astype(np.int8), [0]))))  # run starts, ends
    return [(start + int(a) * HUGE, start + int(b) * HUGE) for a, b in zip(edges[::2], edges[1::2])]


def collapse_new_regions(before: set[tuple[int, int]], min_size: int = MIN_REGION) -> int:
    """Collapse into huge pages the anonymous regions of at least `min_size` that appeared since `before`, where
    their 2 MB pages are wholly resident (collapsing a part-resident one would fill its holes and grow the process);
    returns the bytes collapsed. Errors (an old kernel, THP off, memory too fragmented) leave memory as it was."""
    if not enabled():
        return 0
    return _collapse(_new(before, min_size))


def collapse_in_background(before: set[tuple[int, int]]) -> threading.Thread | None:
    """`collapse_new_regions(before)` on a daemon thread, the regions found now: a 3B model's pre-packed weights
    take seconds to collapse (benchmarks/NOTES.md#huge-pages), and collapsing keeps contents, so the engine may run
    on them meanwhile. Returns the thread (None when there is nothing to do)."""
    regions = _new(before, MIN_REGION) if enabled() else []
    if not regions:
        return None
    thread = threading.Thread(target=_collapse, args=(regions,), name="ortlora-hugepages", daemon=True)
    thread.start()
    return thread


def _new(before: set[tuple[int, int]], min_size: int) -> list[tuple[int, int]]:
    return sorted(r for r in anonymous_regions() - before if r[1] - r[0] >= min_size)


def _collapse(regions: list[tuple[int, int]]) -> int:
    if not regions:
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    except (OSError, AttributeError):
        return 0
    total = 0
    for lo, hi in regions:
        for start, end in _resident_runs(libc, lo, hi):
            if (libc.madvise(start, end - start, MADV_HUGEPAGE) == 0
                    and libc.madvise(start, end - start, MADV_COLLAPSE) == 0):
                total += end - start
    return total
