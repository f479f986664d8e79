"""`Adapters`: the one owner of every adapter's life in a process.

    register ──> check (parse, fit the model, finite, probe step) ──> loaded (private copy; LRU of `capacity`)
        │                                                                 │ acquire / release (refcounts)
        │                                                                 ▼
        └── unregister / re-register: the old version retires;     pool slot (mixed batches; the pool's LRU)
            it is dropped when its last holder releases it                │
                                                                          ▼ evicted / dropped: on_unload callbacks

A request may also ask for a derived adapter (`acquire("a1", scale=0.5)`, `acquire({"a1": 0.7, "a2": 0.3})`): its
`Recipe` is combined exactly from the components' current versions (ortlora.adapters.merge.combine), cached by
(recipe, component versions), refcounted and placed in the pool like any adapter; a component's going retires the
derived adapters built from it. Scale 0 (all weights 0) is the base model.

A name maps to its current version; each (re-)registration is a new `Adapter` with its own uid, so a request holds
exactly the weights it started with. A registration either fully succeeds or leaves nothing behind (no file, no
name). Loaded weights are private copies: rewriting a file in place (as `cp` does) cannot reach a running request.
Registered sources are files; with a `directory`, every `.onnx_adapter` in it is registered by stem without being
opened and loaded on first use.

Ranks are bounded (`max_rank`, vLLM's `--max-lora-rank`): an adapter, or a combination (its rank is the sum of its
parts' per module), above the bound is refused with AdapterInvalid naming it, since every row of a batch pays for
the pool's rank and its memory is slots x rank.

Failures are typed (ortlora.errors): AdapterNotFound, AdapterExists, AdapterInvalid, AdapterBusy.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Mapping, Protocol

import numpy as np

from ortlora import naming
from ortlora.adapters.merge import AdapterSpec, Recipe, combine  # noqa: F401 (AdapterSpec: for callers)
from ortlora.adapters.onnx_adapter import SUFFIX, open_onnx_adapter
from ortlora.adapters.validate import LoraInput, model_feeds
from ortlora.errors import AdapterBusy, AdapterError, AdapterExists, AdapterInvalid, AdapterNotFound
from ortlora.adapters.cached import PEFT_FILES, convert_cached
from ortlora.runtime.adapter_dir import CACHE, AdapterDirectory
from ortlora.runtime.pool import AdapterPool

_uids = itertools.count(1)
DERIVED_CAPACITY = 16  # derived adapters kept while idle (rebuilt from their components on a later use)
# rank 64 covers the ranks adapters are trained with (8-64) while the LoRA path stays a few % of a step
# (Qwen2.5-0.5B, all linear layers: ~7% of the base model's multiply-adds per token) and a pool slot ~140 MB fp32
DEFAULT_MAX_RANK = 64


class Adapter:
    """One loaded version of a named adapter. Its weights (graph input name -> array in the model's dtype: A [in, r],
    B [r, out], DoRA factors [out]) are held once: privately, or, while it sits in the mixed-batch pool, only in its
    pool slot (the pool gives them back when the slot goes). `params` reads them either way."""

    def __init__(self, name: str, params: dict[str, np.ndarray], path: Path | None = None):
        self.name = name
        self.path = path
        self.uid = next(_uids)
        self.refs = 0
        self.retired = False  # unregistered or replaced: dropped when the last holder releases it
        self.shapes = {k: v.shape for k, v in params.items()}
        self.rank = max((v.shape[1] for k, v in params.items() if naming.is_lora_a(k)), default=0)
        self._params: dict[str, np.ndarray] | None = params
        self._home: AdapterPool | None = None  # the pool holding the weights instead of _params

    @property
    def params(self) -> dict[str, np.ndarray]:
        """The weights; while they live in a pool slot, a copy out of it (taken under the pool's lock). Any thread."""
        while True:  # the engine's thread may lend or take them back meanwhile: read until one side holds them
            home = self._home
            if home is not None:
                return home.weights_of(self)
            params = self._params
            if params is not None:
                return params

    def lend_to(self, pool: AdapterPool) -> None:
        """(the pool's lock held) The pool's slot now holds the weights: the private copy goes."""
        self._params, self._home = None, pool

    def take_back(self, params: dict[str, np.ndarray]) -> None:
        """(the pool's lock held) The slot is going: the weights are private again."""
        self._params, self._home = params, None

    def __repr__(self) -> str:
        return f"Adapter({self.name!r}, uid={self.uid}, rank={self.rank}, tensors={len(self.shapes)})"


class AdapterLeases(Protocol):
    """What a running batch needs from the adapters' owner: to give back what a request held."""

    def release(self, adapter: Adapter | None) -> None: ...


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    loaded: bool
    path: str | None  # relative to the adapters directory (never a server path)


class Adapters:
    """Thread-safe. `probe(params) -> logits` runs one short input through the model with an adapter's tensors;
    `pool` holds the adapters of mixed batches: the engine places them in it on its own thread, and the unload
    callbacks (queued to that thread) take them out."""

    def __init__(self, lora_inputs: Mapping[str, LoraInput], *, capacity: int | None = None,
                 directory: str | Path | None = None, reserved: tuple[str, ...] = (),
                 probe: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None,
                 pool: AdapterPool | None = None, base: Callable[[str], np.ndarray] | None = None,
                 max_rank: int | None = DEFAULT_MAX_RANK):
        if capacity is not None and capacity < 1:
            raise AdapterError(f"adapter capacity must be at least 1, got {capacity}")
        if max_rank is not None and max_rank < 1:
            raise AdapterError(f"the maximum LoRA rank must be at least 1, got {max_rank}")
        self.max_rank = max_rank
        self.lora_inputs = dict(lora_inputs)
        self.capacity = capacity
        self.directory = AdapterDirectory(directory, reserved) if directory is not None else None
        self.reserved = set(reserved)
        self.probe = probe
        self.pool = pool
        self.base = base  # module -> base weight [out, in]: what scaling a DoRA adapter needs
        self._files: dict[str, Path] = {}  # registered by path, outside any directory
        self._loaded: OrderedDict[str, Adapter] = OrderedDict()  # current versions, least recently used first
        self._retiring: dict[int, Adapter] = {}  # uid -> replaced or unregistered version still held
        self._failed: dict[str, tuple[tuple, str]] = {}  # name -> (file stat, why): a bad file is not re-read
        # (recipe, component uids) -> derived adapter, least recently used first
        self._derived: OrderedDict[tuple[Recipe, tuple[int, ...]], Adapter] = OrderedDict()
        self._cond = threading.Condition()
        self.loads = 0  # loads from files, for metrics
        self._on_unload: list[Callable[[Adapter], None]] = []

    @classmethod
    def for_engine(cls, engine, **kw) -> "Adapters":
        """The adapters of `engine`'s model: checked against its LoRA inputs, probed on it, and owning the pool
        its mixed runs use."""
        pool = AdapterPool(engine.lora_inputs, engine.slots, engine.dtype) if engine.lora_inputs else None
        engine.pool = pool
        return cls(engine.lora_inputs, probe=engine.probe, pool=pool, base=_lazy_base(engine.folder), **kw)

    def on_unload(self, callback: Callable[[Adapter], None]) -> None:
        """Call `callback(adapter)` when a loaded version goes (evicted, replaced or unregistered, and released):
        caches keyed on its uid (bindings, pool slots) drop it."""
        self._on_unload.append(callback)

    # -- registration --------------------------------------------------------------------------------------------
    def load(self, path: str | Path, name: str | None = None) -> Adapter:
        """Register file `path` as `name` (default: its stem) and load it now, replacing an earlier registration
        of that name (requests holding the old version finish on it)."""
        path = Path(path)
        name = name or path.name.removesuffix(SUFFIX)
        adapter = self._read(path, name, label=str(path))
        with self._cond:
            self._install(adapter)  # AdapterBusy when every loaded adapter is held: then nothing changed
            self._files[name] = path
        return adapter

    def register(self, name: str, path: str) -> Adapter:
        """Register `path` (inside the adapters directory) as a new name; checked and loaded now."""
        directory = self._need_directory()
        directory.claim(name)
        real = directory.resolve(path)
        adapter = self._read(real, name)
        with self._cond:
            directory.claim(name)  # still free?
            directory.add(name, real)
            self._install_if_room(adapter)
        return adapter

    def upload(self, name: str, stream: BinaryIO, max_bytes: int) -> Adapter:
        """Write an uploaded `.onnx_adapter` into the adapters directory as `<name>.onnx_adapter`; checked before
        it is renamed into place, so a refused upload leaves no file and no name."""
        directory = self._need_directory()
        read: list[Adapter] = []
        directory.upload(name, stream, max_bytes, check=lambda tmp: read.append(self._read(tmp, name)))
        adapter = read[0]
        adapter.path = directory.path(name)
        with self._cond:
            self._install_if_room(adapter)
        return adapter

    def check(self, path: str | Path, name: str) -> None:
        """Refuse file `path` as adapter `name` (AdapterInvalid) exactly as a registration would, keeping
        nothing: for a process that registers files but holds no model to probe them (the Ray ingress)."""
        self._read(Path(path), name)

    def unregister(self, name: str) -> None:
        """Forget `name` now; its loaded version is dropped when the requests holding it end."""
        with self._cond:
            if name in self._files:
                del self._files[name]
            elif self.directory is not None:
                try:
                    self.directory.remove(name)  # AdapterNotFound
                except AdapterNotFound:
                    if name not in self._loaded:  # a loaded one whose file went away (deleted by another
                        raise  # process sharing the folder) is still let go
            else:
                raise AdapterNotFound(f"adapter {name!r} does not exist")
            self._failed.pop(name, None)
            old = self._loaded.pop(name, None)
            if old is not None:
                self._retire(old)

    def unload(self, name: str, wait: bool | float = False) -> None:
        """Unregister `name`, first waiting for running generations to release it (`wait`: True or seconds) or,
        without `wait`, raising AdapterBusy if any hold it."""
        deadline = None if wait is True else time.monotonic() + float(wait) if wait else 0.0
        with self._cond:
            while (held := self._loaded.get(name)) is not None and held.refs:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise AdapterBusy(f"cannot unload adapter {name!r}: {held.refs} running generation(s) use it "
                                      "(let them finish, or unload with wait=True)")
                self._cond.wait(left)
            self.unregister(name)

    def _need_directory(self) -> AdapterDirectory:
        if self.directory is None:
            raise AdapterInvalid("there is no adapters directory (start the server with --adapters DIR)")
        return self.directory

    def _read(self, path: Path, name: str, label: str | None = None) -> Adapter:
        """Parse, check against the model, copy and probe `path`; every refusal is AdapterInvalid naming `label`
        (default: the adapter's name, so that no server path reaches a client)."""
        label = label or f"adapter {name!r}"
        try:
            if path.is_dir():  # a PEFT folder: converted once, checked against the model, cached
                cache = self.directory.cache if self.directory is not None else path.parent / CACHE
                path = convert_cached(path, self.lora_inputs, cache)
            params = open_onnx_adapter(path).params
            feeds = model_feeds(params, self.lora_inputs, label)
        except AdapterError as exc:
            message = str(exc).replace(str(path), label)
            if self.directory is not None:
                message = message.replace(str(self.directory.root), "<adapters>")
            raise AdapterInvalid(message) from None
        # private copies: the file's mapping is let go, so a rewrite of the file cannot reach a running request
        feeds = {k: np.array(v, copy=True) if not v.flags.owndata else v for k, v in feeds.items()}
        del params
        self._check_rank(_ranks(feeds), label)
        self._check_finite(feeds, label)
        return Adapter(name, feeds, path)

    def _check_rank(self, ranks: Mapping[str, int], label: str) -> None:
        """Refuse ranks (per module) above `max_rank`."""
        if self.max_rank is None or not ranks:
            return
        module, rank = max(ranks.items(), key=lambda kv: kv[1])
        if rank > self.max_rank:
            raise AdapterInvalid(f"{label} has rank {rank} ({module}), above this server's limit of {self.max_rank} "
                                 "(--max-lora-rank); a combination's rank is the sum of its parts'")

    def _check_finite(self, feeds: dict[str, np.ndarray], label: str) -> None:
        """Refuse weights that hold NaN or infinities, or that make the probe step's logits so."""
        bad = [k for k, v in feeds.items() if not np.isfinite(v).all()]
        if bad:
            raise AdapterInvalid(f"{label}: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} hold NaN or "
                                 "infinite values")
        if self.probe is not None and feeds:
            logits = self.probe(feeds)
            if not np.isfinite(logits).all():
                raise AdapterInvalid(f"{label} makes the model's logits NaN or infinite (its weights are too large "
                                     "for this model): refused")

    def _install(self, adapter: Adapter) -> None:
        """Make `adapter` the loaded current version of its name (lock held); AdapterBusy, with nothing changed,
        when it needs room and every loaded adapter is held."""
        if adapter.name not in self._loaded:
            self._make_room(for_name=adapter.name)
        old = self._loaded.pop(adapter.name, None)
        if old is not None:
            self._retire(old)
        self._failed.pop(adapter.name, None)
        self._loaded[adapter.name] = adapter
        self.loads += 1

    def _install_if_room(self, adapter: Adapter) -> None:
        """A registration stands even when there is no room to keep it loaded: it loads on first use."""
        try:
            self._install(adapter)
        except AdapterBusy:
            old = self._loaded.pop(adapter.name, None)
            if old is not None:
                self._retire(old)

    def _retire(self, adapter: Adapter) -> None:
        adapter.retired = True
        if adapter.refs:
            self._retiring[adapter.uid] = adapter
        else:
            self._drop(adapter)

    def _drop(self, adapter: Adapter) -> None:
        """(lock held) Callbacks must not block: they queue work for the engine's thread."""
        self._retiring.pop(adapter.uid, None)
        for callback in self._on_unload:
            callback(adapter)
        for key in [k for k in self._derived if adapter.uid in k[1]]:  # built from a version that is gone
            self._retire(self._derived.pop(key))

    def _make_room(self, for_name: str) -> None:
        if self.capacity is None or len(self._loaded) < self.capacity:
            return
        idle = next((a for a in self._loaded.values() if not a.refs), None)
        if idle is None:
            raise AdapterBusy(f"cannot load adapter {for_name!r} now: all {self.capacity} loaded adapters are in use "
                              f"by running generations; retry when one ends (or raise the capacity)")
        del self._loaded[idle.name]
        self._drop(idle)  # still registered: loaded again on its next use

    # -- use ------------------------------------------------------------------------------------------------
    def _source(self, name: str) -> Path:
        if name in self._files:
            return self._files[name]
        if self.directory is not None:
            return self.directory.path(name)
        raise AdapterNotFound(f"no adapter named {name!r} is loaded (loaded: {', '.join(self._loaded) or 'none'})")

    def get(self, name: str) -> Adapter:
        """The current version of `name`, loaded now if it is not."""
        with self._cond:
            adapter = self._loaded.get(name)
            if adapter is not None:
                return adapter
            path = self._source(name)
            failed = self._failed.get(name)
        stat = _stat(path)
        if failed is not None and failed[0] == stat:
            raise AdapterInvalid(failed[1])
        try:
            adapter = self._read(path, name, label=str(path) if name in self._files else None)
        except AdapterInvalid as exc:
            with self._cond:
                self._failed[name] = (stat, str(exc))
            raise
        with self._cond:
            current = self._loaded.get(name)
            if current is not None:  # another thread loaded it meanwhile
                return current
            if self._source(name) != path:  # unregistered or re-registered meanwhile
                raise AdapterBusy(f"adapter {name!r} changed while it was loading: retry")
            self._install(adapter)
            return adapter

    def acquire(self, spec: AdapterSpec, scale: float = 1.0) -> Adapter | None:
        """Hold an adapter for a generation: a name, {name: weight} (an exact weighted combination), each at `scale`;
        None (or scale 0) is the base model. Pair with `release`."""
        recipe = Recipe.of(spec, scale)
        if recipe is None:
            return None
        if recipe.plain:
            return self._acquire_named(recipe.parts[0][0])
        return self._acquire_derived(recipe)

    def _acquire_named(self, name: str) -> Adapter:
        for _ in range(8):
            adapter = self.get(name)
            with self._cond:
                if self._loaded.get(name) is adapter:  # not evicted or replaced since
                    adapter.refs += 1
                    self._loaded.move_to_end(name)
                    return adapter
        raise AdapterBusy(f"adapter {name!r} keeps being evicted by other loads: retry")

    def _acquire_derived(self, recipe: Recipe) -> Adapter:
        """The cached derived adapter of `recipe` over its components' current versions, else built now (the
        components are held while it is built, so none goes away half-way)."""
        components: list[Adapter] = []
        try:
            for name, _ in recipe.parts:
                components.append(self._acquire_named(name))
            combined: dict[str, int] = {}  # the combination's rank per module, before any weight is combined
            for c, (_, w) in zip(components, recipe.parts):
                for module, r in (_ranks(c.shapes) if w else {}).items():
                    combined[module] = combined.get(module, 0) + r
            self._check_rank(combined, f"adapter {recipe.label!r}")
            key = (recipe, tuple(c.uid for c in components))
            with self._cond:
                found = self._derived.get(key)
                if found is not None:
                    found.refs += 1
                    self._derived.move_to_end(key)
                    return found
            try:
                params = combine([c.params for c in components], [w for _, w in recipe.parts],
                                 [f"adapter {c.name!r}" for c in components], self.base)
            except AdapterError as exc:
                raise AdapterInvalid(str(exc)) from None
            adapter = Adapter(recipe.label, params)
            self._check_finite(adapter.params, f"adapter {recipe.label!r}")
            with self._cond:
                found = self._derived.get(key)  # another thread built it meanwhile
                if found is None:
                    found = self._derived[key] = adapter
                found.refs += 1
                self._derived.move_to_end(key)
                while len(self._derived) > DERIVED_CAPACITY:  # the least recently used idle ones go
                    idle = next((k for k, a in self._derived.items() if not a.refs), None)
                    if idle is None:
                        break
                    self._retire(self._derived.pop(idle))
                return found
        finally:
            for c in components:
                self.release(c)

    def release(self, adapter: Adapter | None) -> None:
        if adapter is None:
            return
        with self._cond:
            adapter.refs -= 1
            if adapter.retired and adapter.refs == 0 and adapter.uid in self._retiring:
                self._drop(adapter)
            self._cond.notify_all()

    # -- listing ------------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every registered name (loaded or not)."""
        with self._cond:
            found = set(self._files) | set(self._loaded)
        if self.directory is not None:
            found |= set(self.directory.names())
        return sorted(found)

    def loaded(self) -> list[str]:
        """The names whose current version is in memory, least recently used first."""
        with self._cond:
            return list(self._loaded)

    def info(self, name: str) -> AdapterInfo:
        with self._cond:
            path = self._source(name)
            relative = self.directory.relative(path) if self.directory is not None and name not in self._files else None
            return AdapterInfo(name, name in self._loaded, relative)

    def refresh(self) -> None:
        if self.directory is not None:
            self.directory.refresh()

    def held(self) -> int:
        """Generations holding an adapter right now (all versions)."""
        with self._cond:
            return (sum(a.refs for a in self._loaded.values()) + sum(a.refs for a in self._retiring.values())
                    + sum(a.refs for a in self._derived.values()))

    def __contains__(self, name: str) -> bool:
        try:
            with self._cond:
                self._source(name)
        except AdapterError:
            return False
        return True

    def __len__(self) -> int:
        return len(self._loaded)

    def __iter__(self) -> Iterator[Adapter]:
        """Every adapter in memory: loaded, derived (scales, combinations) and retired-but-held versions."""
        with self._cond:
            return iter(list(self._loaded.values()) + list(self._derived.values()) + list(self._retiring.values()))


def _lazy_base(folder: Path) -> Callable[[str], np.ndarray]:
    """The model's base weights, read only when a scaled DoRA adapter first needs them."""
    held: list = []

    def weight(module: str) -> np.ndarray:
        if not held:
            from ortlora.adapters.base_weights import BaseWeights

            held.append(BaseWeights(folder))
        return held[0](module)

    return weight


def _stat(path: Path) -> tuple:
    """What changes when the file (or a PEFT folder's files) is replaced or rewritten."""
    out = []
    for p in [path / f for f in PEFT_FILES] if path.is_dir() else [path]:
        try:
            st = p.stat()
        except OSError:
            continue
        out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _ranks(shapes: Mapping[str, object]) -> dict[str, int]:
    """Module -> rank of an adapter's tensors (or their shapes): the width of each A [in, r]."""
    out = {}
    for name, value in shapes.items():
        if naming.is_lora_a(name):
            shape = getattr(value, "shape", value)
            out[naming.parse_input_name(name)[0]] = int(shape[1])
    return out
