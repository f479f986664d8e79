"""`Adapters`: the loaded versions of a process's adapters: refcounts, the LRU (tenant shares, pins), derived
adapters, and the events of their loads and unloads.

Its helpers, one role each: where an adapter is (names -> sources) is the `AdapterRegistry`'s (registry.py); reading
and checking one is the `AdapterReader`'s (adapter_reader.py); which loaded adapter goes when room is needed is the
`LoadedSet`'s (adapter_lru.py); the engine's pool gives loaded adapters slots (pool.py).

    registry.locate(name) ──> reader (parse, fit the model, finite, probe step) ──> loaded version (LoadedSet:
        │                                                                          capacity, tenant shares, pins)
        │                                                    acquire / release (refcounts) │
        └── unregister / re-register / its source's content changed: the old version retires; it is dropped when
            its last holder releases it ──> AdapterUnloaded (pool slots, bindings, caches keyed on its uid drop it)

A request may also ask for a derived adapter (`acquire("a1", scale=0.5)`, `acquire({"a1": 0.7, "a2": 0.3})`): its
`Recipe` is combined exactly from the components' current versions (ortlora.adapters.merge.combine), cached by
(recipe, component versions), refcounted and placed in the pool like any adapter; a component's going retires the
derived adapters built from it. Scale 0 (all weights 0) is the base model.

A name maps to its current version; each (re-)registration is a new `Adapter` with its own uid, so a request holds
exactly the weights it started with. A registration either fully succeeds or leaves nothing behind (no file, no
name). Loaded weights are private copies: rewriting a file in place (as `cp` does) cannot reach a running request.
A loaded version of a source's adapter (the adapters folder, a URL) is checked against its source at most every
`revalidate_s` when used: new content there is a new version; a source that does not answer keeps the loaded one.
A file that failed its check is not read again until its version changes.

A load for a request skips the probe step (one model run, under contention with the engine's own runs: most of a
cold load's time): the request's own first step is the probe. The batch reports what that step found (`passed` /
`refuse`): logits that are not finite refuse the version as the probe would have (the request fails with
AdapterInvalid naming it, the version is unloaded and refused by name until its source changes). Loads that a caller
waits on for a verdict (`load`, registrations, uploads, pins) still run the probe step.

Events go to `listen(callback)`'s callbacks: `AdapterLoaded`, `AdapterUsed` (hit or cold), `AdapterUnloaded`. They
are called on the thread that caused them with the adapters' lock held: a callback must not block or call back.

Ranks are bounded (`max_rank`, vLLM's `--max-lora-rank`): an adapter, or a combination (its rank is the sum of its
parts' per module), above the bound is refused with AdapterInvalid naming it.

Failures are typed (ortlora.errors): AdapterNotFound (AdapterUnavailable: the source did not answer), AdapterExists,
AdapterInvalid, AdapterBusy.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Mapping, Sequence

import numpy as np

from ortlora.adapters.merge import AdapterSpec, Recipe  # noqa: F401 (AdapterSpec: for callers)
from ortlora.adapters.onnx_adapter import SUFFIX
from ortlora.adapters.validate import LoraInput
from ortlora.errors import AdapterBusy, AdapterError, AdapterInvalid, AdapterNotFound
from ortlora.runtime.adapter import (Adapter, AdapterEvent, AdapterInfo, AdapterLeases,  # noqa: F401 (callers)
                                     AdapterLoaded, AdapterUnloaded, AdapterUsed)
from ortlora.runtime.adapter_lru import LoadedSet
from ortlora.runtime.adapter_reader import DEFAULT_MAX_RANK, AdapterReader, lazy_base, overflow_refusal
from ortlora.runtime.pool import AdapterPool
from ortlora.runtime.registry import AdapterRegistry, Origin, default_cache_root, open_cache
from ortlora.runtime.sources import Located, is_url, local_version, safe_url

log = logging.getLogger("ortlora.adapters")
DERIVED_CAPACITY = 16  # derived adapters kept while idle (rebuilt from their components on a later use)
REVALIDATE_S = 10.0  # how often a used adapter's source is asked for its version (a remote one: also the cache's)


class Adapters:
    """Thread-safe. `registry` (default: one over `directory`, a folder, URL prefix or index file): names ->
    sources. `probe(params) -> logits` runs one short input through the model with an adapter's tensors; `pool`
    holds the adapters of mixed batches (the engine places them in it on its own thread; unload events, queued to
    that thread, take them out). `capacity`: loaded adapters kept (None: no bound); `pins`: names or patterns that
    stay loaded once loaded (`load_pins` loads them); `tenant_shares` False: one plain LRU for all tenants."""

    def __init__(self, lora_inputs: Mapping[str, LoraInput], *, capacity: int | None = None,
                 directory: str | Path | None = None, registry: AdapterRegistry | None = None,
                 reserved: tuple[str, ...] = (), probe: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None,
                 pool: AdapterPool | None = None, base: Callable[[str], np.ndarray] | None = None,
                 pins: Sequence[str] = (), revalidate_s: float | None = REVALIDATE_S, tenant_shares: bool = True,
                 max_rank: int | None = DEFAULT_MAX_RANK):
        if capacity is not None and capacity < 1:
            raise AdapterError(f"adapter capacity must be at least 1, got {capacity}")
        if registry is None:
            registry = AdapterRegistry(directory, reserved=reserved, cache=lambda: open_cache(default_cache_root()))
        self.registry = registry
        self.lora_inputs = dict(lora_inputs)
        self.capacity = capacity
        hidden = {self.registry.directory.root: "<adapters>"} if self.registry.directory is not None else {}
        self.reader = AdapterReader(lora_inputs, probe, hidden, max_rank)
        self.max_rank = max_rank
        self.probe = probe
        self.pool = pool
        self.base = base  # module -> base weight [out, in]: what scaling a DoRA adapter needs
        self.revalidate_s = revalidate_s
        self.lru = LoadedSet(capacity, pins, tenant_shares)
        self._loaded: dict[str, Adapter] = {}  # name -> current version in memory (its LRU order: self.lru)
        self._retiring: dict[int, Adapter] = {}  # uid -> replaced or unregistered version still held
        self._failed: dict[str, tuple[str, str]] = {}  # name -> (version, why): a bad file is not read again
        # (name, version) that passed the probe step: loaded again after an eviction, it is not probed again
        self._passed: set[tuple[str, str]] = set()
        # (recipe, component uids) -> derived adapter, least recently used first
        self._derived: dict[tuple[Recipe, tuple[int, ...]], Adapter] = {}
        self._checking: set[str] = set()  # names whose source one thread is asking for its version
        self._loading: dict[str, threading.Lock] = {}  # name -> held while one thread loads it
        self._bytes = 0
        self._cond = threading.Condition()
        self._listeners: list[Callable[[AdapterEvent], None]] = []

    @classmethod
    def for_engine(cls, engine, **kw) -> "Adapters":
        """The adapters of `engine`'s model: checked against its LoRA inputs, probed on it, and owning the pool
        its mixed runs use."""
        pool = AdapterPool(engine.lora_inputs, engine.slots, engine.dtype) if engine.lora_inputs else None
        engine.pool = pool
        return cls(engine.lora_inputs, probe=engine.probe, pool=pool, base=lazy_base(engine.folder), **kw)

    @property
    def directory(self):
        """The adapters folder (`AdapterDirectory`), when the registry's source is one."""
        return self.registry.directory

    def listen(self, callback: Callable[[AdapterEvent], None]) -> None:
        """Call `callback(event)` on every load, use and unload (see the module docstring)."""
        self._listeners.append(callback)

    def on_unload(self, callback: Callable[[Adapter], None]) -> None:
        """Call `callback(adapter)` when a version leaves memory (evicted, replaced or unregistered, and released):
        caches keyed on its uid (bindings, pool slots) drop it."""
        self.listen(lambda e: callback(e.adapter) if isinstance(e, AdapterUnloaded) else None)

    def _emit(self, event: AdapterEvent) -> None:
        for callback in self._listeners:
            callback(event)

    # -- registration --------------------------------------------------------------------------------------------
    def load(self, path: str | Path, name: str | None = None, tenant: str = "") -> Adapter:
        """Register file `path` (or a URL: the Python API's caller is trusted) as `name` (default: its stem) and
        load it now, replacing an earlier registration of that name (requests holding the old version finish on
        it)."""
        spec = str(path)
        name = name or spec.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1].removesuffix(SUFFIX)
        t0 = time.perf_counter()
        if is_url(spec):
            source = self.registry.url_source(name, spec)
            adapter = self._read(source.locate(name), name, label=f"adapter {name!r} ({safe_url(spec)})", t0=t0)
            register = lambda: self.registry.add_url(name, spec, source)  # noqa: E731
        else:
            path = Path(path)
            adapter = self._read(Located(name, path, local_version(path)), name, label=str(path))
            register = lambda: self.registry.add_file(name, path)  # noqa: E731
        with self._cond:
            self._install(adapter)  # AdapterBusy when every loaded adapter is held: then nothing changed
            register()
            self._emit_loaded(adapter, "registration")
        return adapter

    def register(self, name: str, path: str) -> Adapter:
        """Register `path` (inside the adapters directory) as a new name; checked and loaded now."""
        self.registry.claim(name)
        real = self.registry.resolve_path(path)
        adapter = self._read(Located(name, real, local_version(real)), name)
        with self._cond:
            self.registry.claim(name)  # still free?
            self.registry.add_path(name, real)
            self._install_if_room(adapter)
        return adapter

    def register_url(self, name: str, url: str, *, allowed_only: bool = True) -> Adapter:
        """Register `url` as a new name; fetched, checked and loaded now. `allowed_only`: the URL must lie under a
        prefix the registry allows (a client's registration)."""
        self.registry.claim(name)
        if allowed_only:
            self.registry.check_allowed(url)
        t0 = time.perf_counter()
        source = self.registry.url_source(name, url)
        adapter = self._read(source.locate(name), name, t0=t0)
        with self._cond:
            self.registry.claim(name)
            self.registry.add_url(name, url, source)
            self._install_if_room(adapter)
        return adapter

    def upload(self, name: str, stream: BinaryIO, max_bytes: int) -> Adapter:
        """Write an uploaded `.onnx_adapter` into the adapters directory as `<name>.onnx_adapter`; checked before
        it is renamed into place, so a refused upload leaves no file and no name."""
        read: list[Adapter] = []
        path = self.registry.upload(name, stream, max_bytes, check=lambda tmp: read.append(
            self._read(Located(name, tmp, ""), name)))
        adapter = read[0]
        adapter.path, adapter.version = path, local_version(path)
        with self._cond:
            self._install_if_room(adapter)
        return adapter

    def check(self, path: str | Path, name: str) -> None:
        """Refuse file `path` as adapter `name` (AdapterInvalid) exactly as a registration would, keeping
        nothing: for a process that registers files but holds no model to probe them (the Ray ingress)."""
        self._read(Located(name, Path(path), ""), name)

    def check_origin(self, name: str, origin: Origin) -> None:
        """Refuse what another process would register as `name` (a file in the adapters folder, a URL) as a
        registration would; a URL's copy stays in the cache for its first use."""
        if origin.kind == "url":
            self._read(self.registry.url_source(name, origin.where).locate(name), name)
        elif origin.kind == "path":
            self.check(self.registry.need_directory().root / origin.where, name)
        else:
            raise AdapterInvalid(f"adapter {name!r}: a {origin.kind!r} registration is not checked remotely")

    def adopt(self, name: str, origin: Origin) -> None:
        """Serve `name` as another process registered it (the Ray ingress): its loaded version retires when the
        registration differs; loaded (and checked) on first use."""
        with self._cond:
            try:
                if self.registry.origin(name) == origin:
                    return
            except AdapterNotFound:
                pass
            self.registry.adopt(name, origin)
            self._forget_loaded(name, "replaced")

    def unregister(self, name: str) -> None:
        """Forget `name` now; its loaded version is dropped when the requests holding it end."""
        with self._cond:
            try:
                self.registry.remove(name)
            except AdapterNotFound:
                if name not in self._loaded:  # a loaded one whose file went away (deleted by another process
                    raise  # sharing the folder) is still let go
            self._forget_loaded(name, "unregistered")

    def _forget_loaded(self, name: str, reason: str) -> None:
        """(lock held)"""
        self._failed.pop(name, None)
        old = self._loaded.pop(name, None)
        if old is not None:
            self.lru.remove(name)
            self._retire(old, reason)

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

    def load_pins(self) -> list[str]:
        """Load every registered adapter the pins name (they stay loaded); AdapterError naming the problem when
        a pinned name is not registered or the pins would fill the capacity."""
        pins = self.lru.pins
        missing = [p for p in pins if not any(c in p for c in "*?[") and p not in self.registry]
        if missing:
            raise AdapterNotFound(f"pinned adapter(s) {', '.join(missing)} do not exist")
        names = [n for n in self.registry.names() if self.lru.is_pinned(n)]
        if self.capacity is not None and len(names) >= self.capacity:
            raise AdapterError(f"the pins name {len(names)} adapters but at most {self.capacity} stay loaded: raise "
                               "--max-loaded-adapters above the pinned count (the rest need room too)")
        for name in names:
            self._get(name, "", cause="pin")
        return names

    # -- reading and installing (lock held where it says so) --------------------------------------------------
    def _read(self, located: Located, name: str, label: str | None = None, t0: float | None = None,
              probe: bool = True) -> Adapter:
        """The checked version `located` holds (`t0`: when its fetch began, for its load time). `probe` False: the
        probe step is left to the first request that uses it (the version comes back `unprobed`)."""
        t0 = time.perf_counter() if t0 is None else t0
        seen = (name, located.version)
        needed = not located.version or seen not in self._passed
        with located:
            params = self.reader.read(located.path, name, label,
                                      self.directory.cache if self.directory is not None else None,
                                      probe=needed and probe)
        if located.version and probe:
            self._passed.add(seen)
        adapter = Adapter(name, params, located.path, located.version)
        adapter.unprobed = needed and not probe
        adapter.label = label or f"adapter {name!r}"
        adapter.load_s = time.perf_counter() - t0
        return adapter

    def passed(self, adapter: Adapter) -> None:
        """(engine thread) A request's first step with the unprobed `adapter` gave finite logits: its version is
        as good as probed."""
        with self._cond:
            adapter.unprobed = False
            if adapter.version:
                self._passed.add((adapter.name, adapter.version))

    def refuse(self, adapter: Adapter) -> str:
        """(engine thread) A request's first step with the unprobed `adapter` gave logits that are not finite:
        refuse its version as the probe step would have (unloaded; refused by name until its source changes).
        Returns the refusal, which every request already holding it fails with."""
        with self._cond:
            if adapter.refusal is None:
                adapter.refusal = overflow_refusal(adapter.label)
                if self._loaded.get(adapter.name) is adapter:
                    self._forget_loaded(adapter.name, "invalid")
                if adapter.version:
                    self._failed[adapter.name] = (adapter.version, adapter.refusal)
            return adapter.refusal

    def _install(self, adapter: Adapter, tenant: str = "", reason: str = "replaced") -> None:
        """(lock held) Make `adapter` the loaded current version of its name; AdapterBusy, with nothing changed,
        when it needs room and no loaded adapter may go."""
        if adapter.name not in self._loaded:
            self._make_room(adapter.name, tenant)
        self._forget_loaded(adapter.name, reason)
        self._loaded[adapter.name] = adapter
        self._bytes += adapter.nbytes
        self.lru.add(adapter.name, tenant)

    def _install_if_room(self, adapter: Adapter) -> None:
        """(lock held) A registration stands even when there is no room to keep it loaded: it loads on first use."""
        try:
            self._install(adapter)
        except AdapterBusy:
            self._forget_loaded(adapter.name, "replaced")
            return
        self._emit_loaded(adapter, "registration")

    def _emit_loaded(self, adapter: Adapter, cause: str) -> None:
        self._emit(AdapterLoaded(adapter, getattr(adapter, "load_s", 0.0), cause, len(self._loaded), self._bytes))

    def _make_room(self, for_name: str, tenant: str) -> None:
        """(lock held)"""
        while self.lru.full():
            found = self.lru.victim(tenant, lambda n: not self._loaded[n].refs)
            if found is None:
                idle = any(not a.refs for n, a in self._loaded.items() if not self.lru.is_pinned(n))
                if self.lru.shares and idle:
                    raise AdapterBusy(f"cannot load adapter {for_name!r} now: its tenant holds its share "
                                      f"({self.lru.share(tenant)}) of the {self.capacity} loaded adapters, all in "
                                      "use by its running generations; retry when one ends")
                raise AdapterBusy(f"cannot load adapter {for_name!r} now: all {self.capacity} loaded adapters are in "
                                  "use by running generations (or pinned); retry when one ends (or raise the "
                                  "capacity)")
            name, reason = found
            self.lru.remove(name)
            self._drop(self._loaded.pop(name), reason)  # still registered: loaded again on its next use

    def _retire(self, adapter: Adapter, reason: str) -> None:
        """(lock held)"""
        adapter.retired, adapter.reason = True, reason
        if adapter.refs:
            self._retiring[adapter.uid] = adapter
        else:
            self._drop(adapter, reason)

    def _drop(self, adapter: Adapter, reason: str) -> None:
        """(lock held) The version leaves memory (each passes here once)."""
        self._retiring.pop(adapter.uid, None)
        adapter.reason = reason
        self._bytes -= adapter.nbytes
        self._emit(AdapterUnloaded(adapter, reason, len(self._loaded), self._bytes))
        for key in [k for k in self._derived if adapter.uid in k[1]]:  # built from a version that is gone
            self._retire(self._derived.pop(key), "component_gone")

    # -- use ------------------------------------------------------------------------------------------------
    def get(self, name: str) -> Adapter:
        """The current version of `name`, loaded now if it is not."""
        return self._get(name, "")[0]

    def _get(self, name: str, tenant: str, cause: str = "request", probe: bool = True) -> tuple[Adapter, bool]:
        """(current version, whether this call loaded it); `probe` False: a load leaves the probe step to the
        request's first step."""
        with self._cond:
            adapter = self._loaded.get(name)
            if adapter is not None:
                if not self._stale(adapter) or name in self._checking:
                    return adapter, False
                self._checking.add(name)
        if adapter is not None:
            try:
                return self._revalidate(adapter, tenant)
            finally:
                with self._cond:
                    self._checking.discard(name)
        with self._cond:
            loading = self._loading.setdefault(name, threading.Lock())
        with loading:  # one thread loads a name; the others then find it loaded
            with self._cond:
                current = self._loaded.get(name)
                if current is not None:
                    return current, True
            try:
                return self._load(name, tenant, cause, probe), True
            finally:
                with self._cond:
                    self._loading.pop(name, None)

    def _stale(self, adapter: Adapter) -> bool:
        return self.revalidate_s is not None and time.monotonic() - adapter.checked >= self.revalidate_s

    def _locate(self, name: str) -> tuple[Located, Origin]:
        try:
            origin = self.registry.origin(name)
            return self.registry.locate(name), origin
        except AdapterNotFound as exc:
            if self.registry.source is None and type(exc) is AdapterNotFound:
                with self._cond:
                    loaded = ", ".join(self.lru) or "none"
                raise AdapterNotFound(f"no adapter named {name!r} is loaded (loaded: {loaded})") from None
            raise

    def _load(self, name: str, tenant: str, cause: str, probe: bool = True) -> Adapter:
        t0 = time.perf_counter()
        located, origin = self._locate(name)
        with self._cond:
            failed = self._failed.get(name)
        if failed is not None and failed[0] == located.version and located.version:
            located.release()
            raise AdapterInvalid(failed[1])
        try:
            adapter = self._read(located, name, self.registry.label(name), t0, probe)
        except AdapterInvalid as exc:
            with self._cond:
                self._failed[name] = (located.version, str(exc))
            raise
        with self._cond:
            current = self._loaded.get(name)
            if current is not None:  # another thread loaded it meanwhile
                return current
            try:
                changed = self.registry.origin(name) != origin
            except AdapterNotFound:
                changed = True
            if changed:  # unregistered or re-registered meanwhile
                raise AdapterBusy(f"adapter {name!r} changed while it was loading: retry")
            self._install(adapter, tenant)
            self._emit_loaded(adapter, cause)
        return adapter

    def _revalidate(self, adapter: Adapter, tenant: str) -> tuple[Adapter, bool]:
        """Ask `adapter`'s source for its version: the same keeps it; new content is loaded as a new version (the
        old one retires); a source that does not answer, or new content that is refused, keeps it."""
        name = adapter.name
        t0 = time.perf_counter()
        try:
            if self.registry.origin(name).kind == "file":  # registered by the Python API: reloaded by `load`
                located = None
            else:
                located, _ = self._locate(name)
        except AdapterError as exc:
            log.warning("%s; serving the loaded version", exc)
            located = None
        if located is None or located.version == adapter.version:
            if located is not None:
                located.release()
            adapter.checked = time.monotonic()
            return adapter, False
        try:
            new = self._read(located, name, self.registry.label(name), t0)
        except AdapterError as exc:
            log.warning("%s; serving the loaded version", exc)
            adapter.checked = time.monotonic()
            return adapter, False
        with self._cond:
            if self._loaded.get(name) is not adapter:  # replaced meanwhile
                return self._loaded.get(name) or adapter, False
            self._install(new, tenant, reason="source_changed")
            self._emit_loaded(new, "revalidation")
        return new, True

    def acquire(self, spec: AdapterSpec, scale: float = 1.0, tenant: str = "") -> Adapter | None:
        """Hold an adapter for a generation of `tenant`: a name, {name: weight} (an exact weighted combination),
        each at `scale`; None (or scale 0) is the base model. Pair with `release`."""
        recipe = Recipe.of(spec, scale)
        if recipe is None:
            return None
        if recipe.plain:
            return self._acquire_named(recipe.parts[0][0], tenant)
        return self._acquire_derived(recipe, tenant)

    def _acquire_named(self, name: str, tenant: str) -> Adapter:
        cold = False
        for _ in range(8):
            adapter, loaded = self._get(name, tenant, probe=False)  # the request's first step probes it
            cold = cold or loaded
            with self._cond:
                if self._loaded.get(name) is adapter:  # not evicted or replaced since
                    adapter.refs += 1
                    self.lru.touch(name, tenant)
                    self._emit(AdapterUsed(adapter, tenant, cold))
                    return adapter
        raise AdapterBusy(f"adapter {name!r} keeps being evicted by other loads: retry")

    def _acquire_derived(self, recipe: Recipe, tenant: str) -> Adapter:
        """The cached derived adapter of `recipe` over its components' current versions, else built now (the
        components are held while it is built, so none goes away half-way)."""
        components: list[Adapter] = []
        try:
            for name, _ in recipe.parts:
                components.append(self._acquire_named(name, tenant))
            key = (recipe, tuple(c.uid for c in components))
            with self._cond:
                found = self._derived.pop(key, None)
                if found is not None:
                    self._derived[key] = found  # the most recently used
                    found.refs += 1
                    return found
            t0 = time.perf_counter()
            adapter = Adapter(recipe.label, self.reader.combine(components, [w for _, w in recipe.parts], recipe.label,
                                                                 self.base))
            adapter.load_s = time.perf_counter() - t0
            with self._cond:
                found = self._derived.pop(key, None)  # another thread built it meanwhile
                if found is None:
                    found = adapter
                    self._bytes += adapter.nbytes
                    self._emit_loaded(adapter, "derived")
                self._derived[key] = found
                found.refs += 1
                while len(self._derived) > DERIVED_CAPACITY:  # the least recently used idle ones go
                    idle = next((k for k, a in self._derived.items() if not a.refs), None)
                    if idle is None:
                        break
                    self._retire(self._derived.pop(idle), "idle")
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
                self._drop(adapter, adapter.reason or "unregistered")
            self._cond.notify_all()

    # -- listing ------------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every registered name (loaded or not), from memory."""
        return self.registry.names()

    def loaded(self) -> list[str]:
        """The names whose current version is in memory, least recently used first."""
        with self._cond:
            return list(self.lru)

    def loaded_bytes(self) -> int:
        """Bytes of weights held: loaded, derived and retired-but-held versions."""
        with self._cond:
            return self._bytes

    def info(self, name: str) -> AdapterInfo:
        entry = self.registry.info(name)
        with self._cond:
            return AdapterInfo(name, name in self._loaded, entry.path, entry.url)

    def infos(self, names: Sequence[str] | None = None) -> list[AdapterInfo]:
        """`info` of every registered name (or of `names`), in one pass (a listing of thousands)."""
        with self._cond:
            loaded = set(self._loaded)
        out = []
        for name in self.names() if names is None else names:
            try:
                entry = self.registry.info(name)
            except AdapterNotFound:  # its file went away (or now escapes the folder) since it was listed
                continue
            out.append(AdapterInfo(name, name in loaded, entry.path, entry.url))
        return out

    def refresh(self) -> None:
        self.registry.refresh()

    def held(self) -> int:
        """Generations holding an adapter right now (all versions)."""
        with self._cond:
            return (sum(a.refs for a in self._loaded.values()) + sum(a.refs for a in self._retiring.values())
                    + sum(a.refs for a in self._derived.values()))

    def __contains__(self, name: str) -> bool:
        return name in self.registry

    def __len__(self) -> int:
        return len(self._loaded)

    def __iter__(self) -> Iterator[Adapter]:
        """Every adapter in memory: loaded, derived (scales, combinations) and retired-but-held versions."""
        with self._cond:
            return iter(list(self._loaded.values()) + list(self._derived.values()) + list(self._retiring.values()))

