"""Requests and the batch loop on top of the engine: prefill new requests, decode the running ones, one step at a time.

    batch = Batch(engine)
    batch.add(request_a); batch.add(request_b)      # any time, also between steps
    while batch:
        for request, chunk in batch.step(): ...      # streamed text per request

A request owns its sampler (seeded), its incremental detokenizer and its stop-string scan; it holds its KV slot
and its adapter (a reference counted by `ortlora.runtime.adapters.Adapters`) until it finishes or is cancelled.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Hashable, Sequence

import numpy as np

from ortlora.errors import GenerationError, OrtloraError
from ortlora.runtime.adapters import Adapter, AdapterLeases
from ortlora.runtime.engine import PREFILL_CHUNK, Engine, Row

MIN_CHUNK = 8
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
    cache_namespace: Hashable = None  # prompt prefixes' KV is reused only within one namespace (a server: tenant)

    def __post_init__(self):
        self.sampler = Sampler(self.params)
        self.detok: StreamDecoder = self.tokenizer.stream(self.params.skip_special_tokens)
        self._held = ""  # text that may be the start of a stop string
        self._stop_ids = frozenset(self.params.stop_token_ids)
        self._eos_list = sorted(self.eos_ids)
        self.constraint = None  # the grammar's parser (structured outputs), built here from params.grammar
        if self.params.grammar is not None:
            from ortlora.runtime.constraints import Constraint  # llguidance only when a request uses a grammar

            self.constraint = Constraint(self.params.grammar, self.tokenizer, self.eos_ids, self.params.max_new_tokens)
        self.gate = None  # open while a reasoning model thinks: the grammar waits for its end tag
        if self.constraint is not None and self.params.grammar_after:
            from ortlora.runtime.constraints import ReasoningGate

            self.gate = ReasoningGate(self.params.grammar_after)

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
            constrained = self.constraint is not None and (self.gate is None or self.gate.ended)
            if constrained:
                allowed = self.constraint.allowed(len(logits), p.max_new_tokens - len(self.token_ids))
            token = self.sampler(logits, history, banned, generated=self.token_ids, allowed=allowed)
            if constrained:
                self.constraint.advance(token)
            elif self.gate is not None:
                self.gate.feed(token)
        except OrtloraError as exc:
            label = self.label or (self.adapter.name if self.adapter is not None else None)
            name = f"adapter {label!r}" if label else "the base model"
            self.error = GenerationError(f"generation with {name} stopped after {len(self.token_ids)} tokens: {exc}")
            self.finish_reason = "error"
            return Chunk("", [], "error", self.error)
        self.token_ids.append(token)
        logprobs = None if p.logprobs is None else [token_logprob(logits, token, p.logprobs)]
        stop_token = token in self._stop_ids or (token in self.eos_ids and not p.ignore_eos)
        if stop_token:  # the EOS / stop token's own text is not part of the output (unless asked for)
            piece, _ = self._scan((self.detok.add(token) if p.include_stop_str_in_output else "")
                                  + self.detok.flush(), final=True)
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
        hits = [(text.find(s), -len(s)) for s in stops if s in text]
        if hits:
            at, length = min(hits)  # the first stop string; of two there, the longer
            return text[:at - length if self.params.include_stop_str_in_output else at], True
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

    A step prefills waiting requests (in chunks of at most `prefill_budget` tokens a step while others decode, so
    running streams keep their pace; see `prefill_budget`), then decodes every running request once. A failure
    belongs to the request that caused it: it ends alone (finish_reason "error") and the rest of the batch goes on.

    Not thread-safe: one thread (the caller, or a server's engine thread) drives `step()`.
    """

    def __init__(self, engine: Engine, adapters: AdapterLeases | None = None, *, prefill_chunk: int | None = None):
        """`adapters`: given back what each request held when it leaves. `prefill_chunk`: prompt tokens prefilled
        per step while other requests decode; None sizes it from measured step times (see `prefill_budget`)."""
        if prefill_chunk is not None and prefill_chunk < 1:
            raise OrtloraError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        self.engine = engine
        self.adapters = adapters
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []  # holding a slot, prompt partly in the cache
        self.running: list[Request] = []  # decoding
        self._fed: dict[Request, int] = {}  # prompt tokens in the cache, per prefilling request
        self._decode_s = 0.0  # moving average: seconds per decode step
        # a prefill run of n tokens takes about fixed + n * per_token seconds: the fixed part is a pass over the
        # weights, as a decode step is, so small chunks cost far more per token than one piece
        self._prefill_fixed = 0.0
        self._prefill_token = 0.0

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

    # -- a step ---------------------------------------------------------------------------------------------
    def step(self) -> list[tuple[Request, Chunk]]:
        """Admit, prefill (first token of each request whose prompt is now in), decode the others once."""
        events: list[tuple[Request, Chunk]] = []
        self._admit(events)
        decoding = list(self.running)
        self._prefill(self.prefill_budget() if decoding else None, events)
        if decoding:
            self._decode(decoding, events)
        for req, _ in events:
            if req.finished:
                self._leave(req)
        return events

    def prefill_budget(self) -> int:
        """Prompt tokens to prefill in a step that also decodes: fixed (`prefill_chunk`), or sized from measured
        times so that the chunk's run takes about two decode steps (a running stream's gap while a long prompt
        comes in stays within ~3x its usual); everything at once until the times are known (`calibrate`)."""
        if self.prefill_chunk is not None:
            return self.prefill_chunk
        if not (self._decode_s and self._prefill_token):
            return PREFILL_CHUNK
        room = 2 * self._decode_s - self._prefill_fixed
        return max(MIN_CHUNK, min(PREFILL_CHUNK, int(room / self._prefill_token)))

    @property
    def prefill_cost(self) -> tuple[float, float]:
        """(fixed seconds, seconds a token) of a prefill run, as measured so far (0, 0: not yet)."""
        return self._prefill_fixed, self._prefill_token

    def calibrate(self, small: int = 16, large: int = 144) -> None:
        """Measure a prefill run's fixed and per-token time (two runs, no slot used), so that the first long prompt
        is already prefilled in chunks of the right size."""
        collapsing = getattr(self.engine, "hugepages_thread", None)
        if collapsing is not None:  # it competes for the cores and memory bandwidth: times taken meanwhile run long
            collapsing.join()
        large = min(large, self.engine.max_len)  # a short context (the quickstart's 128 tokens) bounds it
        small = min(small, large // 2)
        times = []
        for n in (small, large, small, large):
            t0 = time.perf_counter()
            self.engine.probe({}, [1 + k % 255 for k in range(n)])
            times.append(time.perf_counter() - t0)
        t_small, t_large = min(times[0::2]), min(times[1::2])
        self._prefill_token = max((t_large - t_small) / (large - small), 1e-6)
        self._prefill_fixed = max(t_small - small * self._prefill_token, 0.0)

    def _admit(self, events: list) -> None:
        """Waiting requests take a slot (or their lease's) while slots are free."""
        while self.waiting and (self.waiting[0].lease is not None or self.engine.free_slots):
            req = self.waiting.popleft()
            if not req.prompt_ids:
                events.append((req, self._fail(req, "the prompt is empty (it encodes to no tokens)")))
                continue
            if req.lease is None:
                req.slot = self.engine.acquire_slot()
                cache = self.engine.prefix_cache
                hit = cache.load(self.engine, req.slot, req.cache_namespace, _uid(req), _context(req)) if cache else 0
                req.reused = self._fed[req] = hit
            elif req.lease.busy:
                events.append((req, self._fail(req, f"KV slot {req.lease.slot} is already generating for this "
                                                    "conversation")))
                continue
            else:  # a conversation: only what the prompt adds to the slot's tokens is prefilled
                lease = req.lease
                lease.busy, req.slot = True, lease.slot
                common = 0
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

    def _prefill(self, budget: int | None, events: list) -> None:
        """Spend up to `budget` prompt tokens (None: no limit) on prefilling requests, oldest first."""
        fresh = [r for r in self.prefilling if self._fed[r] == 0 and r.lease is None and not r.token_ids]
        if len(fresh) > 1 and _worth_batching(fresh) and (budget is None or sum(len(r.prompt_ids) for r in fresh) <= budget):
            try:
                logits = self._timed_prefill([Row(r.slot, r.prompt_ids, r.adapter) for r in fresh], batched=True)
            except Exception:  # noqa: BLE001 - one row's fault: found below, running them one by one
                pass
            else:
                for i, r in enumerate(fresh):
                    self._prefilled(r, len(r.prompt_ids), logits[i], events)
                if budget is not None:
                    budget -= sum(len(r.prompt_ids) for r in fresh)
        for req in list(self.prefilling):
            if budget is not None and budget <= 0:
                break
            done, context = self._fed[req], _context(req)
            piece = context[done:] if budget is None else context[done:done + budget]
            try:
                logits = self._timed_prefill([Row(req.slot, piece, req.adapter)])
            except Exception as exc:  # noqa: BLE001 - the engine failed on this request's input
                events.append((req, self._fail(req, exc)))
                continue
            self._prefilled(req, done + len(piece), logits[0], events)
            if budget is not None:
                budget -= len(piece)

    def _prefilled(self, req: Request, fed: int, logits: np.ndarray, events: list) -> None:
        self._fed[req] = fed
        if fed == len(_context(req)):  # the whole prompt is in: its first token (a resumed one has it)
            self._keep(req, _context(req))
            self.prefilling.remove(req)
            del self._fed[req]
            self.running.append(req)
            if not req.token_ids:
                events.append((req, req.feed(logits, self._full(req))))

    def _decode(self, decoding: list[Request], events: list) -> None:
        rows = [Row(r.slot, r.token_ids[-1:], r.adapter) for r in decoding]
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
        self._decode_s = _average(self._decode_s, time.perf_counter() - t0)
        events += [(r, r.feed(logits[i], self._full(r))) for i, r in enumerate(decoding)]

    def _timed_prefill(self, rows: list[Row], batched: bool = False) -> np.ndarray:
        t0 = time.perf_counter()
        logits = self.engine.prefill(rows, batched=batched)
        tokens = sum(len(r.tokens) for r in rows)
        if self._prefill_token and tokens >= MIN_CHUNK:  # the per-token part grows with the context attended to
            per_token = (time.perf_counter() - t0 - self._prefill_fixed) / tokens
            self._prefill_token = _average(self._prefill_token, max(per_token, 1e-6))
        return logits

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


def _context(req: Request) -> list[int]:
    """What a request's slot must hold before it decodes: its prompt, and for one resumed after preemption also
    its output but the last token (which its next decode step feeds)."""
    return req.prompt_ids + req.token_ids[:-1] if req.token_ids else req.prompt_ids


def _average(mean: float, x: float) -> float:
    return x if not mean else 0.8 * mean + 0.2 * x


def _worth_batching(requests: Sequence[Request]) -> bool:
    """Right-padded batched prefill pays for short prompts of similar length only: padding is wasted work, and
    long prompts gain nothing from it (benchmarks/NOTES.md#batched-prefill)."""
    lengths = [len(r.prompt_ids) for r in requests]
    return len(lengths) > 1 and max(lengths) <= 256 and max(lengths) * len(lengths) <= 1.25 * sum(lengths)


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
