"""Requests and the batch loop on top of the engine: prefill new requests, decode the running ones, one step at a time.

    batch = Batch(engine)
    batch.add(request_a); batch.add(request_b)      # any time, also between steps
    while batch:
        for request, chunk in batch.step(): ...      # streamed text per request

A request owns its sampler (seeded), its incremental detokenizer and its stop-string scan; it holds its KV slot
and its adapter (a reference in the AdapterStore) until it finishes or is cancelled.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ortlora.errors import GenerationError, OrtloraError
from ortlora.runtime.adapter_store import Adapter, AdapterStore
from ortlora.runtime.engine import Engine, Row
from ortlora.runtime.logprobs import TokenLogprob, token_logprob
from ortlora.runtime.sampling import Sampler, SamplingParams
from ortlora.runtime.tokenizer import StreamDecoder, Tokenizer


@dataclass
class Chunk:
    """What one step adds to a request: new text (never half a character), the sampled ids, and at the end why."""
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" (EOS, stop token or string), "length" (max tokens or context), "error"
    error: GenerationError | None = None  # why the request ended with "error"; other requests go on
    logprobs: list[TokenLogprob] | None = None  # one per sampled id, when the request asked for logprobs


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # every sampled id, the final EOS included
    prompt_tokens: int
    finish_reason: str
    adapter: str | None = None


@dataclass(eq=False)
class SlotLease:
    """A KV slot kept across generations (one conversation): each prompt reuses the cached prefix it shares with
    the previous prompt + output, and only the rest is prefilled."""
    slot: int
    ids: list[int] = field(default_factory=list)  # the tokens whose keys and values the slot holds
    busy: bool = False


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    tokenizer: Tokenizer
    adapter: Adapter | None = None
    eos_ids: frozenset[int] = frozenset()
    slot: int | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    released: bool = False  # the adapter reference went back to the store
    lease: SlotLease | None = None
    reused: int = 0  # prompt tokens whose KV came from the lease
    error: GenerationError | None = None
    label: str | None = None  # the adapter's name in messages (a server's store key differs); default its name

    def __post_init__(self):
        self.sampler = Sampler(self.params)
        self.detok: StreamDecoder = self.tokenizer.stream()
        self._held = ""  # text that may be the start of a stop string
        self._stop_ids = frozenset(self.params.stop_token_ids)
        self._eos_list = sorted(self.eos_ids)
        self.constraint = None  # the grammar's parser (structured outputs), built here from params.grammar
        if self.params.grammar is not None:
            from ortlora.runtime.constraints import Constraint  # llguidance only when a request uses a grammar

            self.constraint = Constraint(self.params.grammar, self.tokenizer, self.eos_ids, self.params.max_new_tokens)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def feed(self, logits: np.ndarray, context_full: bool) -> Chunk:
        """Sample the next token from `logits` [vocab] and return what it adds to the output; a request that
        cannot go on ends with finish_reason "error" (and the error) instead of failing the batch."""
        p = self.params
        history = self.prompt_ids + self.token_ids if p.repetition_penalty != 1.0 else ()
        banned = self._eos_list if len(self.token_ids) < p.min_new_tokens else ()
        try:
            allowed = None
            if self.constraint is not None:
                allowed = self.constraint.allowed(len(logits), p.max_new_tokens - len(self.token_ids))
            token = self.sampler(logits, history, banned, generated=self.token_ids, allowed=allowed)
            if self.constraint is not None:
                self.constraint.advance(token)
        except OrtloraError as exc:
            label = self.label or (self.adapter.name if self.adapter is not None else None)
            name = f"adapter {label!r}" if label else "the base model"
            self.error = GenerationError(f"generation with {name} stopped after {len(self.token_ids)} tokens: {exc}")
            self.finish_reason = "error"
            return Chunk("", [], "error", self.error)
        self.token_ids.append(token)
        logprobs = None if p.logprobs is None else [token_logprob(logits, token, p.logprobs)]
        stop_token = token in self._stop_ids or (token in self.eos_ids and not p.ignore_eos)
        if stop_token:  # the EOS / stop token's own text is not part of the output
            piece, _ = self._scan(self.detok.flush(), final=True)
            chunk = self._finish("stop", piece, [token])
        else:
            piece, hit = self._scan(self.detok.add(token))
            if hit or (self.constraint is not None and self.constraint.finished):  # the grammar's value is closed
                rest, _ = ("", False) if hit else self._scan(self.detok.flush(), final=True)
                chunk = self._finish("stop", piece + rest, [token])
            elif len(self.token_ids) >= p.max_new_tokens or context_full:
                rest, hit = self._scan(self.detok.flush(), final=True)
                chunk = self._finish("stop" if hit else "length", piece + rest, [token])
            else:
                chunk = self._emit(piece, [token])
        chunk.logprobs = logprobs
        return chunk

    def _scan(self, new: str, final: bool = False) -> tuple[str, bool]:
        """Append `new`; return (the text now safe to emit, whether a stop string ended it). A suffix that may be
        the start of a stop string is held back until the next token decides (or `final` releases it)."""
        stops = self.params.stop
        text = self._held + new
        self._held = ""
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            return text[:min(hits)], True
        if not stops or final:
            return text, False
        hold = 0
        for s in stops:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        self._held = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold], False

    def _emit(self, text: str, ids: list[int]) -> Chunk:
        self.text += text
        return Chunk(text, ids)

    def _finish(self, reason: str, text: str, ids: list[int]) -> Chunk:
        self.finish_reason = reason
        self._held = ""
        chunk = self._emit(text, ids)
        chunk.finish_reason = reason
        return chunk

    def completion(self) -> Completion:
        return Completion(self.text, list(self.token_ids), len(self.prompt_ids), self.finish_reason or "cancelled",
                          self.adapter.name if self.adapter else None)


class Batch:
    """Continuous batching over one engine: requests join between steps and leave as they finish.

    Not thread-safe: one thread (the caller, or a server's engine thread) drives `step()`.
    """

    def __init__(self, engine: Engine, store: AdapterStore | None = None):
        self.engine = engine
        self.store = store
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def __bool__(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def step(self) -> list[tuple[Request, Chunk]]:
        """Prefill waiting requests into free slots (first token each), else decode every running request once."""
        events = []
        admitted = []
        fresh = []  # new requests without a lease: prefilled together when that pays
        while self.waiting and (self.waiting[0].lease is not None or self.engine.free_slots):
            req = self.waiting.popleft()
            if req.lease is None:
                req.slot = self.engine.acquire_slot()
                fresh.append(req)
                continue
            try:
                logits = self._prefill(req)
            except BaseException:
                self._leave(req)
                raise
            events.append((req, req.feed(logits, self._full(req))))
            admitted.append(req)
        if fresh:
            try:
                logits = self.engine.prefill([Row(r.slot, r.prompt_ids, r.adapter) for r in fresh],
                                             batched=_worth_batching(fresh))
            except BaseException:
                for r in fresh:
                    self._leave(r)
                raise
            events += [(r, r.feed(logits[i], self._full(r))) for i, r in enumerate(fresh)]
            admitted += fresh
        decoding = [r for r in self.running if r not in admitted]
        self.running.extend(admitted)
        if decoding:
            rows = [Row(r.slot, r.token_ids[-1:], r.adapter) for r in decoding]
            logits = self.engine.decode(rows)
            events += [(r, r.feed(logits[i], self._full(r))) for i, r in enumerate(decoding)]
        for req, _ in events:
            if req.finished:
                self._leave(req)
        return events

    def _prefill(self, req: Request) -> np.ndarray:
        """Prefill a request that continues a conversation: only what its prompt adds to the slot's tokens."""
        lease = req.lease
        if lease.busy:
            raise OrtloraError(f"KV slot {lease.slot} is already generating for this conversation")
        lease.busy, req.slot = True, lease.slot
        common = 0
        for a, b in zip(lease.ids, req.prompt_ids[:-1]):  # at least the last prompt token is prefilled
            if a != b:
                break
            common += 1
        self.engine.truncate(lease.slot, common)
        req.reused = common
        return self.engine.prefill([Row(lease.slot, req.prompt_ids[common:], req.adapter)])[0]

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
        if req.slot is not None:
            if req.lease is None:
                self.engine.release_slot(req.slot)
            else:  # the slot holds the keys and values of every token fed so far
                req.lease.ids = (req.prompt_ids + req.token_ids)[:int(self.engine.lengths[req.slot])]
                req.lease.busy = False
            req.slot = None
        if self.store is not None and req.adapter is not None and not req.released:
            self.store.release(req.adapter)
            req.released = True


def _worth_batching(requests: Sequence[Request]) -> bool:
    """Right-padded batched prefill: 4 prompts of 32 tokens took 0.59 s instead of 0.84 s one by one (fp32
    Qwen2.5-0.5B shape, 2 cores); at 512 tokens it gained nothing, and padding is wasted work."""
    lengths = [len(r.prompt_ids) for r in requests]
    return len(lengths) > 1 and max(lengths) <= 256 and max(lengths) * len(lengths) <= 1.25 * sum(lengths)


def run_to_end(batch: Batch, requests: Sequence[Request]) -> list[Completion]:
    """Step `batch` until every request is done; on an error, every request gives back its slot and adapter."""
    for r in requests:
        batch.add(r)
    try:
        while batch:
            batch.step()
    finally:
        for r in requests:
            batch.cancel(r)
    failed = [(i, r) for i, r in enumerate(requests) if r.error is not None]
    if failed:
        i, r = failed[0]
        raise GenerationError(f"prompt {i}: {r.error}" if len(requests) > 1 else str(r.error))
    return [r.completion() for r in requests]
