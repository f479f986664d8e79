"""One loaded version of an adapter (`Adapter`) and what its owner, `ortlora.runtime.adapters.Adapters`, says about
versions: what a listing shows (`AdapterInfo`) and the events of their lives (`AdapterLoaded`, `AdapterUsed`,
`AdapterUnloaded`), which metrics, the engine's pool and caches keyed on a version's uid follow."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ortlora import naming
from ortlora.runtime.pool import AdapterPool

_uids = itertools.count(1)


class Adapter:
    """One loaded version of a named adapter. Its weights (graph input name -> array in the model's dtype: A [in, r],
    B [r, out], DoRA factors [out]) are held once: privately, or, while it sits in the mixed-batch pool, only in its
    pool slot (the pool gives them back when the slot goes). `params` reads them either way."""

    def __init__(self, name: str, params: dict[str, np.ndarray], path: Path | None = None, version: str = ""):
        self.name = name
        self.path = path
        self.version = version  # its source's content version when read ('' for derived adapters)
        self.uid = next(_uids)
        self.refs = 0
        self.retired = False  # unregistered or replaced: dropped when the last holder releases it
        self.reason: str | None = None  # why it retired or went
        self.checked = time.monotonic()  # when its source last confirmed its version
        self.load_s = 0.0  # how long it took to fetch, read and check
        self.label = f"adapter {name!r}"  # how messages name it
        self.unprobed = False  # loaded for a request without the probe step: that request's first step checks it
        self.refusal: str | None = None  # why its first step refused it
        self.shapes = {k: v.shape for k, v in params.items()}
        self.nbytes = sum(v.nbytes for v in params.values())
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
    url: str | None = None  # a URL source, without credentials or query string


# -- events ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterLoaded:
    adapter: Adapter
    seconds: float  # from asking its source (a download included) to checked weights
    cause: str  # "request" (a request found it cold), "registration", "pin", "revalidation", "derived"
    loaded: int  # named adapters loaded after it
    loaded_bytes: int  # bytes of weights held: loaded, derived, and retired ones still held


@dataclass(frozen=True)
class AdapterUsed:
    adapter: Adapter
    tenant: str
    cold: bool  # loaded for this use (a miss), else a hit


@dataclass(frozen=True)
class AdapterUnloaded:
    adapter: Adapter
    # evicted for room: "lru" or "tenant_share"; else "replaced", "unregistered", "source_changed", and for derived
    # adapters "idle" or "component_gone"
    reason: str
    loaded: int
    loaded_bytes: int


AdapterEvent = AdapterLoaded | AdapterUsed | AdapterUnloaded
