"""Automatic prefix caching: the keys and values of prompt prefixes, kept per (namespace, adapter) after a request
has computed them, copied into the slot of a later request whose prompt starts the same (as vLLM's automatic prefix
caching, keyed by LoRA).

    block k of a prompt = its tokens [k·BLOCK, (k+1)·BLOCK); its key = (key of block k-1 | (namespace, adapter uid),
                                                                     the block's tokens)
    entry = that block's KV, per cache input: [kv_heads, BLOCK, head_dim], a copy out of the slot that computed it

A lookup walks a prompt's full blocks from the first while they are cached, so a hit is always a prefix, exact to
the token. Different adapters give different keys and values, so the adapter's `uid` (unique per loaded version)
is part of every key and nothing is ever shared across adapters; `namespace` is opaque (a server passes the tenant:
the KV reveals the prompt). Entries are dropped least recently used first, past `max_bytes`; a hit touches its blocks
deepest first, so a chain loses its tail before its head.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np

BLOCK = 16  # tokens per entry: the granularity of a hit


@dataclass(eq=False)
class _Entry:
    id: int
    uid: int
    kv: list[np.ndarray]  # per cache input, [kv_heads, BLOCK, head_dim]
    nbytes: int


class PrefixCache:
    """Blocks of cached KV for one engine's cache layout (`engine.kv`: name -> [slots, kv_heads, max_len, head_dim])."""

    def __init__(self, max_bytes: int, block: int = BLOCK):
        self.max_bytes = max_bytes
        self.block = block
        self.bytes = 0
        self.hits = 0  # lookups that found at least one block
        self.hit_tokens = 0
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()  # least recently used first
        self._next = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _chain(self, namespace: Hashable, uid: int, tokens: Sequence[int], blocks: int):
        """(key, entry or None) of the first `blocks` blocks, stopping after the first missing one."""
        parent: object = ("root", namespace, uid)
        for k in range(blocks):
            key = (parent, tuple(tokens[k * self.block:(k + 1) * self.block]))
            entry = self._entries.get(key)
            yield key, entry
            if entry is None:
                return
            parent = entry.id

    def load(self, engine, slot: int, namespace: Hashable, uid: int, tokens: Sequence[int]) -> int:
        """Copy the longest cached prefix of `tokens` (all but the last token at most: a prefill needs one) into the
        empty `slot`; returns its length in tokens (0: a miss)."""
        found = [(key, e) for key, e in self._chain(namespace, uid, tokens, (len(tokens) - 1) // self.block) if e]
        if not found:
            return 0
        for k, (_, entry) in enumerate(found):
            for arr, block in zip(engine.kv.values(), entry.kv):
                arr[slot, :, k * self.block:(k + 1) * self.block] = block
        for key, _ in reversed(found):  # deepest first: the head stays longest
            self._entries.move_to_end(key)
        n = len(found) * self.block
        engine.lengths[slot] = n
        self.hits += 1
        self.hit_tokens += n
        return n

    def keep(self, engine, slot: int, namespace: Hashable, uid: int, tokens: Sequence[int]) -> None:
        """Cache the full blocks of `tokens`, whose KV `slot` holds (those already cached are only touched)."""
        blocks = min(len(tokens), int(engine.lengths[slot])) // self.block
        if not blocks or self.max_bytes <= 0:
            return
        keys, parent = [], ("root", namespace, uid)
        for k in range(blocks):
            key = (parent, tuple(tokens[k * self.block:(k + 1) * self.block]))
            entry = self._entries.get(key)
            if entry is None:
                kv = [arr[slot, :, k * self.block:(k + 1) * self.block].copy() for arr in engine.kv.values()]
                entry = _Entry(self._next, uid, kv, sum(a.nbytes for a in kv))
                self._next += 1
                self._entries[key] = entry
                self.bytes += entry.nbytes
            keys.append(key)
            parent = entry.id
        for key in reversed(keys):
            self._entries.move_to_end(key)
        while self.bytes > self.max_bytes and self._entries:
            _, entry = self._entries.popitem(last=False)
            self.bytes -= entry.nbytes

    def forget(self, uid: int) -> None:
        """Drop every block computed with adapter `uid` (it was unloaded: no request can ask for it again)."""
        for key in [k for k, e in self._entries.items() if e.uid == uid]:
            self.bytes -= self._entries.pop(key).nbytes

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0
