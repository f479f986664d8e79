"""The engine deployment: each replica is a `LocalEngine` (one engine thread, continuous mixed-adapter batching,
the fair queue across tenants, its own KV) without HTTP, driven by the ingress's `RayEngine` through a Ray Serve
handle with the adapter's label as the multiplexed model id.

    ingress ── handle.options(multiplexed_model_id=LABEL, stream=True).generate.remote(RemoteWork) ──> replica
                                        _hold(LABEL): multiplexing's LRU and routing info │
                               _sync: the file version the ingress resolved for each adapter │
                                                              LocalEngine.submit(work) ▼
    ingress <── lists of Events, one list per engine step (errors as Failure) ─────────────────── replica

Adapters: every replica opens the same `--adapters` source (a folder: shared storage, or the same files on each
node; a URL prefix or index: nothing shared) and finds adapters on first use, URL ones through its own cache folder;
the ingress owns registrations and sends each request's `Origin`s, which the replica replays (`_sync`), and
broadcasts deletes (`forget`). Each replica asks its sources for new versions itself (--adapter-revalidate).
A replica keeps as many adapters as multiplexing's `max_num_models_per_replica`, so the two LRUs, touched by the
same requests in the same order, hold the same adapters: routing and memory agree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from ray import serve
from starlette.concurrency import run_in_threadpool

from ortlora.errors import AdapterNotFound
from ortlora.runtime.registry import Origin
from ortlora.serve.config import ServeConfig
from ortlora.serve.engine_client import Event, Limits, Work
from ortlora.serve.errors import APIError, status_of
from ortlora.serve.metrics import Gauge


@dataclass(frozen=True)
class Source:
    """How the ingress has an adapter registered."""
    name: str
    origin: Origin


@dataclass(frozen=True)
class RemoteWork:
    """One request's work and the files of the adapters it uses, as the ingress sends them to a replica."""
    work: Work
    sources: tuple[Source, ...]


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
class ReplicaState:
    replica: str
    pid: int
    loaded: list[str]  # adapters in memory, least recently used first
    running: int
    waiting: int
    metrics: str  # Prometheus text: the engine's metrics and the loaded adapters


class EngineReplica:
    """One engine replica (a Ray actor process)."""

    def __init__(self, config: ServeConfig):
        from ortlora.serve.local import LocalEngine

        # a plain LRU, as multiplexing's: the router sends an adapter's requests where its LRU says the adapter
        # is, so the engine keeps the same adapters (tenant shares would keep others than the router believes)
        self.engine = LocalEngine(config, tenant_shares=False)
        self.engine.start()
        self.name = serve.get_replica_context().replica_id.unique_id
        self._origins: dict[str, Origin] = {}  # adapter -> the registration this replica serves

        async def hold(label: str) -> str:  # the adapters themselves are loaded by the engine on first use
            return label

        self._hold = serve.multiplexed(max_num_models_per_replica=config.max_loaded_adapters)(hold)

    def __del__(self):  # Ray's graceful shutdown: running requests finish first
        self.engine.stop(timeout=15)

    async def generate(self, remote: RemoteWork):
        """Stream lists of the jobs' events (errors as `Failure`), one list per engine step, until every job has
        finished or one failed; cancelled with the caller's stream, which cancels the jobs."""
        async for events in self._events(remote):
            yield events

    async def run(self, remote: RemoteWork) -> list[Event]:
        """Every event of the jobs in one answer (a request whose client waits for the whole response: one message
        back instead of one per engine step)."""
        return [ev async for events in self._events(remote) for ev in events]

    async def _events(self, remote: RemoteWork):
        work = remote.work
        try:
            if work.adapter is not None:
                await self._hold(serve.get_multiplexed_model_id() or work.adapter.label)
                await run_in_threadpool(self._sync, remote.sources)
            jobs = await self.engine.submit(work)
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
            jobs.cancel()

    def _sync(self, sources: tuple[Source, ...]) -> None:
        """Serve the registrations the ingress holds: a name registered otherwise here is registered again (its
        old version finishes the requests holding it); loaded, and checked, on first use."""
        for s in sources:
            if self._origins.get(s.name) != s.origin:
                self.engine.adapters.adopt(s.name, s.origin)
                self._origins[s.name] = s.origin

    # -- control plane (the ingress; broadcast to every replica where it says so) --------------------------------
    def describe(self) -> Limits:
        return self.engine.limits

    async def check(self, origin: Origin, name: str) -> Failure | None:
        """Whether `origin` (a file in the adapters directory, a URL) would be accepted as adapter `name`."""
        return await run_in_threadpool(self._check, origin, name)  # it runs the model: off the replica's loop

    def _check(self, origin: Origin, name: str) -> Failure | None:
        try:
            self.engine.adapters.check_origin(name, origin)
        except Exception as exc:
            return Failure.of(exc)
        return None

    def forget(self, name: str) -> None:
        """(broadcast) Adapter `name` was deleted: unloaded here once the requests holding it end."""
        self._origins.pop(name, None)
        try:
            self.engine.adapters.unregister(name)
        except AdapterNotFound:
            pass

    def state(self) -> ReplicaState:
        """(broadcast) This replica's metrics and load."""
        loaded = self.engine.adapters.loaded()
        gauge = Gauge("ortlora_replica_adapter_loaded", "adapters this replica holds in memory", ("adapter",))
        for name in loaded:
            gauge.set(1, adapter=name)
        text = self.engine.metrics_text() + "\n".join(gauge.render()) + "\n"
        health = self.engine.health()
        return ReplicaState(self.name, os.getpid(), loaded, health.running, health.waiting, text)
