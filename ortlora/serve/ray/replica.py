"""The engine deployment: each replica is today's single-process engine (a `Server` without HTTP: one engine
thread, continuous mixed-adapter batching, the fair queue across tenants), driven by the ingress through a Ray
Serve handle with the adapter's name as the multiplexed model id.

    ingress ── handle.options(multiplexed_model_id=NAME, stream=True).generate.remote(Work) ──> replica
                                               _hold(NAME): multiplexing's LRU and routing info │
                                        _sync: the file version the ingress resolved for NAME │
                                                        jobs_.start: jobs on its Server's scheduler ▼
    ingress <── lists of Events (errors as Failure) ─────────────────────────────────────────── replica

Adapters: every replica opens the same adapters directory (shared storage in a cluster) and finds files on first
use; the ingress owns registrations and sends each request's file and version, and broadcasts deletes (`forget`).
A replica's `Adapters` keep as many adapters as multiplexing's `max_num_models_per_replica`, so the two LRUs,
touched by the same requests in the same order, hold the same adapters: routing and memory agree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from ray import serve
from starlette.concurrency import run_in_threadpool

from ortlora.errors import AdapterNotFound
from ortlora.runtime.sampling import SamplingParams
from ortlora.serve import jobs as jobs_
from ortlora.serve.errors import APIError, status_of
from ortlora.serve.metrics import Gauge
from ortlora.runtime.scheduler import Event


@dataclass(frozen=True)
class Work:
    """One request's jobs, as the ingress sends them to a replica."""
    adapter: str | None
    source: str | None  # the adapter's file, relative to the adapters directory every replica opens
    version: tuple  # that file's (inode, size, mtime) when the ingress resolved it: a replaced file loads again
    prompts: list[list[int]]
    n: int
    params: list[SamplingParams]
    tenant: str


@dataclass(frozen=True)
class Failure:
    """An error crossing processes as the HTTP answer it becomes (exceptions with extra state do not pickle)."""
    status: int
    message: str

    @classmethod
    def of(cls, exc: BaseException) -> "Failure":
        return cls(status_of(exc), str(exc) if status_of(exc) != 500 else f"internal error: {type(exc).__name__}")

    def error(self) -> APIError:
        return APIError(self.status, self.message)


@dataclass(frozen=True)
class EngineInfo:
    """What the ingress needs to check requests as the single-process server does."""
    model_name: str
    version: str
    created: int
    context_length: int
    vocab_size: int
    max_token_chars: int
    eos_ids: frozenset[int]


@dataclass(frozen=True)
class ReplicaState:
    replica: str
    pid: int
    loaded: list[str]  # adapters in memory, least recently used first
    running: int
    waiting: int
    metrics: str  # Prometheus text: the Server's metrics and the loaded adapters


class EngineReplica:
    """One engine replica (a Ray actor process)."""

    def __init__(self, model: str, adapters: str | None, max_loaded_adapters: int, options: dict):
        from ortlora.serve.server import Server

        self.server = Server(model, adapters=adapters, max_loaded_adapters=max_loaded_adapters, **options)
        self.server.start()
        self.name = serve.get_replica_context().replica_id.unique_id
        self._versions: dict[str, tuple] = {}  # adapter -> (source, version) this replica serves

        async def hold(name: str) -> str:  # the adapter itself is loaded by the Server on first use
            return name

        self._hold = serve.multiplexed(max_num_models_per_replica=max_loaded_adapters)(hold)

    def __del__(self):  # Ray's graceful shutdown: running requests finish first
        self.server.stop(timeout=15)

    async def generate(self, work: Work):
        """Stream lists of the jobs' events (errors as `Failure`) until every job has finished or one failed;
        cancelled with the caller's stream, which cancels the jobs."""
        try:
            if work.adapter is not None:
                await self._hold(serve.get_multiplexed_model_id() or work.adapter)
                await run_in_threadpool(self._sync, work)
            jobs = await jobs_.start(self.server, work.adapter, work.prompts, work.n, work.params, work.tenant)
        except Exception as exc:  # refused before running: not found, busy, queue full, shutting down
            yield [Event(0, error=Failure.of(exc))]
            return
        try:
            left = len(jobs)
            while left:
                events = [await jobs.events.get(), *jobs.events.ready()]
                out = []
                for ev in events:
                    if ev.error is not None:
                        out.append(replace(ev, error=Failure.of(ev.error)))
                        left = 0
                        break
                    left -= ev.finish_reason is not None
                    out.append(ev)
                yield out
        finally:
            for job in jobs:
                job.cancel()

    def _sync(self, work: Work) -> None:
        """Serve the file version the ingress resolved: a name registered under another file, or a file replaced
        since this replica loaded it, is registered again (its old version finishes the requests holding it)."""
        seen = self._versions.get(work.adapter)
        if seen == (work.source, work.version):
            return
        adapters = self.server.adapters
        if seen is not None or work.adapter not in adapters or adapters.info(work.adapter).path != work.source:
            self.forget(work.adapter)
            adapters.register(work.adapter, work.source)
        self._versions[work.adapter] = (work.source, work.version)

    # -- control plane (the ingress; broadcast to every replica where it says so) --------------------------------
    def describe(self) -> EngineInfo:
        s = self.server
        return EngineInfo(s.model_name, s.version, s.created, s.context_length, s.vocab_size, s.max_token_chars,
                          s.eos_ids)

    async def check(self, source: str, name: str) -> Failure | None:
        """Whether file `source` (in the adapters directory) would be accepted as adapter `name`."""
        return await run_in_threadpool(self._check, source, name)  # it runs the model: off the replica's loop

    def _check(self, source: str, name: str) -> Failure | None:
        directory = self.server.adapters.directory
        try:
            if directory is None:
                raise APIError(400, "there is no adapters directory (start the server with --adapters DIR)")
            self.server.adapters.check(directory.root / source, name)
        except Exception as exc:
            return Failure.of(exc)
        return None

    def forget(self, name: str) -> None:
        """(broadcast) Adapter `name` was deleted: unloaded here once the requests holding it end."""
        self._versions.pop(name, None)
        try:
            self.server.adapters.unregister(name)
        except AdapterNotFound:
            pass

    def state(self) -> ReplicaState:
        """(broadcast) This replica's metrics and load."""
        s = self.server
        loaded = s.adapters.loaded()
        gauge = Gauge("ortlora_replica_adapter_loaded", "adapters this replica holds in memory", ("adapter",))
        for name in loaded:
            gauge.set(1, adapter=name)
        text = s.metrics.render() + "\n".join(gauge.render()) + "\n"
        return ReplicaState(self.name, os.getpid(), loaded, s.scheduler.running_count, s.scheduler.waiting_count,
                            text)

