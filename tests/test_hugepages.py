"""ortlora.runtime.hugepages: new, resident anonymous memory (like onnxruntime's pre-packed weights) is moved onto
2 MB pages in place; memory that is not resident is left alone (collapsing it would grow the process)."""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np
import pytest

from ortlora.runtime import hugepages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
pytestmark = pytest.mark.skipif(  # "always" gives new memory huge pages unasked; "never" gives none
    not sys.platform.startswith("linux") or not THP.is_file() or "[madvise]" not in THP.read_text(),
    reason="needs Linux transparent huge pages in madvise mode")


def _region(arr: np.ndarray) -> dict[str, int]:
    """smaps fields (kB) summed over the mappings that overlap `arr` (madvise may split its mapping in parts)."""
    lo, hi = arr.ctypes.data, arr.ctypes.data + arr.nbytes
    fields: dict[str, int] = {}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(None, 1)[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start < hi and lo < end
        elif inside and head.endswith(":") and line.split()[-1] == "kB":
            fields[head[:-1]] = fields.get(head[:-1], 0) + int(line.split()[1])
    return fields


def _anonymous(size: int) -> tuple[int, np.ndarray]:
    """A private anonymous mapping, as malloc makes for a large block (no madvise of its own)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    addr = libc.mmap(None, size, 0x1 | 0x2, 0x02 | 0x20, -1, 0)  # PROT_READ|WRITE, MAP_PRIVATE|ANONYMOUS
    assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
    return addr, np.frombuffer((ctypes.c_uint8 * size).from_address(addr), np.uint8)


def _unmap(addr: int, size: int) -> None:
    libc = ctypes.CDLL(None)
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.munmap(addr, size)


def test_new_resident_regions_go_onto_huge_pages_and_untouched_ones_stay_out():
    before = hugepages.anonymous_regions()
    w_addr, raw = _anonymous(96 << 20)
    u_addr, untouched = _anonymous(64 << 20)  # mapped, never written: not resident
    try:
        weights = raw.view(np.float32)
        weights[:] = np.arange(weights.size, dtype=np.float32)  # every page written
        assert _region(weights)["AnonHugePages"] == 0
        done = hugepages.collapse_new_regions(before)
        if done == 0:
            pytest.skip("the kernel refused MADV_COLLAPSE (older than Linux 6.1, or THP defrag off)")
        assert done >= 94 << 20  # the whole 2 MB pages inside the 96 MB region
        assert _region(weights)["AnonHugePages"] >= 94 << 10
        assert np.array_equal(weights, np.arange(weights.size, dtype=np.float32))  # contents unchanged
        assert _region(untouched)["Rss"] < 2 << 10  # skipped (a collapse makes 2 MB resident at once)
        assert hugepages.collapse_new_regions(hugepages.anonymous_regions()) == 0  # nothing new since
    finally:
        _unmap(w_addr, 96 << 20)
        _unmap(u_addr, 64 << 20)


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("ORTLORA_HUGEPAGES", "0")
    before = hugepages.anonymous_regions()
    weights = np.ones(48 << 20, dtype=np.uint8)
    assert hugepages.collapse_new_regions(before) == 0 and weights.all()


def test_collapsing_in_the_background_finds_the_regions_now_and_keeps_contents():
    """The engine collapses on a thread (seconds for a large model): the regions are those new when it is called
    (memory mapped later stays out), and contents written while the thread works are kept."""
    before = hugepages.anonymous_regions()
    w_addr, raw = _anonymous(64 << 20)
    late_addr = None
    try:
        weights = raw.view(np.float32)
        weights[:] = 1.0
        thread = hugepages.collapse_in_background(before)
        assert thread is not None
        late_addr, late = _anonymous(64 << 20)  # appears after the call: not the thread's
        late[:] = 1
        weights[::1024] = 2.0  # written while the thread may be collapsing
        thread.join(60)
        assert not thread.is_alive()
        if _region(weights)["AnonHugePages"] == 0:
            pytest.skip("the kernel refused MADV_COLLAPSE (older than Linux 6.1, or THP defrag off)")
        assert _region(late)["AnonHugePages"] == 0
        assert (weights[::1024] == 2.0).all() and weights.sum(dtype=np.float64) == weights.size + weights[::1024].size
        assert hugepages.collapse_in_background(hugepages.anonymous_regions()) is None  # nothing new
    finally:
        _unmap(w_addr, 64 << 20)
        if late_addr is not None:
            _unmap(late_addr, 64 << 20)


def test_kv_cache_memory_grows_by_the_tokens_written_not_by_huge_pages():
    """The KV cache is written a token at a time at the start of many stripes (a layer's (slot, head) regions).
    numpy advises huge pages for a large array, so one token a stripe makes 2 MB resident; `sparse_zeros` keeps
    such an array on small pages: 4 KB a stripe. Both are measured here on the same pattern."""
    shape = (16, 2, 2048, 64)  # 16 slots x 2 heads of 2048 positions x 64 floats: 512 KB a stripe, 16 MB in all
    stripes = shape[0] * shape[1]

    def grown(make) -> tuple[int, int]:
        arr = make(shape, np.float32)
        before = _region(arr).get("Rss", 0)
        arr[:, :, :4] = 1.0  # 4 tokens in every stripe: 1 KB each
        after = _region(arr)
        return after.get("Rss", 0) - before, after.get("AnonHugePages", 0)

    plain, plain_huge = grown(np.zeros)  # first: freed memory that was advised otherwise may be reused
    small, small_huge = grown(hugepages.sparse_zeros)
    assert small_huge == 0 and small <= stripes * 4 + 8, small  # one 4 KB page a stripe (and the array's edges)
    if plain_huge == 0:  # this numpy or kernel gave the plain array no huge pages: nothing to compare
        pytest.skip(f"np.zeros got no huge pages here (RSS grew {plain} kB)")
    assert plain >= 4 * small, (plain, small)
