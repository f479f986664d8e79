"""`LoadedSet`: which adapters stay in memory. An LRU of `capacity` adapters shared fairly among tenants, where pinned
adapters never leave. Names and tenants only: `ortlora.runtime.adapters.Adapters` holds the weights and says which
adapters are idle (no running request holds them: only those may go).

Who goes when tenant T needs room (a tenant is "over" when it holds more than its share, T counting the one it
loads):

    share = (capacity - pinned) // tenants holding unpinned adapters (T counted), at least 1
    1. the least recently used idle adapter of a tenant over its share (T's own included)
    2. else, if T is under its share: the least recently used idle adapter of anyone
    3. else none: T waits (its running requests hold its whole share)

An adapter belongs to the tenant that used it last. A tenant's adapters up to its share are protected, so one tenant
flooding the server with distinct adapters recycles its own while other tenants' warm adapters stay; above the
shares, the plain LRU order holds. The eviction's reason is "lru" when the choice is the plain LRU's, "tenant_share"
when the shares chose another adapter than the plain LRU would have.
"""

from __future__ import annotations

import fnmatch
from collections import OrderedDict
from typing import Callable, Iterator, Sequence


class LoadedSet:
    """Not thread-safe: its owner's lock guards it. `pins`: adapter names or shell-style patterns. `shares` False:
    one plain LRU whatever the tenants (a Ray replica, whose router keeps a plain LRU of the same adapters)."""

    def __init__(self, capacity: int | None = None, pins: Sequence[str] = (), shares: bool = True):
        self.capacity = capacity
        self.pins = tuple(pins)
        self.shares = shares
        self._order: OrderedDict[str, str] = OrderedDict()  # name -> owning tenant, least recently used first
        self._held: dict[str, int] = {}  # tenant -> unpinned adapters it owns
        self._pinned: set[str] = set()

    def is_pinned(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.pins)

    def add(self, name: str, tenant: str = "") -> None:
        """`name` is loaded now, used by `tenant` (also: used again)."""
        tenant = tenant if self.shares else ""
        self.remove(name)
        self._order[name] = tenant
        if self.is_pinned(name):
            self._pinned.add(name)
        else:
            self._held[tenant] = self._held.get(tenant, 0) + 1

    def touch(self, name: str, tenant: str = "") -> None:
        """`tenant` used loaded adapter `name`: the most recently used, and `tenant`'s."""
        tenant = tenant if self.shares else ""
        if self._order.get(name) == tenant:
            self._order.move_to_end(name)
        else:
            self.add(name, tenant)

    def remove(self, name: str) -> None:
        tenant = self._order.pop(name, None)
        if tenant is None:
            return
        if name in self._pinned:
            self._pinned.discard(name)
        else:
            left = self._held[tenant] - 1
            if left:
                self._held[tenant] = left
            else:
                del self._held[tenant]

    def full(self) -> bool:
        return self.capacity is not None and len(self._order) >= self.capacity

    def share(self, tenant: str) -> int:
        """Unpinned adapters `tenant` may keep while others need room."""
        if self.capacity is None:
            return len(self._order) + 1
        tenants = len(self._held) + (tenant not in self._held)
        return max(1, (self.capacity - len(self._pinned)) // tenants)

    def victim(self, tenant: str, idle: Callable[[str], bool]) -> tuple[str, str] | None:
        """(name, reason) of the adapter to unload so that `tenant` can load one, or None when no unpinned idle
        adapter is left."""
        candidates = [n for n in self._order if n not in self._pinned and idle(n)]
        if not candidates:
            return None
        tenant = tenant if self.shares else ""
        share = self.share(tenant)
        held = self._held
        over = [n for n in candidates if held[o := self._order[n]] + (o == tenant) > share]
        choice = over or (candidates if held.get(tenant, 0) < share else [])
        if not choice:
            return None
        return choice[0], "lru" if choice[0] == candidates[0] else "tenant_share"

    def owner(self, name: str) -> str | None:
        return self._order.get(name)

    def held(self) -> dict[str, int]:
        """Tenant -> unpinned adapters it owns."""
        return dict(self._held)

    def pinned(self) -> list[str]:
        return [n for n in self._order if n in self._pinned]

    def __contains__(self, name: str) -> bool:
        return name in self._order

    def __len__(self) -> int:
        return len(self._order)

    def __iter__(self) -> Iterator[str]:
        """Least recently used first."""
        return iter(list(self._order))
