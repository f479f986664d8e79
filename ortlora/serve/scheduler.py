"""The engine thread: continuous batching for the server over the runtime's `Batch` (ortlora.runtime.generation).

    HTTP handlers ── submit(jobs) ──> inbox (bounded: QueueFull -> 429) ──┐
                                                                          ▼
    engine thread:  loop { forget unloaded adapters; drop cancelled jobs; move inbox -> Batch while KV slots
                           are free; Batch.step() (prefill new rows, then one decode step for every running row,
                           each row with its own adapter); send each job's text to its sink }
                                                                          │
    HTTP handlers <── sink(Event) (loop.call_soon_threadsafe) <───────────┘

The runtime's Batch is single-threaded, so everything that touches the engine (steps, cancellations, dropping an
unloaded adapter's cached tensors) happens on this thread; other threads only queue work and set flags.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from ortlora.errors import OrtloraError
from ortlora.runtime.adapter_store import Adapter
from ortlora.runtime.generation import Batch, Request
from ortlora.runtime.sampling import SamplingParams
from ortlora.serve.errors import QueueFull, ShuttingDown
from ortlora.serve.metrics import Metrics

log = logging.getLogger("ortlora.serve")


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


@dataclass(eq=False)
class Job:
    """One choice of one HTTP request: a prompt, an adapter held for it, sampling settings, and where events go."""
    index: int
    prompt_ids: list[int]
    adapter: Adapter | None
    adapter_name: str | None
    params: SamplingParams
    sink: Callable[[Event], None]
    arrival: float = field(default_factory=time.monotonic)
    queue: Any = None  # the HTTP side's asyncio.Queue (sink's target)
    cancelled: bool = False
    request: Request | None = None  # the runtime's request, once on the engine thread
    first_token: float | None = None
    done: bool = False

    def cancel(self) -> None:
        """Thread-safe: the engine drops the job before its next step (no-op once it finished)."""
        self.cancelled = True


class Scheduler:
    """Owns the engine (through a runtime Batch) on one thread; `submit` from any thread."""

    def __init__(self, batch: Batch, tokenizer, eos_ids: frozenset[int], metrics: Metrics, max_queue: int = 256,
                 release: Callable[[Adapter | None], None] | None = None, base_label: str = "base"):
        self.batch = batch
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.metrics = metrics
        self.max_queue = max_queue
        self.base_label = base_label  # the adapter label of base-model requests in the metrics
        self._release = release or (lambda adapter: None)
        self._inbox: deque[Job] = deque()
        self._jobs: dict[Request, Job] = {}
        self._forget: deque[Adapter] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self.draining = False
        self._thread = threading.Thread(target=self._run, name="ortlora-engine", daemon=True)
        self.max_adapters_seen = 0

    # -- any thread -----------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def waiting_count(self) -> int:
        return len(self._inbox)

    @property
    def running_count(self) -> int:
        return len(self._jobs)

    def submit(self, jobs: list[Job]) -> None:
        """Queue `jobs` (all or none): QueueFull when --max-queue jobs already wait, ShuttingDown when draining."""
        with self._cond:
            if self.draining or self._stop:
                self.metrics.rejected.inc(reason="shutting_down")
                raise ShuttingDown("the server is shutting down and accepts no new requests")
            if len(jobs) > self.max_queue:
                raise OrtloraError(f"the request asks for {len(jobs)} choices; the queue holds {self.max_queue} "
                                   "(--max-queue): ask for fewer")
            if len(self._inbox) + len(jobs) > self.max_queue:
                self.metrics.rejected.inc(reason="queue_full")
                raise QueueFull(f"too many requests waiting ({len(self._inbox)} queued, limit {self.max_queue}); "
                                "retry later")
            self._inbox.extend(jobs)
            self.metrics.queue_depth.set(len(self._inbox))
            for job in jobs:
                self.metrics.adapter_requests.inc(adapter=job.adapter_name or self.base_label)
            self._cond.notify()

    def forget_adapter(self, adapter: Adapter) -> None:
        """The store unloaded `adapter` (any thread): the engine drops its cached tensors before its next step."""
        with self._cond:
            self._forget.append(adapter)
            self._cond.notify()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

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
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        return finished

    # -- the engine thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._inbox and not self._jobs and not self._forget:
                    self._cond.wait()
                if self._stop:
                    break
                forget = list(self._forget)
                self._forget.clear()
            for adapter in forget:
                self.batch.engine.forget_adapter(adapter)
            self._drop_cancelled()
            self._admit()
            if self.batch:
                try:
                    self._step()
                except Exception as exc:  # an engine failure ends the jobs of this batch, not the server
                    log.exception("engine step failed")
                    self._fail_all(exc)
        self._fail_all(ShuttingDown("the server stopped before this request finished"))

    def _drop_cancelled(self) -> None:
        with self._cond:
            gone = [j for j in self._inbox if j.cancelled]
            for job in gone:
                self._inbox.remove(job)
        for job in gone:
            self.metrics.finished.inc(reason="cancelled")
            self._finish(job, None)
        for req, job in list(self._jobs.items()):
            if job.cancelled:
                self.batch.cancel(req)  # frees the KV slot and releases the adapter
                self.metrics.finished.inc(reason="cancelled")
                self._finish(job, req)

    def _admit(self) -> None:
        """Move queued jobs into the batch while KV slots are free (the batch prefills them next step)."""
        free = self.batch.engine.free_slots - len(self.batch.waiting)
        admitted = []
        with self._cond:
            while free > 0 and self._inbox:
                admitted.append(self._inbox.popleft())
                free -= 1
            self.metrics.queue_depth.set(len(self._inbox))
        for job in admitted:
            req = Request(job.prompt_ids, job.params, self.tokenizer, job.adapter, eos_ids=self.eos_ids,
                          label=job.adapter_name)
            job.request = req
            self._jobs[req] = job
            self.batch.add(req)
        self.metrics.running.set(len(self._jobs))

    def _step(self) -> None:
        decoding = list(self.batch.running)
        prefilling = list(self.batch.waiting)
        events = self.batch.step()
        if prefilling:
            self.metrics.prefills.inc(len(prefilling))
            self.metrics.prompt_tokens.inc(sum(len(r.prompt_ids) for r in prefilling))
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
            if job.first_token is None:
                job.first_token = now
                self.metrics.ttft.observe(now - job.arrival)
            if not job.cancelled:
                job.sink(Event(job.index, chunk.text, n, chunk.finish_reason, chunk.error, chunk.token_ids,
                               chunk.logprobs))
            if chunk.finish_reason is not None:
                self.metrics.finished.inc(reason=chunk.finish_reason)
                self.metrics.latency.observe(now - job.arrival)
                self._finish(job, req)

    def _finish(self, job: Job, req: Request | None) -> None:
        """The job is over (finished or cancelled): it leaves the engine's books; its adapter was released by the
        batch (or, if it never reached the batch, is released here)."""
        job.done = True
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
            queued = list(self._inbox)
            self._inbox.clear()
        for job in queued:
            job.sink(Event(job.index, error=exc))
            self._finish(job, None)
        for req, job in list(self._jobs.items()):
            try:
                self.batch.cancel(req)
            except Exception:  # the batch may be half-way through a failed step
                log.exception("cancelling after a failed step")
            job.sink(Event(job.index, error=exc))
            self._finish(job, req)
