"""The adapter pool the mixed-adapter graph (multi_lora.py) is fed: slot buffers per LoRA input, which adapter sits
in which slot, and how a run's rows are grouped by slot. Owned by the engine's adapters (`Adapters.for_engine`);
changed on the engine's thread, read (`weights_of`) from any.

    lora_A [1 + capacity, in, R]   lora_B [1 + capacity, R, out]   (DoRA factors [1 + capacity, out])
    slot 0: zeros (rows without an adapter); slot s: its adapter's A / B padded with zeros to the pool's rank R
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import math
import threading
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ortlora.adapters.validate import LoraInput
from ortlora.errors import AdapterError
from ortlora.naming import is_dora_scale, is_lora_a
from ortlora.runtime.multi_lora import GATHER, GROUP_SHAPE, ROW_SLOT, SCATTER, UNGROUP_SHAPE


@dataclass
class Groups:
    """How one run's rows meet the pool: slots [first, first + count) bound, and the four index inputs."""
    first: int
    count: int
    feeds: dict[str, np.ndarray]


class AdapterPool:
    """The slot buffers the mixed graph is fed: per LoRA input one [1 + capacity, in, R] (A) or
    [1 + capacity, R, out] (B) array; slot 0 stays zero (rows without an adapter). A DoRA factor input's buffer is
    [1 + capacity, out], ones wherever the slot's adapter has no factor for that module (slot 0 included).

    `place(adapters)` puts every adapter of a batch in a slot (copying only those not already there) and returns
    their slots; `groups(row_slots)` arranges a run's rows by slot; `views(first, count)` are the bound slots.
    R follows the adapters placed (the buffers are rebuilt, `generation` counts it): it grows when an adapter of a
    higher rank arrives and shrinks to theirs once the placed adapters need at most half of it, so memory and the
    step's cost do not stay grown after a large adapter leaves."""

    def __init__(self, lora_inputs: Mapping[str, LoraInput], capacity: int, dtype: np.dtype):
        if capacity < 1:
            raise AdapterError(f"the adapter pool needs at least one slot, got {capacity}")
        self.lora_inputs = dict(lora_inputs)
        self.dora = any(is_dora_scale(k) for k in self.lora_inputs)
        self.capacity = capacity
        self.dtype = np.dtype(dtype)
        self.rank = 0
        self.generation = 0
        self.buffers: dict[str, np.ndarray] = {}
        self.occupant: list = [None] * (1 + capacity)  # the Adapter in each slot (slot 0: none, ever)
        self.where: dict[int, int] = {}  # adapter uid -> slot
        self._used = [0] * (1 + capacity)  # last use, for LRU eviction
        self._written: list[dict[str, int]] = [{} for _ in range(1 + capacity)]  # see `_put`
        self._clock = itertools.count(1)
        # slot contents change on the engine's thread; `weights_of` may copy a slot out from any thread
        self._lock = threading.RLock()

    def place(self, adapters: Mapping[int, object]) -> dict[int, int]:
        """Slots for `adapters` (uid -> Adapter, at most `capacity`); returns uid -> slot."""
        if len(adapters) > self.capacity:
            raise AdapterError(f"{len(adapters)} adapters in one batch, but the pool has {self.capacity} slots")
        with self._lock:
            rank = max(a.rank for a in adapters.values())
            if rank > self.rank:
                self._rebuild(rank)
            now = next(self._clock)
            lent = False
            for uid, adapter in adapters.items():
                if uid not in self.where:
                    self._put(self._free_slot(adapters), adapter)
                    lent = lent or hasattr(adapter, "lend_to")
                self._used[self.where[uid]] = now
            self._fit()
            self._compact(adapters)
        if lent:  # the lent private copies were many small arrays: their pages stay in the heap unless trimmed
            _trim_heap()
        return {uid: self.where[uid] for uid in adapters}

    def _free_slot(self, needed: Mapping[int, object]) -> int:
        """The lowest empty slot (keeps the bound run short), else one whose adapter is not `needed`: an idle one
        (no request holds it) before a busy one; inside the run of busy slots if one is (a hole there is read by
        every step for nothing), else the nearest to it; the least recently used among equals."""
        for s in range(1, 1 + self.capacity):
            if self.occupant[s] is None:
                return s
        lo, hi = self._busy_span(needed)

        def cost(s: int) -> tuple[bool, int, int]:
            outside = 0 if hi < lo or lo <= s <= hi else min(abs(s - lo), abs(s - hi))  # hi < lo: none busy
            return self._busy(s, needed), outside, self._used[s]

        return min((s for s in range(1, 1 + self.capacity) if self.occupant[s].uid not in needed), key=cost)

    def _busy(self, slot: int, needed: Mapping[int, object]) -> bool:
        """Is `slot`'s adapter in this batch, or held by a running request (its owner's `refs`)?"""
        held = self.occupant[slot]
        return held is not None and (held.uid in needed or getattr(held, "refs", 0) > 0)

    def _busy_span(self, needed: Mapping[int, object]) -> tuple[int, int]:
        busy = [s for s in range(1, 1 + self.capacity) if self._busy(s, needed)]
        return (busy[0], busy[-1]) if busy else (1, 0)

    def _compact(self, needed: Mapping[int, object], moves: int = 2) -> None:
        """(lock held) Close holes in the run of busy slots: the last busy slot's adapter moves into the first hole
        (an empty slot, or one whose adapter no request holds: it leaves the pool, its weights private again).
        Requests come and go one at a time, so busy adapters end up spread over the slots with idle ones between,
        and every step reads the whole run (benchmarks/NOTES.md#adapter-registry); a move copies one adapter once.
        At most `moves` a call."""
        for _ in range(moves):
            lo, hi = self._busy_span(needed)
            hole = next((s for s in range(lo + 1, hi) if not self._busy(s, needed)), None)
            if hole is None:
                return
            self.evict_slot(hole)
            self._move(hi, hole)

    def _move(self, src: int, dst: int) -> None:
        """(lock held; `dst` empty) The adapter in `src` into `dst`: what `src` holds copied, what `dst` held beyond
        it cleared (see `_write`)."""
        for key, li in self.lora_inputs.items():
            width = self._written[src].get(li.name, 0)
            self._write(dst, key, li.name, _region(self.buffers[li.name][src], key, width) if width else None)
        adapter = self.occupant[src]
        self._written[dst] = dict(self._written[src])
        self.occupant[dst], self.occupant[src] = adapter, None
        self.where[adapter.uid] = dst
        self._used[dst] = self._used[src]

    def _put(self, slot: int, adapter) -> None:
        """Copy `adapter`'s weights into `slot` (rank padded with zeros: exact). An adapter that can lend its
        weights (`lend_to`: the adapters' owner's) then drops its private copy: the slot holds the only one."""
        self.evict_slot(slot)
        params = adapter.params
        written = {}
        for key, li in self.lora_inputs.items():
            width = self._write(slot, key, li.name, params.get(li.name))
            if width:
                written[li.name] = width
        self._written[slot] = written
        self.occupant[slot] = adapter
        self.where[adapter.uid] = slot
        if hasattr(adapter, "lend_to"):
            adapter.lend_to(self)

    def _write(self, slot: int, key: str, name: str, arr: np.ndarray | None) -> int:
        """`arr` (A [in, r], B [r, out], a factor [out]; None: absent) into `slot`'s block of input `name`; returns
        the width written (r, 1 for a factor, 0). Only what the slot's previous occupant wrote beyond it is cleared
        (`_written`: per slot, input -> width written), so a small adapter after a small one costs its own bytes,
        not the slot's."""
        block = self.buffers[name][slot]
        old = self._written[slot].get(name, 0)
        if is_dora_scale(key):  # ones where absent
            if arr is not None:
                block[:] = arr
            elif old:
                block[:] = 1
            return int(arr is not None)
        width = 0 if arr is None else arr.shape[1] if is_lora_a(key) else arr.shape[0]
        if width:
            _region(block, key, width)[:] = arr
        if old > width:
            (block[:, width:old] if is_lora_a(key) else block[width:old])[:] = 0
        return width

    def weights_of(self, adapter) -> dict[str, np.ndarray]:
        """A private copy of `adapter`'s weights as it gave them (shapes `adapter.shapes`), out of its slot; its
        own arrays when it has left the pool meanwhile."""
        with self._lock:
            slot = self.where.get(adapter.uid)
            if slot is None or self.occupant[slot] is not adapter:
                return adapter._params  # given back before this call took the lock
            return self._copy_out(slot, adapter)

    def _copy_out(self, slot: int, adapter) -> dict[str, np.ndarray]:
        """`adapter`'s weights out of `slot`, as views of one new allocation (freed whole when they go)."""
        flat = np.empty(sum(math.prod(shape) for shape in adapter.shapes.values()), self.dtype)
        out, at = {}, 0
        for name, shape in adapter.shapes.items():
            n = math.prod(shape)
            dst = out[name] = flat[at:at + n].reshape(shape)
            at += n
            dst[:] = _region(self.buffers[name][slot], name, shape[1] if is_lora_a(name) else shape[0])
        return out

    def evict_slot(self, slot: int) -> None:
        """Empty `slot`; its adapter gets its weights back (a private copy) when it had lent them."""
        with self._lock:
            held = self.occupant[slot]
            if held is not None:
                if hasattr(held, "take_back"):
                    held.take_back(self._copy_out(slot, held))
                del self.where[held.uid]
                self.occupant[slot] = None

    def forget(self, adapter) -> None:
        with self._lock:
            slot = self.where.get(adapter.uid)
            if slot is not None:
                self.evict_slot(slot)
                self._fit()

    def _fit(self) -> None:
        """(lock held) Shrink the buffers once the placed adapters need at most half of the pool's rank."""
        needed = max((a.rank for a in self.occupant if a is not None), default=0)
        if needed < self.rank and needed <= self.rank // 2:
            self._rebuild(needed)
            _trim_heap()

    def _rebuild(self, rank: int) -> None:
        """(lock held) Buffers of rank `rank`; the adapters placed keep their slots."""
        held = [(s, a) for s, a in enumerate(self.occupant) if a is not None]
        for slot, _ in held:
            self.evict_slot(slot)
        self.rank = rank
        self.generation += 1
        self.buffers = {}
        self._written = [{} for _ in range(1 + self.capacity)]
        for key, li in self.lora_inputs.items():
            if is_dora_scale(key):
                self.buffers[li.name] = np.ones((1 + self.capacity, li.shape[0]), self.dtype)
                continue
            shape = (li.shape[0], rank) if is_lora_a(key) else (rank, li.shape[1])
            self.buffers[li.name] = np.zeros((1 + self.capacity, *shape), self.dtype)
        for slot, adapter in held:
            self._put(slot, adapter)

    def views(self, first: int, count: int) -> dict[str, np.ndarray]:
        """Slots [first, first + count) of every buffer (contiguous views: binding them copies nothing)."""
        return {name: buf[first:first + count] for name, buf in self.buffers.items()}

    @staticmethod
    def groups(row_slots: list[int], dora: bool = False) -> Groups:
        """Rows by slot: slots [first, last] bound (slot 0 only when a row has no adapter), each slot's rows padded
        to the largest group with copies of row 0 (computed, then dropped); with `dora` (the pool's `dora`: the
        model has DoRA inputs), also each row's slot within the bound ones."""
        first, last = min(row_slots), max(row_slots)
        members: list[list[int]] = [[] for _ in range(last - first + 1)]
        for row, slot in enumerate(row_slots):
            members[slot - first].append(row)
        width = max(len(m) for m in members)
        gather = np.zeros(len(members) * width, np.int64)
        scatter = np.empty(len(row_slots), np.int64)
        for g, rows in enumerate(members):
            gather[g * width:g * width + len(rows)] = rows
            scatter[rows] = np.arange(g * width, g * width + len(rows))
        feeds = {GATHER: gather, SCATTER: scatter,
                 GROUP_SHAPE: np.array([len(members), -1, 0], np.int64),  # [S·G,T,in] -> [S,G·T,in]
                 UNGROUP_SHAPE: np.array([len(members) * width, -1, 0], np.int64)}  # [S,G·T,out] -> [S·G,T,out]
        if dora:
            feeds[ROW_SLOT] = np.asarray(row_slots, np.int64) - first
        return Groups(first, len(members), feeds)


def _region(block: np.ndarray, key: str, width: int) -> np.ndarray:
    """The part of a slot's block that an adapter of rank `width` fills: A [in, R] -> [in, :width], B [R, out] ->
    [:width, out], a DoRA factor [out] whole."""
    if is_dora_scale(key):
        return block
    return block[:, :width] if is_lora_a(key) else block[:width]


def _trim_heap() -> None:
    """Return the C heap's free pages to the system (glibc's malloc_trim; elsewhere nothing)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None
