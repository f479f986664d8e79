"""The engine thread: continuous batching over the runtime's `Batch`, for the server and the Python API alike.

    any thread ── submit(jobs) ──> FairQueue (one FIFO per tenant; bounded: QueueFull) ──┐
                                                                                         ▼
    engine thread:  loop { run calls queued for it (forget an unloaded adapter, lease a slot); drop cancelled
                           jobs; move jobs into the Batch while slots are free, least-served tenant first;
                           Batch.step() (prompt work within the step's token budget, packed; one decode run
                           for every running row, each row with its own adapter); send each job its events }
                                                                                         │
    any thread <── job.sink(Event) ──────────────────────────────────────────────────────┘

The Batch is single-threaded, so everything that touches it or the engine (steps, cancellations, slot leases,
dropping an unloaded adapter's cached tensors) happens on this thread; other threads only queue work and set flags.
Every kind of work (prompts, prompt scoring, n > 1 choices, constrained rows, resumed requests, conversations)
reaches the engine through here, so all of it pays from one step budget and one fair queue.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping

from ortlora.errors import OrtloraError, QueueFull, ShuttingDown
from ortlora.runtime.adapters import Adapter
from ortlora.runtime.batch import Batch
from ortlora.runtime.metrics import Metrics
from ortlora.runtime.request import Request, SlotLease
from ortlora.runtime.sampling import SamplingParams

log = logging.getLogger("ortlora.engine")


@dataclass
class Event:
    """What the engine sends a job's sink: new text, how many tokens it took, and at the end why it stopped."""
    index: int
    text: str = ""
    new_tokens: int = 0
    finish_reason: str | None = None
    error: BaseException | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None  # runtime.logprobs.TokenLogprob per token, when the request asked for them
    prompt_logprobs: list | None = None  # the first event of a job asking for them: per prompt token (None first)


@dataclass(eq=False)
class Job:
    """One choice of one request: a prompt, an adapter held for it, sampling settings, and where events go
    (`sink`, called on the engine thread or, for a job refused while queued, on the submitting thread). A job with a
    `lease` continues a conversation in the lease's KV slot."""
    index: int
    prompt_ids: list[int]
    adapter: Adapter | None
    adapter_name: str | None
    params: SamplingParams
    sink: Callable[[Event], None]
    tenant: str = ""
    cache_namespace: Hashable = None  # None: the scheduler's per-tenant default
    arrival: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    request: Request | None = None  # the runtime's request, once on the engine thread
    first_token: float | None = None
    done: bool = False
    queued: bool = True  # waiting in the queue (at first, or again after preemption)
    lease: SlotLease | None = None
    ended: threading.Event = field(default_factory=threading.Event)  # set once it left the engine's books

    def cancel(self) -> None:
        """Thread-safe: the engine drops the job before its next step (no-op once it finished)."""
        self.cancelled = True


class Usage:
    """Tokens each tenant was served lately (prompt tokens at admission, each generated token), decaying with a
    time constant of `tau` seconds: the least-served tenant goes first."""

    def __init__(self, tau: float = 10.0):
        self.tau = tau
        self._tokens: dict[str, float] = {}
        self._at = time.monotonic()

    def _decay(self) -> None:
        now = time.monotonic()
        factor = math.exp(-(now - self._at) / self.tau)
        self._at = now
        for tenant in list(self._tokens):
            self._tokens[tenant] *= factor
            if self._tokens[tenant] < 1e-3:
                del self._tokens[tenant]

    def add(self, tenant: str, tokens: float) -> None:
        self._decay()
        self._tokens[tenant] = self._tokens.get(tenant, 0.0) + tokens

    def snapshot(self) -> dict[str, float]:
        self._decay()
        return dict(self._tokens)


class FairQueue:
    """Jobs waiting for a batch slot: one FIFO per tenant, taken round-robin, so a tenant that floods the queue
    delays itself, not the others. When the queue is full, a tenant holding more waiting jobs than the newcomer
    would gives up its newest ones (refused with QueueFull) to make room: 429s go to the flooding tenant first.
    Not thread-safe: the scheduler's lock guards it."""

    def __init__(self, limit: int):
        self.limit = limit
        self._by_tenant: OrderedDict[str, deque[Job]] = OrderedDict()  # round-robin order: next tenant first
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def held(self, tenant: str) -> int:
        return len(self._by_tenant.get(tenant, ()))

    def backlog(self) -> dict[str, int]:
        """The tokens the waiting jobs ask for (prompt + at most max_new_tokens each), per tenant."""
        return {t: sum(len(j.prompt_ids) + j.params.max_new_tokens for j in q) for t, q in self._by_tenant.items() if q}

    def put(self, jobs: list[Job], tenant: str) -> list[Job]:
        """Queue `jobs` (all or none); returns the other tenants' jobs pushed out to make room."""
        need = self._count + len(jobs) - self.limit
        evicted: list[Job] = []
        if need > 0:
            # preempted jobs (at the front, already begun) are never pushed out
            counts = {t: sum(j.request is None for j in q) for t, q in self._by_tenant.items() if t != tenant}
            mine = self.held(tenant) + len(jobs)
            plan: list[str] = []
            while len(plan) < need:
                biggest = max(counts, key=counts.get, default=None)
                if biggest is None or counts[biggest] <= mine:
                    raise QueueFull(f"too many requests waiting ({self._count} queued, limit {self.limit}); "
                                    "retry later")
                counts[biggest] -= 1
                plan.append(biggest)
            for t in plan:
                evicted.append(self._by_tenant[t].pop())
                self._count -= 1
        queue = self._by_tenant.setdefault(tenant, deque())
        queue.extend(jobs)
        self._count += len(jobs)
        return evicted

    def put_back(self, job: Job) -> None:
        """A preempted job: first in its tenant's line, outside the limit (it was admitted once)."""
        self._by_tenant.setdefault(job.tenant, deque()).appendleft(job)
        self._count += 1

    def peek(self, tenant: str) -> Job:
        return self._by_tenant[tenant][0]

    def waiting_tenants(self) -> list[str]:
        return [t for t, q in self._by_tenant.items() if q]

    def take(self, served: Mapping[str, float] | None = None) -> Job | None:
        """The next job: of the waiting tenant least `served`, round-robin among equals."""
        served = served or {}
        waiting = self.waiting_tenants()
        if not waiting:
            return None
        tenant = min(waiting, key=lambda t: served.get(t, 0))  # min keeps the first of equals: round-robin order
        self._by_tenant.move_to_end(tenant)
        self._count -= 1
        return self._by_tenant[tenant].popleft()

    def remove(self, pred: Callable[[Job], bool]) -> list[Job]:
        gone = []
        for tenant, queue in self._by_tenant.items():
            keep = deque(j for j in queue if not pred(j))
            gone += [j for j in queue if pred(j)]
            self._by_tenant[tenant] = keep
        self._count -= len(gone)
        return gone

    def clear(self) -> list[Job]:
        return self.remove(lambda job: True)


class Scheduler:
    """Owns the runtime Batch on one thread; `submit` from any thread."""

    def __init__(self, batch: Batch, tokenizer, eos_ids: frozenset[int], metrics: Metrics | None = None,
                 max_queue: int = 256,
                 release: Callable[[Adapter | None], None] | None = None, base_label: str = "base",
                 cache_namespace: Callable[[str], object] = lambda tenant: ("tenant", tenant)):
        self.batch = batch
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.metrics = metrics or Metrics(batch.slots)
        self.max_queue = max_queue
        self.base_label = base_label  # the adapter label of base-model requests in the metrics
        self.cache_namespace = cache_namespace  # tenant -> the prefix-cache namespace of its requests
        self._release = release or (lambda adapter: None)  # for jobs that end before reaching the batch
        self._inbox = FairQueue(max_queue)
        self.usage = Usage()
        self._jobs: dict[Request, Job] = {}
        self._forget: deque[Adapter] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()  # run on the engine thread between steps
        self._cond = threading.Condition()
        self._stop = False
        self.draining = False
        self._thread = threading.Thread(target=self._run, name="ortlora-engine", daemon=True)
        self.max_adapters_seen = 0

    # -- any thread -----------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def started(self) -> bool:
        return self._thread.is_alive()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the engine thread between steps (what touches the batch or the engine: leasing a slot)."""
        future: Future = Future()
        with self._cond:
            if self._stop:
                raise ShuttingDown("the engine has stopped")
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    @property
    def waiting_count(self) -> int:
        return len(self._inbox)

    @property
    def running_count(self) -> int:
        return len(self._jobs)

    def submit(self, jobs: list[Job]) -> None:
        """Queue `jobs` of one tenant (all or none): QueueFull when the queue is full of this tenant's share,
        ShuttingDown when draining. Jobs of a flooding tenant may be pushed out to make room (their sinks hear
        QueueFull)."""
        tenant = jobs[0].tenant if jobs else ""
        with self._cond:
            if self.draining or self._stop:
                self.metrics.rejected.inc(reason="shutting_down")
                raise ShuttingDown("the server is shutting down and accepts no new requests")
            if len(jobs) > self.max_queue:
                raise OrtloraError(f"the request asks for {len(jobs)} choices; the queue holds {self.max_queue} "
                                   "(--max-queue): ask for fewer")
            try:
                evicted = self._inbox.put(jobs, tenant)
            except QueueFull:
                self.metrics.rejected.inc(reason="queue_full")
                raise
            self.metrics.queue_depth.set(len(self._inbox))
            for job in jobs:
                self.metrics.adapter_requests.inc(adapter=job.adapter_name or self.base_label)
            self._cond.notify()
        for job in evicted:
            self.metrics.rejected.inc(reason="queue_full")
            job.sink(Event(job.index, error=QueueFull("too many requests waiting, most of them this tenant's; "
                                                      "retry later")))
            self._finish(job, None)

    def forget_adapter(self, adapter: Adapter) -> None:
        """The adapters let `adapter` go (any thread): the batch drops its cached tensors before its next step."""
        with self._cond:
            self._forget.append(adapter)
            self._cond.notify()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def cancel(self, job: Job, timeout: float | None = 60.0) -> None:
        """Cancel `job` and wait (up to `timeout` s; not on the engine thread itself) until its slot and adapter
        are given back."""
        job.cancel()
        self.wake()
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            job.ended.wait(timeout)

    def drain(self) -> None:
        """Refuse new requests from now on; running and queued ones still finish."""
        with self._cond:
            self.draining = True

    def shutdown(self, timeout: float | None = 30.0) -> bool:
        """Drain, wait up to `timeout` s for in-flight work, then stop the thread; True if all work finished."""
        self.drain()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._inbox or self._jobs:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(min(left, 0.1) if left is not None else 0.1)
            finished = not (self._inbox or self._jobs)
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
        return finished

    # -- the engine thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stop or self._inbox or self._jobs or self._forget or self._calls):
                    self._cond.wait()
                if self._stop:
                    break
                forget, calls = list(self._forget), list(self._calls)
                self._forget.clear()
                self._calls.clear()
            for adapter in forget:
                self.batch.forget_adapter(adapter)
            for fn, future in calls:
                try:
                    future.set_result(fn())
                except Exception as exc:  # noqa: BLE001 - the caller's to handle
                    future.set_exception(exc)
            self._drop_cancelled()
            self._admit()
            if self.batch:
                try:
                    self._step()
                except Exception as exc:  # a bug, not a request's input (the batch ends those alone)
                    log.exception("engine step failed")
                    self._fail_all(exc)
        self._fail_all(ShuttingDown("the engine stopped before this request finished"))
        with self._cond:
            calls = list(self._calls)
            self._calls.clear()
        for _, future in calls:
            future.set_exception(ShuttingDown("the engine has stopped"))

    def _drop_cancelled(self) -> None:
        with self._cond:
            gone = self._inbox.remove(lambda job: job.cancelled)
        for job in gone:
            if job.request is not None:  # preempted: it still holds its adapter
                self.batch.cancel(job.request)
            self.metrics.finished.inc(reason="cancelled")
            self._finish(job, job.request)
        for req, job in list(self._jobs.items()):
            if job.cancelled:
                self.batch.cancel(req)  # frees the KV slot and releases the adapter
                self.metrics.finished.inc(reason="cancelled")
                self._finish(job, req)

    def _admit(self) -> None:
        """Move queued jobs into the batch while KV slots are free, least-served tenant first (`Usage`); with no
        slot free, a waiting tenant served far less than a running one takes slots from it (preempted jobs
        resume later, first in their tenant's line). A conversation's job brings its own slot: it goes in at once."""
        admitted = []
        with self._cond:  # out of the queue and into the books at once: shutdown never sees it in neither
            served = self._demand()
            admitted += self._inbox.remove(lambda job: job.lease is not None)
            self._preempt_for_fairness(served)
            free = self.batch.free_slots
            while free > 0 and (job := self._inbox.take(served)) is not None:
                served[job.tenant] = served.get(job.tenant, 0) + len(job.prompt_ids)
                admitted.append(job)
                free -= 1
            for job in admitted:
                if job.request is None:
                    job.request = Request(job.prompt_ids, job.params, self.tokenizer, job.adapter,
                                          eos_ids=self.eos_ids, label=job.adapter_name, lease=job.lease,
                                          cache_namespace=self.cache_namespace(job.tenant)
                                          if job.cache_namespace is None else job.cache_namespace)
                    self._jobs[job.request] = job
                    self.metrics.prefills.inc()
                    self.metrics.prompt_tokens.inc(len(job.prompt_ids))
                    self.usage.add(job.tenant, len(job.prompt_ids))
                job.queued = False
            self.metrics.queue_depth.set(len(self._inbox))
        for job in admitted:
            self.batch.add(job.request)
        self.metrics.running.set(len(self._jobs))

    def _demand(self) -> dict[str, float]:
        """Per tenant: tokens served lately plus the tokens its waiting jobs ask for. Lowest goes first, so a
        tenant's own backlog counts against it: a flood waits behind a few requests of another tenant, not the
        reverse."""
        demand = self.usage.snapshot()
        for tenant, tokens in self._inbox.backlog().items():
            demand[tenant] = demand.get(tenant, 0.0) + tokens
        return demand

    def _preempt_for_fairness(self, served: dict[str, float]) -> None:
        """(lock held) With no slot free, while the least-served waiting tenant has been served less than half of
        what the most-served running tenant has, the latter's most recently admitted job gives up its slot."""
        if self.batch.free_slots or not len(self._inbox):
            return
        running = [j for j in self._jobs.values() if not j.queued and j.lease is None]
        promised: dict[str, int] = {}
        for _ in range(self.batch.slots):
            waiting = [t for t in self._inbox.waiting_tenants() if self._inbox.held(t) > promised.get(t, 0)]
            if not waiting or not running:
                return
            tenant = min(waiting, key=lambda t: served.get(t, 0))
            over = max({j.tenant for j in running} - {tenant}, key=lambda t: served.get(t, 0), default=None)
            if over is None or served.get(tenant, 0) >= 0.5 * served.get(over, 0):
                return
            victim = next(j for j in reversed(running) if j.tenant == over)
            running.remove(victim)
            self.batch.preempt(victim.request)
            victim.queued = True
            self._inbox.put_back(victim)
            promised[tenant] = promised.get(tenant, 0) + 1
            served[tenant] = served.get(tenant, 0) + len(self._inbox.peek(tenant).prompt_ids)
            self.metrics.preemptions.inc()

    def _step(self) -> None:
        decoding = list(self.batch.running)
        events = self.batch.step()
        for run in self.batch.last_runs:
            self.metrics.prefill_runs.inc()
            self.metrics.prefill_run_rows.observe(len(run.pieces))
        if getattr(self.batch, "last_merged", None) is not None:
            self.metrics.prefill_runs_merged.inc()
        if decoding:
            distinct = len({r.adapter.uid if r.adapter is not None else 0 for r in decoding})
            self.metrics.decode_steps.inc()
            self.metrics.batch_size.observe(len(decoding))
            self.metrics.batch_adapters.observe(distinct)
            if distinct > self.max_adapters_seen:
                self.max_adapters_seen = distinct
                self.metrics.max_batch_adapters.set(distinct)
        now = time.monotonic()
        for req, chunk in events:
            job = self._jobs.get(req)
            if job is None:
                continue
            n = len(chunk.token_ids)
            self.metrics.generation_tokens.inc(n)
            self.usage.add(job.tenant, n)
            if job.first_token is None and n:
                job.first_token = now
                self.metrics.ttft.observe(now - job.arrival)
            if not job.cancelled:
                job.sink(Event(job.index, chunk.text, n, chunk.finish_reason, chunk.error, chunk.token_ids,
                               chunk.logprobs, chunk.prompt_logprobs))
            if chunk.finish_reason is not None:
                self.metrics.finished.inc(reason=chunk.finish_reason)
                self.metrics.latency.observe(now - job.arrival)
                self._finish(job, req)

    def _finish(self, job: Job, req: Request | None) -> None:
        """The job is over (finished or cancelled): it leaves the engine's books; its adapter was released by the
        batch (or, if it never reached the batch, is released here)."""
        job.done = True
        job.ended.set()
        if req is not None:
            self._jobs.pop(req, None)
        elif job.request is None:
            self._release(job.adapter)
        else:
            self._jobs.pop(job.request, None)
        self.metrics.running.set(len(self._jobs))
        with self._cond:
            self._cond.notify_all()

    def _fail_all(self, exc: BaseException) -> None:
        with self._cond:
            queued = self._inbox.clear()
        for job in queued:
            if job.request is not None:
                self.batch.cancel(job.request)
            job.sink(Event(job.index, error=exc))
            self._finish(job, job.request)
        for req, job in list(self._jobs.items()):
            try:
                self.batch.cancel(req)
            except Exception:  # the batch may be half-way through a failed step
                log.exception("cancelling after a failed step")
            job.sink(Event(job.index, error=exc))
            self._finish(job, req)
