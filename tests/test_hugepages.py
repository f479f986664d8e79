"""ortlora.runtime.hugepages: new, resident anonymous memory (like onnxruntime's pre-packed weights) is moved onto
2 MB pages in place; memory that is not resident is left alone (collapsing it would grow the process)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from ortlora.runtime import hugepages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not THP.is_file()
                                or "[never]" in THP.read_text(), reason="needs Linux transparent huge pages")


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


def test_new_resident_regions_go_onto_huge_pages_and_untouched_ones_stay_out():
    from numpy._core.multiarray import _set_madvise_hugepage

    previous = _set_madvise_hugepage(False)  # numpy would ask for huge pages itself; onnxruntime's malloc does not
    try:
        before = hugepages.anonymous_regions()
        weights = np.arange(24 << 20, dtype=np.float32)  # 96 MB, every page written
        untouched = np.empty(64 << 20, dtype=np.uint8)  # mapped, never written: not resident
        expected = weights.copy()
        assert _region(weights)["AnonHugePages"] == 0
        done = hugepages.collapse_new_regions(before)
    finally:
        _set_madvise_hugepage(previous)
    if done == 0:
        pytest.skip("the kernel refused MADV_COLLAPSE (older than Linux 6.1, or THP defrag off)")
    assert done >= 90 << 20  # the whole 2 MB pages inside the 96 MB region
    assert _region(weights)["AnonHugePages"] >= 90 << 10
    assert np.array_equal(weights, expected)  # contents unchanged
    assert _region(untouched)["Rss"] < 4 << 10  # still not resident: skipped
    assert hugepages.collapse_new_regions(hugepages.anonymous_regions()) == 0  # nothing new since


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("ORTLORA_HUGEPAGES", "0")
    before = hugepages.anonymous_regions()
    weights = np.ones(48 << 20, dtype=np.uint8)
    assert hugepages.collapse_new_regions(before) == 0 and weights.all()
