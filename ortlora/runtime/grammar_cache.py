"""Compiled grammars (llguidance parsers in their start state), cached and bounded in bytes: in total, and per
tenant, so that one client sending distinct large schemas can neither grow the process nor flush everyone else's.

    cache = GrammarCache(max_bytes=256 << 20, tenant_bytes=64 << 20)
    with cache.hold(ll_tokenizer, grammar, tenant="acme") as proto:   # compiled once (off the engine thread)
        ...                                                             # held: never evicted while in use
    cache.prototype(ll_tokenizer, grammar)                              # the engine's lookup (a hit while held)

A grammar's size is estimated from its text before compiling (llguidance reports none): `BASE_COST` plus
`COST_PER_CHAR` per character, on the high side of what compiled grammars measured (benchmarks/NOTES.md). A
grammar is charged to the tenant that compiled it first. Making room evicts the tenant's own least recently used
grammars first, then anyone's, never a held one; a grammar larger than a tenant's share is a GrammarError (400),
and when held grammars fill the budget the request is a GrammarBudget (429: retry when they finish).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from ortlora.errors import OrtloraError

BASE_COST = 128 << 10  # a compiled grammar's fixed part (tables, lexer start state)
COST_PER_CHAR = 64  # bytes per character of the grammar's text
TRIAL_TOKENS = 64  # first tokens tried on a new grammar: a parser that overflows on its first token is refused


class GrammarError(OrtloraError):
    """The schema or grammar cannot be compiled or used (answered 400)."""


class GrammarBudget(OrtloraError):
    """The grammars in use already take the budget (answered 429: retry when those requests finish)."""


@dataclass(eq=False)
class _Entry:
    key: tuple
    cost: int
    tenant: str
    proto: object = None
    error: GrammarError | None = None
    holds: int = 0
    ready: threading.Event = field(default_factory=threading.Event)


class Hold:
    """One use of a cached grammar: it stays cached until `release()` (or the `with` block's end)."""

    def __init__(self, cache: "GrammarCache", entry: _Entry):
        self._cache, self.entry, self._released = cache, entry, False

    @property
    def prototype(self):
        return self.entry.proto

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._cache._release(self.entry)

    def __enter__(self):
        return self.entry.proto

    def __exit__(self, *exc) -> None:
        self.release()


class GrammarCache:
    def __init__(self, max_bytes: int = 256 << 20, tenant_bytes: int = 64 << 20):
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()  # least recently used first
        self._used: dict[str, int] = {}  # bytes per tenant
        self.total = 0
        self.configure(max_bytes, tenant_bytes)

    def configure(self, max_bytes: int, tenant_bytes: int) -> None:
        self.max_bytes, self.tenant_bytes = int(max_bytes), int(min(tenant_bytes, max_bytes))

    @staticmethod
    def estimate(grammar: str) -> int:
        return BASE_COST + COST_PER_CHAR * len(grammar)

    def __len__(self) -> int:
        return len(self._entries)

    def used(self, tenant: str) -> int:
        with self._lock:
            return self._used.get(tenant, 0)

    # -- use -------------------------------------------------------------------------------------------------------
    def hold(self, ll, grammar: str, tenant: str = "") -> Hold:
        """The compiled `grammar` for llguidance tokenizer `ll`, held; compiled here on a miss (call it off the
        engine thread). Raises GrammarError (cannot compile, overflows on its first token, too large for a
        tenant's share) or GrammarBudget (held grammars fill the budget)."""
        key = (id(ll), grammar)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                entry.holds += 1
                fresh = False
            else:
                entry = _Entry(key, self.estimate(grammar), tenant, holds=1)
                self._make_room(entry.cost, tenant)
                self._add(entry)  # counted while it compiles: concurrent compiles share the budget
                fresh = True
        if fresh:
            try:
                entry.proto = _compile(ll, grammar)
            except GrammarError as exc:
                entry.error = exc
                with self._lock:
                    self._drop(entry)
            finally:
                entry.ready.set()
        else:
            entry.ready.wait()
        if entry.error is not None:
            self._release(entry)
            raise entry.error
        return Hold(self, entry)

    def prototype(self, ll, grammar: str):
        """The compiled grammar for the engine: cached (held by its request), or compiled now whatever the budget
        (outside a server: one caller, its own grammars)."""
        key = (id(ll), grammar)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.ready.is_set() and entry.error is None:
                self._entries.move_to_end(key)
                return entry.proto
        try:
            with self.hold(ll, grammar) as proto:
                return proto
        except GrammarBudget:
            return _compile(ll, grammar)

    # -- bookkeeping (the lock held) --------------------------------------------------------------------------------
    def _make_room(self, cost: int, tenant: str) -> None:
        if cost > self.tenant_bytes:
            raise GrammarError(f"this schema or grammar is too large: compiled, it would take about "
                               f"{_mb(cost)}, more than the {_mb(self.tenant_bytes)} one API key's grammars may "
                               f"take (--grammar-cache-tenant-bytes)")
        self._evict(lambda e: e.tenant == tenant, lambda: self._used.get(tenant, 0) + cost > self.tenant_bytes)
        if self._used.get(tenant, 0) + cost > self.tenant_bytes:
            raise GrammarBudget(f"this API key's structured-output grammars in use take {_mb(self._used[tenant])} "
                                f"of its {_mb(self.tenant_bytes)}: retry when its running requests finish")
        self._evict(lambda e: True, lambda: self.total + cost > self.max_bytes)
        if self.total + cost > self.max_bytes:
            raise GrammarBudget(f"the structured-output grammars in use take {_mb(self.total)} of "
                                f"{_mb(self.max_bytes)}: retry when running requests finish")

    def _evict(self, which, over) -> None:
        for entry in [e for e in self._entries.values() if e.holds == 0 and which(e)]:
            if not over():
                return
            self._drop(entry)

    def _add(self, entry: _Entry) -> None:
        self._entries[entry.key] = entry
        self._used[entry.tenant] = self._used.get(entry.tenant, 0) + entry.cost
        self.total += entry.cost

    def _drop(self, entry: _Entry) -> None:
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
            self.total -= entry.cost
            left = self._used[entry.tenant] - entry.cost
            if left:
                self._used[entry.tenant] = left
            else:
                del self._used[entry.tenant]

    def _release(self, entry: _Entry) -> None:
        with self._lock:
            entry.holds -= 1


def _compile(ll, grammar: str):
    """A parser for `grammar` in its start state, tried on its first tokens: a grammar the parser cannot follow
    from its very first token (say, more alternatives than a parser row may hold) fails here, as a 400, instead of
    in the engine mid-batch."""
    import llguidance

    proto = llguidance.LLMatcher(ll, grammar, log_level=0)  # it drops the GIL while compiling
    if proto.is_error():
        raise GrammarError(f"cannot use this schema or grammar: {_first_line(proto.get_error())}")
    first = proto.deep_copy()
    bits = np.unpackbits(np.frombuffer(first.compute_bitmask(), np.uint8), bitorder="little")[:ll.vocab_size]
    if first.is_error():
        raise GrammarError(f"the parser cannot start this schema or grammar: {_first_line(first.get_error())}")
    allowed = np.flatnonzero(bits)
    if len(allowed) > TRIAL_TOKENS:
        allowed = allowed[np.linspace(0, len(allowed) - 1, TRIAL_TOKENS).astype(int)]
    for token in allowed:
        trial = proto.deep_copy()
        if not trial.consume_token(int(token)) or trial.is_error():
            raise GrammarError(f"the parser cannot follow this schema or grammar past its first token: "
                               f"{_first_line(trial.get_error())}")
    return proto


def _first_line(error: str | None) -> str:
    """An llguidance error without the parser state dump that follows it."""
    return (error or "unknown error").strip().splitlines()[0][:500]


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"
