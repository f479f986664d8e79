"""Continuous batching over one engine: requests hold KV slots, and each step runs a plan on the engine.

    batch = Batch(engine)
    batch.add(request_a); batch.add(request_b)      # any time, also between steps
    while batch:
        for request, chunk in batch.step(): ...      # streamed text per request

A step:
    admit       waiting requests take a free slot (a conversation its lease's); a cached prompt prefix is copied in
    plan        the prefilling requests' prompt work within the step's token budget (budget.py, planner.py): prompts
                not yet begun packed into shared runs, begun ones a run each, FIFO, no prompt starving
    prefill     the plan's runs on the engine; a request whose prompt is now in gets its first token (and its
                prompt's logprobs) and decodes from the next step on
    decode      every request that was decoding: one token each, one run
A failure belongs to the request that caused it: it ends alone (finish_reason "error"), the rest go on.

Not thread-safe: one thread (the scheduler's engine thread, or a caller stepping it) drives `step()`.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Sequence

import numpy as np

from ortlora.errors import AdapterInvalid, GenerationError, OrtloraError
from ortlora.runtime import planner
from ortlora.runtime.adapters import AdapterLeases
from ortlora.runtime.budget import Budget
from ortlora.runtime.engine import Engine, Row
from ortlora.runtime.request import Chunk, Completion, Request


class Batch:
    def __init__(self, engine: Engine, adapters: AdapterLeases | None = None, *, prefill_chunk: int | None = None,
                 max_num_batched_tokens: int | None = None):
        """`adapters`: given back what each request held when it leaves. `prefill_chunk`: prompt tokens a step
        while others decode (None: sized from measured costs); `max_num_batched_tokens`: a step's prompt tokens
        while nothing decodes (None: from measured costs). See budget.py."""
        self.engine = engine
        self.adapters = adapters
        self.budget = Budget(max_num_batched_tokens=max_num_batched_tokens, prefill_chunk=prefill_chunk,
                             vocab_size=engine.info.vocab_size)
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []  # holding a slot, prompt partly in the cache; FIFO
        self.running: list[Request] = []  # decoding
        self._fed: dict[Request, int] = {}  # context tokens in the slot, per prefilling request
        self.last_runs: list[planner.Run] = []  # the prompt runs of the last step (for metrics and tests)
        self.last_budget = 0.0  # and the token budget they were planned against
        self.last_merged: planner.Run | None = None  # the one of them that ran with the decode rows, if one did

    def __bool__(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    @property
    def slots(self) -> int:
        return self.engine.slots

    @property
    def free_slots(self) -> int:
        """Slots for requests not yet admitted (those waiting already claim theirs)."""
        return self.engine.free_slots - sum(1 for r in self.waiting if r.lease is None)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def forget_adapter(self, adapter) -> None:
        """The adapters' owner let `adapter` go: drop what the engine cached for it."""
        self.engine.forget_adapter(adapter)

    def calibrate(self) -> None:
        self.budget.calibrate(self.engine)

    # -- a step ---------------------------------------------------------------------------------------------
    def step(self) -> list[tuple[Request, Chunk]]:
        """Admit, prefill what the budget allows (first token of each request whose prompt is now in), decode the
        others once."""
        events: list[tuple[Request, Chunk]] = []
        self._admit(events)
        decoding = list(self.running)
        self.last_budget = self.budget.tokens(len(decoding), len(self.prefilling))
        runs = planner.plan(self._prompts(), self.last_budget, self.budget.limits())
        self.last_runs = runs
        merged, merged_rows = self._mergeable(runs, decoding)
        self.last_merged = merged
        for run in runs:
            if run is not merged:
                self._prefill(run, events)
        if merged is not None:
            self._decode_with(decoding, merged, merged_rows, events)
        elif decoding:
            self._decode(decoding, events)
        for req, _ in events:
            if req.finished:
                self._leave(req)
        return events

    def _prompts(self) -> list[planner.Prompt]:
        return [planner.Prompt(req, len(req.context) - self._fed[req], bool(self.engine.lengths[req.slot]),
                               req.wants_prompt_logprobs) for req in self.prefilling]

    def _admit(self, events: list) -> None:
        """Waiting requests take a slot (or their lease's) while slots are free."""
        while self.waiting and (self.waiting[0].lease is not None or self.engine.free_slots):
            req = self.waiting.popleft()
            if not req.prompt_ids:
                events.append((req, self._fail(req, "the prompt is empty (it encodes to no tokens)")))
                continue
            if req.lease is None:
                req.slot = self.engine.acquire_slot()
                req.unscored()
                cache = self.engine.prefix_cache
                hit = 0
                if cache is not None and not req.wants_prompt_logprobs:  # scored positions must be computed
                    hit = cache.load(self.engine, req.slot, req.cache_namespace, _uid(req), req.context)
                req.reused = self._fed[req] = hit
            elif req.lease.busy:
                events.append((req, self._fail(req, f"KV slot {req.lease.slot} is already generating for this "
                                                    "conversation")))
                continue
            else:  # a conversation: only what the prompt adds to the slot's tokens is prefilled
                lease = req.lease
                lease.busy, req.slot = True, lease.slot
                common = 0
                if not req.wants_prompt_logprobs:
                    for a, b in zip(lease.ids, req.prompt_ids[:-1]):  # at least the last prompt token is prefilled
                        if a != b:
                            break
                        common += 1
                self.engine.truncate(lease.slot, common)
                req.reused = self._fed[req] = common
            self.prefilling.append(req)

    def preempt(self, req: Request) -> None:
        """Take `req` out of its slot (for another request), keeping its adapter and all it generated: `add` it
        again to resume; its prompt and output are prefilled again (recompute), then it decodes on as before."""
        if req.lease is not None:
            raise OrtloraError("a request on a conversation's slot cannot be preempted")
        for group in (self.running, self.prefilling):
            if req in group:
                group.remove(req)
        self._fed.pop(req, None)
        if req.slot is not None:
            self.engine.release_slot(req.slot)
            req.slot = None

    def _prefill(self, run: planner.Run, events: list) -> None:
        """One planned run; if the engine refuses it, each row alone finds the one at fault."""
        reqs = [p.key for p in run.pieces]
        rows = self._rows(run)
        t0 = time.perf_counter()
        try:
            out = self.engine.run(rows)
        except Exception as exc:  # noqa: BLE001 - a row's input the engine refuses (or a fault in it)
            if len(rows) == 1:
                events.append((reqs[0], self._fail(reqs[0], exc)))
                return
            for piece in run.pieces:  # slots untouched by the failed run: each row again, alone
                self._prefill(planner.Run((piece,)), events)
            return
        self.budget.observe_prefill(run.padded, time.perf_counter() - t0)
        for req, row, logits in zip(reqs, rows, out):
            self._prefilled(req, len(row.tokens), logits, events)

    def _rows(self, run: planner.Run) -> list[Row]:
        return [Row(p.key.slot, p.key.context[self._fed[p.key]:self._fed[p.key] + p.tokens], p.key.adapter, p.logits)
                for p in run.pieces]

    @staticmethod
    def _decode_rows(decoding: list[Request]) -> list[Row]:
        return [Row(r.slot, r.token_ids[-1:], r.adapter) for r in decoding]

    def _mergeable(self, runs: list[planner.Run], decoding: list[Request]) -> tuple[planner.Run | None, list[Row]]:
        """The first of `runs` the engine can run with the decode rows (Engine.step: one pass over the weights for
        both) and its rows, if the engine can merge at all."""
        if decoding and getattr(self.engine, "unified", False):
            rows = self._decode_rows(decoding)
            for run in runs:
                prompt = self._rows(run)
                if self.engine.mergeable(rows, prompt):
                    return run, prompt
        return None, []

    def _decode_with(self, decoding: list[Request], run: planner.Run, prompt: list[Row], events: list) -> None:
        """The decode rows and prompt run `run` (its rows `prompt`) in one engine run; if it fails, each apart
        (finding the fault). Not observed by the budget: its costs model the two runs apart."""
        try:
            logits, out = self.engine.step(self._decode_rows(decoding), prompt)
        except Exception:  # noqa: BLE001 - nothing was kept: the two runs apart find the request at fault
            self._prefill(run, events)
            self._decode(decoding, events)
            return
        events += [(r, r.feed(logits[i], self._full(r))) for i, r in enumerate(decoding)]
        for piece, logits in zip(run.pieces, out):
            self._prefilled(piece.key, piece.tokens, logits, events)

    def _prefilled(self, req: Request, n: int, logits: np.ndarray, events: list) -> None:
        """`n` more tokens of `req`'s context are in its slot; `logits` those of the run's last positions of it."""
        start = self._fed[req]
        if req.wants_prompt_logprobs:
            req.score_prompt(start, logits)
        self._fed[req] = start + n
        context = req.context
        if self._fed[req] < len(context):
            return
        if not self._probed(req, logits, events):
            return
        self._keep(req, context)  # the whole prompt is in
        self.prefilling.remove(req)
        del self._fed[req]
        self.running.append(req)
        if not req.token_ids:  # its first token (a resumed request has it)
            events.append((req, req.first_chunk(logits[-1] if len(logits) else None, self._full(req))))

    def _probed(self, req: Request, logits: np.ndarray, events: list) -> bool:
        """The first step with an adapter loaded for it unprobed is that adapter's probe step: logits that are not
        finite refuse the adapter (this request fails with AdapterInvalid, as every other one holding it will), finite
        ones pass it."""
        adapter = req.adapter
        if adapter is None or not adapter.unprobed or not len(logits) or self.adapters is None:
            return True
        if adapter.refusal is None and np.isfinite(logits[-1]).all():
            self.adapters.passed(adapter)
            return True
        req.error = AdapterInvalid(self.adapters.refuse(adapter))
        req.finish_reason = "error"
        events.append((req, Chunk("", [], "error", req.error)))
        return False

    def _decode(self, decoding: list[Request], events: list) -> None:
        rows = self._decode_rows(decoding)
        t0 = time.perf_counter()
        try:
            logits = self.engine.decode(rows)
        except Exception:  # noqa: BLE001 - find the rows at fault: each alone (their positions are rewritten)
            for req, row in zip(decoding, rows):
                try:
                    one = self.engine.decode([row])[0]
                except Exception as exc:  # noqa: BLE001
                    events.append((req, self._fail(req, exc)))
                else:
                    events.append((req, req.feed(one, self._full(req))))
            return
        self.budget.observe_decode(time.perf_counter() - t0, len(rows))
        events += [(r, r.feed(logits[i], self._full(r))) for i, r in enumerate(decoding)]

    def _keep(self, req: Request, tokens: list[int]) -> None:
        """Offer the KV `req`'s slot holds for `tokens` to the prefix cache."""
        if self.engine.prefix_cache is not None:
            self.engine.prefix_cache.keep(self.engine, req.slot, req.cache_namespace, _uid(req), tokens)

    def _fail(self, req: Request, why: Exception | str) -> Chunk:
        """End `req` alone with finish_reason "error"."""
        label = req.label or (req.adapter.name if req.adapter is not None else None)
        name = f"adapter {label!r}" if label else "the base model"
        req.error = GenerationError(f"generation with {name} failed: {why}")
        req.finish_reason = "error"
        return Chunk("", [], "error", req.error)

    def _full(self, req: Request) -> bool:
        """Will the token about to be sampled fill the context? (prompt + output <= max_len, as in genai's
        max_length; the last token is never fed back, but a longer sequence could not be continued)"""
        return len(req.prompt_ids) + len(req.token_ids) + 1 >= self.engine.max_len

    def cancel(self, request: Request) -> None:
        """Stop `request` now (a client went away); its slot and adapter are released."""
        if request in self.waiting:
            self.waiting.remove(request)
        if request.finish_reason is None:
            request.finish_reason = "cancelled"
        self._leave(request)

    def _leave(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        if req in self.prefilling:
            self.prefilling.remove(req)
        self._fed.pop(req, None)
        if req.slot is not None:
            if req.error is None:  # what it generated too: a conversation's next prompt starts with it
                self._keep(req, req.prompt_ids + req.token_ids)
            if req.lease is None:
                self.engine.release_slot(req.slot)
            else:  # the slot holds the keys and values of every token fed so far
                req.lease.ids = (req.prompt_ids + req.token_ids)[:int(self.engine.lengths[req.slot])]
                req.lease.busy = False
            req.slot = None
        if self.adapters is not None and req.adapter is not None and not req.released:
            self.adapters.release(req.adapter)
            req.released = True


def _uid(req: Request) -> int:
    return req.adapter.uid if req.adapter is not None else 0


def run_to_end(batch: Batch, requests: Sequence[Request], step=Batch.step) -> list[Completion]:
    """Step `batch` (with `step(batch)`) until every request is done; on an error, every request gives back its
    slot and adapter."""
    for r in requests:
        batch.add(r)
    try:
        while batch:
            step(batch)
    finally:
        for r in requests:
            batch.cancel(r)
    failed = [(i, r) for i, r in enumerate(requests) if r.error is not None]
    if failed:
        i, r = failed[0]
        raise GenerationError(f"prompt {i}: {r.error}" if len(requests) > 1 else str(r.error))
    return [r.completion() for r in requests]
