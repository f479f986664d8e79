"""One step's prompt work, planned against a token budget (pure: no engine, no requests; tested over fakes).

A step decodes every running row once (one run), then spends `budget` on prompt chunks (vLLM's
`max_num_batched_tokens`, Sarathi-Serve's stall-free batching). What a plan costs, in tokens:

    cost = sum over runs of (overhead + rows x width)      overhead: a run's fixed cost (a pass over the weights)
                                                             in tokens; padding (width - a row's chunk) counts too

Prompts are taken in FIFO order (the scheduler's fair order), each getting as much of what is left as it needs:

    a prompt already begun (its slot holds tokens):  a run of its own (the engine packs only empty slots)
    a prompt not begun:                              a piece of a shared run; the pieces of a step are split into
                                                     runs of similar widths (`pack`: least overhead + padding)

The first prompt always gets at least `min_chunk` tokens, so no prompt starves whatever the budget; a prompt that
does not fit whole gets a chunk of what is left, and planning stops once less than `min_chunk` is left.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Sequence


@dataclass(frozen=True)
class Prompt:
    """A prefilling request as the planner sees it."""
    key: Hashable  # the request
    left: int  # prompt tokens not yet in its slot
    begun: bool = False  # its slot holds tokens: it runs alone
    all_logits: bool = False  # it wants every position's logits (prompt logprobs): vocabulary-sized rows each


@dataclass(frozen=True)
class Piece:
    key: Hashable
    tokens: int  # the next `tokens` tokens of its prompt
    logits: int  # positions whose logits it needs: every one (prompt logprobs), its last if it ends, else none


@dataclass(frozen=True)
class Run:
    pieces: tuple[Piece, ...]

    @property
    def width(self) -> int:
        return max(p.tokens for p in self.pieces)

    @property
    def padded(self) -> int:
        return len(self.pieces) * self.width


@dataclass(frozen=True)
class Limits:
    run_tokens: int = 2048  # padded tokens in one run (the engine's attention scratch grows with it)
    logit_rows: int = 128  # logits positions one run returns (a prompt's logprobs: vocabulary floats each)
    overhead: float = 0.0  # a run's fixed cost, in tokens
    min_chunk: int = 8  # the least a step gives its first prompt


def plan(prompts: Sequence[Prompt], budget: float, limits: Limits = Limits()) -> list[Run]:
    """The runs of one step's prompt work: FIFO, within `budget` (but the first prompt's `min_chunk`)."""
    alone: list[Run] = []
    pieces: list[Piece] = []
    spent = 0.0  # the cost of `alone`
    for i, p in enumerate(prompts):
        cap = min(p.left, limits.run_tokens, limits.logit_rows if p.all_logits else p.left)
        room = budget - spent - (cost(pieces, limits) if pieces else 0.0)
        if p.begun:
            chunk = min(cap, math.floor(room - limits.overhead))
        else:
            chunk = _fresh_chunk(pieces, p, cap, budget - spent, limits)
        if i == 0:
            chunk = max(chunk, min(cap, limits.min_chunk))
        if chunk < min(cap, limits.min_chunk):
            break
        piece = Piece(p.key, chunk, chunk if p.all_logits else int(chunk == p.left))
        if p.begun:
            alone.append(Run((piece,)))
            spent += limits.overhead + chunk
        else:
            pieces.append(piece)
    return alone + pack(pieces, limits)


def _fresh_chunk(pieces: list[Piece], p: Prompt, cap: int, room: float, limits: Limits) -> int:
    """The largest chunk of fresh prompt `p` (up to `cap`) whose pieces, packed with the others, cost <= room."""
    def fits(n: int) -> bool:
        return cost(pieces + [Piece(p.key, n, n if p.all_logits else int(n == p.left))], limits) <= room

    if fits(cap):
        return cap
    lo, hi = 0, cap  # fits(lo) or lo == 0; not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def cost(pieces: Sequence[Piece], limits: Limits) -> float:
    """The least cost of running `pieces` (all fresh) in shared runs."""
    return _partition(sorted(pieces, key=lambda q: q.tokens), limits)[0]


def pack(pieces: Sequence[Piece], limits: Limits) -> list[Run]:
    """`pieces` in runs of similar widths: the split of the width-sorted pieces into contiguous groups with the
    least total overhead + padded tokens, each within the run limits (dynamic programming over the split points)."""
    ordered = sorted(pieces, key=lambda q: q.tokens)
    _, cuts = _partition(ordered, limits)
    return [Run(tuple(ordered[a:b])) for a, b in zip(cuts, cuts[1:])]


def _partition(ordered: Sequence[Piece], limits: Limits) -> tuple[float, list[int]]:
    """(least cost, split points) of width-sorted pieces; best[j] covers ordered[:j], a group ordered[i:j] costs
    overhead + (j - i) x its widest (the last)."""
    n = len(ordered)
    best, back = [0.0] + [math.inf] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        width, logits = ordered[j - 1].tokens, 0
        for i in range(j - 1, -1, -1):
            logits += ordered[i].logits
            rows = j - i
            if rows > 1 and (rows * width > limits.run_tokens or logits > limits.logit_rows):
                break
            c = best[i] + limits.overhead + rows * width
            if c < best[j]:
                best[j], back[j] = c, i
    cuts, j = [n], n
    while j > 0:
        j = back[j]
        cuts.append(j)
    return best[n], cuts[::-1]
