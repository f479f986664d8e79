"""The adapters a model has loaded, by name: memory-mapped, checked against the model, reference counted.

    store.load("a1.onnx_adapter", name="a1")   # zero-copy views of the file (cast only for a dtype mismatch)
    a = store.acquire("a1")                     # a running generation holds it ...
    store.unload("a1")                          # ... so this raises AdapterError (or waits with wait=True)
    store.release(a)

With a `capacity`, loading one adapter too many unloads the least recently used adapter that nothing holds.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np

from ortlora import naming
from ortlora.adapters.onnx_adapter import open_onnx_adapter
from ortlora.adapters.validate import LoraInput, check_adapter
from ortlora.errors import AdapterError

_ids = itertools.count(1)


@dataclass(eq=False)
class Adapter:
    name: str
    path: Path
    params: dict[str, np.ndarray]  # graph input name -> array in the model's dtype: A [in, r], B [r, out]
    uid: int = field(default_factory=lambda: next(_ids))  # distinguishes a reload under the same name
    refs: int = 0
    finite: bool | None = None  # None until check_finite() has looked

    def check_finite(self) -> None:
        """Raise AdapterError if a tensor holds NaN or inf: such an adapter turns its rows' logits into NaN, from
        which no token can be sampled. Checked once, at the adapter's first use (a pass over its weights: ~4 ms
        for rank 16 on Qwen2.5-0.5B), not at load, which stays a memory map and a shape check."""
        if self.finite is None:
            self.finite = all(np.isfinite(a.sum()) for a in self.params.values())  # NaN and inf survive a sum
        if not self.finite:
            bad = next(n for n, a in self.params.items() if not np.isfinite(a).all())
            raise AdapterError(f"adapter {self.name!r} ({self.path}): {bad} holds NaN or infinite values")

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.params.values())

    @property
    def rank(self) -> int:
        return max((a.shape[1] for k, a in self.params.items() if naming.is_lora_a(k)), default=0)

    def __repr__(self) -> str:
        return f"Adapter({self.name!r}, {str(self.path)!r}, rank={self.rank}, tensors={len(self.params)})"


class AdapterStore:
    def __init__(self, lora_inputs: Mapping[str, LoraInput], capacity: int | None = None):
        if capacity is not None and capacity < 1:
            raise AdapterError(f"adapter capacity must be at least 1, got {capacity}")
        self.lora_inputs = dict(lora_inputs)
        self.capacity = capacity
        self._adapters: OrderedDict[str, Adapter] = OrderedDict()  # least recently used first
        self._cond = threading.Condition()
        self._on_unload: list[Callable[[Adapter], None]] = []

    # -- loading -------------------------------------------------------------------------------------------
    def load(self, path: str | Path, name: str | None = None, *, checked: Mapping[str, np.ndarray] | None = None
             ) -> Adapter:
        """Map an `.onnx_adapter` file and check that it fits the model; `name` defaults to the file's stem.

        Loading a name again replaces the adapter (an error while a generation holds the old one)."""
        path = Path(path)
        name = name or path.name.removesuffix(".onnx_adapter")
        if checked is None:  # else: the caller parsed this very file and checked it against this model just now
            checked = open_onnx_adapter(path).params
            check_adapter(checked, self.lora_inputs, str(path), allow_cast=True)
        params = checked
        feeds = {}
        for key, arr in params.items():
            want = self.lora_inputs[key]
            feeds[want.name] = arr if arr.dtype == want.dtype else arr.astype(want.dtype)
        adapter = Adapter(name, path, feeds)
        with self._cond:
            old = self._adapters.get(name)
            if old is not None:
                if old.refs:
                    raise AdapterError(f"cannot replace adapter {name!r}: {old.refs} running generation(s) use it")
                self._drop(old)
            self._make_room()
            self._adapters[name] = adapter
        return adapter

    def _make_room(self) -> None:
        if self.capacity is None or len(self._adapters) < self.capacity:
            return
        idle = next((a for a in self._adapters.values() if not a.refs), None)
        if idle is None:
            raise AdapterError(f"cannot load another adapter: all {self.capacity} loaded adapters are in use "
                               f"({', '.join(self._adapters)}); raise the capacity or wait for a generation to end")
        self._drop(idle)

    def unload(self, name: str, wait: bool | float = False) -> None:
        """Forget adapter `name`. If a running generation holds it: raise AdapterError, or with `wait` (True or
        seconds) block until every holder has released it."""
        deadline = None if wait is True else time.monotonic() + float(wait) if wait else 0.0
        with self._cond:
            adapter = self._get(name)
            while adapter.refs:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise AdapterError(f"cannot unload adapter {name!r}: {adapter.refs} running generation(s) use "
                                       "it (let them finish, or unload with wait=True)")
                self._cond.wait(left)
            if self._adapters.get(name) is adapter:
                self._drop(adapter)

    def _drop(self, adapter: Adapter) -> None:
        del self._adapters[adapter.name]
        for callback in self._on_unload:
            callback(adapter)

    def on_unload(self, callback: Callable[[Adapter], None]) -> None:
        """Call `callback(adapter)` whenever an adapter leaves the store (caches keyed on it can drop it)."""
        self._on_unload.append(callback)

    # -- use ------------------------------------------------------------------------------------------------
    def _get(self, name: str) -> Adapter:
        adapter = self._adapters.get(name)
        if adapter is None:
            loaded = ", ".join(self._adapters) or "none"
            raise AdapterError(f"no adapter named {name!r} is loaded (loaded: {loaded})")
        return adapter

    def get(self, name: str) -> Adapter:
        with self._cond:
            return self._get(name)

    def acquire(self, name: str | None) -> Adapter | None:
        """Hold adapter `name` (None = the base model) for a generation; pair with `release`."""
        if name is None:
            return None
        with self._cond:
            adapter = self._get(name)
            adapter.refs += 1
            self._adapters.move_to_end(name)
        try:
            adapter.check_finite()  # outside the lock: the first time, it reads every weight
        except AdapterError:
            self.release(adapter)
            raise
        return adapter

    def release(self, adapter: Adapter | None) -> None:
        if adapter is None:
            return
        with self._cond:
            adapter.refs -= 1
            self._cond.notify_all()

    def names(self) -> list[str]:
        with self._cond:
            return list(self._adapters)

    def __contains__(self, name: str) -> bool:
        return name in self._adapters

    def __len__(self) -> int:
        return len(self._adapters)

    def __iter__(self) -> Iterator[Adapter]:
        return iter(list(self._adapters.values()))
