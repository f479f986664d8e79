"""The adapter pool the mixed-adapter graph (multi_lora.py) is fed: per module class, slot buffers per LoRA input,
which adapter sits in which slot, and how a run's rows are grouped by slot. Owned by the engine's adapters
(`Adapters.for_engine`); changed on the engine's thread, read (`weights_of`) from any.

    per class (multi_lora.module_classes: the attention block's modules, the MLP's, ...), a `SlotRun`:
    lora_A [1 + capacity, in, R]   lora_B [1 + capacity, R, out]   (DoRA factors [1 + capacity, out])
    slot 0: zeros (rows without an adapter, or whose adapter lacks the class); slot s: its adapter's A / B of
    the class's modules, padded with zeros to the class's rank R

An adapter has a slot in each class it has modules in, and no slot in the others: a step binds per class only the
slots of its adapters that have the class (an attention-only adapter costs the MLP's LoRA nothing).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import math
import threading
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ortlora.adapters.validate import LoraInput
from ortlora.errors import AdapterError
from ortlora.naming import is_dora_scale, is_lora_a
from ortlora.runtime.multi_lora import IndexNames, index_names, module_classes


@dataclass
class Groups:
    """How one run's rows meet one class's slots: slots [first, first + count) bound, and its index inputs."""
    first: int
    count: int
    feeds: dict[str, np.ndarray]


def group_rows(row_slots: Sequence[int], names: IndexNames, dora: bool = False) -> Groups:
    """Rows by slot: slots [first, last] bound (slot 0 only when a row meets it), each slot's rows padded to the
    largest group with copies of row 0 (computed, then dropped); slot 0's group is one of its rows, which every row
    at slot 0 reads back, and is not live (its product zeroed: multi_lora.py), so rows that add nothing neither
    widen the groups nor are multiplied. With `dora` (the class has DoRA inputs), also each row's slot within the
    bound ones."""
    first, last = min(row_slots), max(row_slots)
    members: list[list[int]] = [[] for _ in range(last - first + 1)]
    for row, slot in enumerate(row_slots):
        members[slot - first].append(row)
    at_zero = members[0] if first == 0 else []
    if at_zero:
        members[0] = at_zero[:1]
    width = max(len(m) for m in members)
    gather = np.zeros(len(members) * width, np.int64)
    scatter = np.empty(len(row_slots), np.int64)
    for g, rows in enumerate(members):
        gather[g * width:g * width + len(rows)] = rows
        scatter[rows] = np.arange(g * width, g * width + len(rows))
    scatter[at_zero] = 0
    live = np.ones((len(members), 1, 1), bool)
    live[0] = not at_zero
    feeds = {names.gather: gather, names.scatter: scatter,
             names.group_shape: np.array([len(members), -1, 0], np.int64),  # [S·G,T,in] -> [S,G·T,in]
             names.ungroup_shape: np.array([len(members) * width, -1, 0], np.int64),  # [S,G·T,out] -> [S·G,T,out]
             names.live: live}
    if dora:
        feeds[names.row_slot] = np.asarray(row_slots, np.int64) - first
    return Groups(first, len(members), feeds)


class SlotRun:
    """One module class's slots: per LoRA input of the class one [1 + capacity, in, R] (A) or [1 + capacity, R, out]
    (B) buffer, or [1 + capacity, out] (a DoRA factor: ones wherever the slot's adapter has none, slot 0 included).
    R follows the adapters placed (`rebuild`)."""

    def __init__(self, k: int, lora_inputs: Mapping[str, LoraInput], capacity: int, dtype: np.dtype):
        self.lora_inputs = dict(lora_inputs)
        self.names = index_names(k)
        self.dora = any(is_dora_scale(key) for key in self.lora_inputs)
        self.capacity = capacity
        self.dtype = dtype
        self.rank = 0
        self.buffers: dict[str, np.ndarray] = {}
        self.occupant: list = [None] * (1 + capacity)  # the Adapter in each slot (slot 0: none, ever)
        self.where: dict[int, int] = {}  # adapter uid -> slot
        self._written: list[dict[str, int]] = [{} for _ in range(1 + capacity)]  # see `_write`

    def rank_of(self, shapes: Mapping[str, tuple]) -> int:
        """The rank an adapter (its tensors' shapes) needs here: 0 when it has none of the class's modules (then
        it takes no slot here); 1 for a DoRA factor alone."""
        rank = 0
        for key, li in self.lora_inputs.items():
            shape = shapes.get(li.name)
            if shape is not None:
                rank = max(rank, shape[1] if is_lora_a(key) else 1 if is_dora_scale(key) else shape[0])
        return rank

    def put(self, slot: int, adapter, params: Mapping[str, np.ndarray]) -> None:
        """`adapter`'s weights of this class (from `params`) into the empty `slot` (rank padded with zeros: exact)."""
        written = {}
        for key, li in self.lora_inputs.items():
            width = self._write(slot, key, li.name, params.get(li.name))
            if width:
                written[li.name] = width
        self._written[slot] = written
        self.occupant[slot] = adapter
        self.where[adapter.uid] = slot

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

    def copy_out(self, slot: int, shapes: Mapping[str, tuple], out: dict[str, np.ndarray]) -> None:
        """The class's part of the weights in `slot` into `out` (name -> array of `shapes`' shape)."""
        for key, li in self.lora_inputs.items():
            dst = out.get(li.name)
            if dst is not None:
                dst[:] = _region(self.buffers[li.name][slot], key, shapes[li.name][1] if is_lora_a(key)
                                 else shapes[li.name][0])

    def clear(self, slot: int) -> None:
        """The slot is empty (its contents stay until the next occupant overwrites them: `_written`)."""
        held = self.occupant[slot]
        if held is not None:
            del self.where[held.uid]
            self.occupant[slot] = None

    def move(self, src: int, dst: int) -> None:
        """The adapter in `src` into the empty `dst`: what `src` holds copied, what `dst` held beyond it cleared."""
        for key, li in self.lora_inputs.items():
            width = self._written[src].get(li.name, 0)
            self._write(dst, key, li.name, _region(self.buffers[li.name][src], key, width) if width else None)
        adapter = self.occupant[src]
        self._written[dst] = dict(self._written[src])
        self.occupant[dst], self.occupant[src] = adapter, None
        self.where[adapter.uid] = dst

    def rebuild(self, rank: int) -> None:
        """Buffers of rank `rank`; the adapters placed keep their slots and weights."""
        held = [(s, a, {li.name: _region(self.buffers[li.name][s], key, self._written[s][li.name]).copy()
                        for key, li in self.lora_inputs.items() if li.name in self._written[s]})
                for s, a in enumerate(self.occupant) if a is not None]
        self.rank = rank
        self.buffers = {}
        self._written = [{} for _ in range(1 + self.capacity)]
        for key, li in self.lora_inputs.items():
            if is_dora_scale(key):
                self.buffers[li.name] = np.ones((1 + self.capacity, li.shape[0]), self.dtype)
                continue
            shape = (li.shape[0], rank) if is_lora_a(key) else (rank, li.shape[1])
            self.buffers[li.name] = np.zeros((1 + self.capacity, *shape), self.dtype)
        for slot, adapter, params in held:
            self.occupant[slot] = None
            self.put(slot, adapter, params)

    def views(self, first: int, count: int) -> dict[str, np.ndarray]:
        """Slots [first, first + count) of every buffer (contiguous views: binding them copies nothing)."""
        return {name: buf[first:first + count] for name, buf in self.buffers.items()}

    def groups(self, row_slots: Sequence[int]) -> Groups:
        return group_rows(row_slots, self.names, self.dora)


class AdapterPool:
    """The slots the mixed graph is fed, one `SlotRun` per module class (`runs`, in multi_lora's class order).

    `place(adapters)` puts every adapter of a batch in a slot of each class it has (copying only those not already
    placed) and returns their slots; `runs[k].groups(row_slots)` arranges a run's rows by class k's slots;
    `runs[k].views(first, count)` are the bound slots. An adapter is placed whole (a slot in each of its classes) or
    not at all, and leaves whole. A class's rank follows the adapters placed there (its buffers rebuilt: `generation`
    counts it): it grows when an adapter of a higher rank arrives and shrinks to theirs once they need at most half
    of it, so memory and the step's cost do not stay grown after a large adapter leaves (`_fit`)."""

    def __init__(self, lora_inputs: Mapping[str, LoraInput], capacity: int, dtype: np.dtype):
        if capacity < 1:
            raise AdapterError(f"the adapter pool needs at least one slot, got {capacity}")
        self.lora_inputs = dict(lora_inputs)
        self.capacity = capacity
        self.dtype = np.dtype(dtype)
        self.runs = [SlotRun(k, {key: self.lora_inputs[key] for key in keys}, capacity, self.dtype)
                     for k, keys in enumerate(module_classes(self.lora_inputs))]
        self.generation = 0
        self.placed: dict[int, object] = {}  # uid -> the Adapter, with a slot in each class it has
        self._ranks: dict[int, tuple[int, ...]] = {}  # uid -> its rank in each class (0: no slot there)
        self._used: dict[int, int] = {}  # uid -> last use, for LRU eviction
        self._clock = itertools.count(1)
        # slot contents change on the engine's thread; `weights_of` may copy a slot out from any thread
        self._lock = threading.RLock()

    def place(self, adapters: Mapping[int, object]) -> dict[int, tuple[int, ...]]:
        """Slots for `adapters` (uid -> Adapter, at most `capacity`); returns uid -> its slot in each class (0 in
        the classes it has no module of)."""
        if len(adapters) > self.capacity:
            raise AdapterError(f"{len(adapters)} adapters in one batch, but the pool has {self.capacity} slots")
        with self._lock:
            arriving = {uid: self._ranks_of(a) for uid, a in adapters.items() if uid not in self.placed}
            for k, run in enumerate(self.runs):  # one rebuild per class for the whole batch
                rank = max((ranks[k] for ranks in arriving.values()), default=0)
                if rank > run.rank:
                    run.rebuild(rank)
                    self.generation += 1
            now = next(self._clock)
            for uid, ranks in arriving.items():
                self._put(adapters[uid], ranks, adapters)
            for uid in adapters:
                self._used[uid] = now
            lent = any(hasattr(adapters[uid], "lend_to") for uid in arriving)
            for k, run in enumerate(self.runs):  # from slot 1 where a row meets slot 0 (an adapter lacks the class)
                self._compact(run, adapters, any(not self._ranks[uid][k] for uid in adapters))
            self._fit()
            slots = {uid: tuple(run.where.get(uid, 0) for run in self.runs) for uid in adapters}
        if lent:  # the lent private copies were many small arrays: their pages stay in the heap unless trimmed
            _trim_heap()
        return slots

    def _ranks_of(self, adapter) -> tuple[int, ...]:
        shapes = _shapes(adapter)
        return tuple(run.rank_of(shapes) for run in self.runs)

    def _put(self, adapter, ranks: tuple[int, ...], needed: Mapping[int, object]) -> None:
        """(lock held) `adapter` into a slot of each class it has (`ranks`: its rank in each, within the class's).
        An adapter that can lend its weights (`lend_to`: the adapters' owner's) then drops its private copy: the
        slots hold the only one."""
        params = adapter.params
        for run, rank in zip(self.runs, ranks):
            if rank:
                run.put(self._free_slot(run, needed), adapter, params)
        self.placed[adapter.uid] = adapter
        self._ranks[adapter.uid] = ranks
        if hasattr(adapter, "lend_to"):
            adapter.lend_to(self)

    def _free_slot(self, run: SlotRun, needed: Mapping[int, object]) -> int:
        """(lock held) The lowest empty slot of `run` (keeps the bound run short), else one whose adapter is not
        `needed` (it leaves the pool): an idle one (no request holds it) before a busy one; inside the run of busy
        slots if one is (a hole there is read by every step for nothing), else the nearest to it; the least
        recently used among equals."""
        for s in range(1, 1 + self.capacity):
            if run.occupant[s] is None:
                return s
        lo, hi = _busy_span(run, needed)

        def cost(s: int) -> tuple[bool, int, int]:
            outside = 0 if hi < lo or lo <= s <= hi else min(abs(s - lo), abs(s - hi))  # hi < lo: none busy
            return _busy(run, s, needed), outside, self._used.get(run.occupant[s].uid, 0)

        slot = min((s for s in range(1, 1 + self.capacity) if run.occupant[s].uid not in needed), key=cost)
        self._evict(run.occupant[slot])
        return slot

    def _compact(self, run: SlotRun, needed: Mapping[int, object], from_one: bool, moves: int = 2) -> None:
        """(lock held) Close holes in `run`'s run of busy slots (`from_one`: between slot 1 and them too, for a step
        that binds slot 0): the last busy slot's adapter moves into the first hole (an empty slot, or one whose
        adapter no request holds: it leaves the pool, its weights private again). Requests come and go one at a
        time, so busy adapters end up spread over the slots with idle ones between, and every step reads the whole
        run (benchmarks/NOTES.md#adapter-registry); a move copies one adapter's part once. At most `moves` a call."""
        for _ in range(moves):
            lo, hi = _busy_span(run, needed)
            hole = next((s for s in range(1 if from_one else lo + 1, hi) if not _busy(run, s, needed)), None)
            if hole is None:
                return
            if run.occupant[hole] is not None:
                self._evict(run.occupant[hole])
            run.move(hi, hole)

    def weights_of(self, adapter) -> dict[str, np.ndarray]:
        """A private copy of `adapter`'s weights as it gave them (shapes `adapter.shapes`), out of its slots; its
        own arrays when it has left the pool meanwhile."""
        with self._lock:
            if self.placed.get(adapter.uid) is not adapter:
                return adapter._params  # given back before this call took the lock
            return self._copy_out(adapter)

    def _copy_out(self, adapter) -> dict[str, np.ndarray]:
        """`adapter`'s weights out of its slots, as views of one new allocation (freed whole when they go)."""
        shapes = _shapes(adapter)
        flat = np.empty(sum(math.prod(shape) for shape in shapes.values()), self.dtype)
        out, at = {}, 0
        for name, shape in shapes.items():
            n = math.prod(shape)
            out[name] = flat[at:at + n].reshape(shape)
            at += n
        for run in self.runs:
            slot = run.where.get(adapter.uid)
            if slot is not None:
                run.copy_out(slot, shapes, out)
        return out

    def _evict(self, adapter) -> None:
        """(lock held) `adapter` leaves every slot it has; it gets its weights back (a private copy) when it had
        lent them."""
        if hasattr(adapter, "take_back"):
            adapter.take_back(self._copy_out(adapter))
        for run in self.runs:
            slot = run.where.get(adapter.uid)
            if slot is not None:
                run.clear(slot)
        del self.placed[adapter.uid]
        self._ranks.pop(adapter.uid, None)
        self._used.pop(adapter.uid, None)

    def forget(self, adapter) -> None:
        with self._lock:
            if self.placed.get(adapter.uid) is adapter:
                self._evict(adapter)
                self._fit()

    def _fit(self) -> None:
        """(lock held) Shrink a class's buffers once its placed adapters need at most half of its rank. A class left
        without adapters keeps its buffers (it is not bound meanwhile): traffic whose adapters mostly lack a class
        would otherwise rebuild it, and drop every binding, each time one that has it comes and goes."""
        shrunk = False
        for k, run in enumerate(self.runs):
            needed = max((ranks[k] for ranks in self._ranks.values()), default=0)
            if 0 < needed <= run.rank // 2:
                run.rebuild(needed)
                self.generation += 1
                shrunk = True
        if shrunk:
            _trim_heap()


def _shapes(adapter) -> dict[str, tuple]:
    shapes = getattr(adapter, "shapes", None)
    return dict(shapes) if shapes is not None else {k: v.shape for k, v in adapter.params.items()}


def _busy(run: SlotRun, slot: int, needed: Mapping[int, object]) -> bool:
    """Is `slot`'s adapter in this batch, or held by a running request (its owner's `refs`)?"""
    held = run.occupant[slot]
    return held is not None and (held.uid in needed or getattr(held, "refs", 0) > 0)


def _busy_span(run: SlotRun, needed: Mapping[int, object]) -> tuple[int, int]:
    busy = [s for s in range(1, 1 + run.capacity) if _busy(run, s, needed)]
    return (busy[0], busy[-1]) if busy else (1, 0)


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
