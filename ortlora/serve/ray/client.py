"""`RayEngine`: the `EngineClient` of the Ray ingress. A request's jobs go to an engine replica chosen by Ray
Serve's multiplexing (the adapter's label is the model id) and their events come back as a stream. Adapter
registrations live here, in the same `AdapterRegistry` class a single process uses (one ingress replica, as one
process holds them in the single-process server): each request carries how its adapters are registered (an
`Origin`: found in --adapters, a file in the adapters folder, a URL), which the replica replays and resolves itself
(a URL through its own cache: no shared filesystem needed); a new registration is checked by a replica (which holds
the model to probe it); deletes are broadcast. Uploads are written into the adapters folder, so they need it shared.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import replace
from typing import BinaryIO

from ray.exceptions import RayActorError
from starlette.concurrency import run_in_threadpool

from ortlora.errors import AdapterNotFound
from ortlora.runtime.registry import Origin
from ortlora.runtime.tokenizer import Tokenizer
from ortlora.serve import protocol as P
from ortlora.serve.config import ServeConfig
from ortlora.serve.engine_client import EngineHealth, Event, JobEvents, Jobs, Limits, Work
from ortlora.serve.errors import APIError, ShuttingDown
from ortlora.serve.metrics import Metrics
from ortlora.serve.ray.replica import Failure, RemoteWork, ReplicaState, Source

log = logging.getLogger("ortlora.serve")
POLL_S = 1.0  # how often the ingress asks every replica for its state (readiness, load, loaded adapters)


class RayEngine:
    """Implements `ortlora.serve.engine_client.EngineClient` over the engine deployment's replicas."""

    def __init__(self, replicas, limits: Limits, config: ServeConfig):
        self.replicas = replicas  # DeploymentHandle of the engine replicas
        self.limits = limits
        self.config = config
        self.tokenizer = Tokenizer(config.model)
        self.registry = config.adapter_registry(reserved=(limits.model_name,))
        self.metrics = Metrics()  # the ingress's own: HTTP answers
        self.states: list[ReplicaState] = []  # the last poll's answers
        self.draining = False
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="ortlora-replica-poll", daemon=True)

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._poller.start()

    def drain(self) -> None:
        self.draining = True

    def stop(self, timeout: float | None = 30.0) -> bool:
        self.draining = True
        self._stop.set()
        self.registry.close()
        return True  # in-flight requests: Ray's graceful shutdown waits for the ingress's handlers

    def poll(self) -> list[ReplicaState]:
        """Every live replica's state (a replica that does not answer in time counts as not ready)."""
        answers = self.replicas.broadcast("state").results(timeout_s=5 * POLL_S, return_exceptions=True)
        return sorted((a for a in answers if isinstance(a, ReplicaState)), key=lambda s: s.replica)

    def _poll(self) -> None:
        while True:
            try:
                self.states = self.poll()
            except Exception:  # TimeoutError, or the controller restarting: not ready until it answers again
                log.warning("replicas did not answer the state poll", exc_info=True)
                self.states = []
            if self._stop.wait(POLL_S):
                return

    def health(self) -> EngineHealth:
        states = self.states
        return EngineHealth(ready=bool(states) and not self.draining, draining=self.draining,
                            running=sum(s.running for s in states), waiting=sum(s.waiting for s in states))

    def metrics_text(self) -> str:
        states = self.poll()
        self.states = states
        return merge_expositions([("ingress", self.metrics.render())] + [(s.replica, s.metrics) for s in states])

    # -- work -------------------------------------------------------------------------------------------------------
    async def submit(self, work: Work, *, incremental: bool = True) -> Jobs:
        if self.draining:
            raise ShuttingDown("the server is shutting down and accepts no new requests")
        if not self.states:
            raise APIError(503, "no engine replica is ready (starting or restarting): retry shortly",
                           "service_unavailable")
        sources = ()
        if work.adapter is not None:
            sources = tuple(await run_in_threadpool(self._sources, work.adapter.names))
        events = JobEvents()
        options = {"stream": incremental}
        if work.adapter is not None:
            options["multiplexed_model_id"] = work.adapter.label
        handle = self.replicas.options(**options)
        call = (handle.generate if incremental else handle.run).remote(RemoteWork(work, sources))
        stream = RemoteStream(call, events, incremental)
        return Jobs([RemoteJob(i, work.prompts[i // work.n], stream) for i in range(len(work.params))], events)

    def _sources(self, names: tuple[str, ...]) -> list[Source]:
        """How each adapter is registered (from memory: no file I/O), for the replica to replay."""
        return [Source(name, self.registry.origin(name)) for name in names]

    # -- adapters: registrations here, resolved by each replica --------------------------------------------------
    def adapter_names(self) -> list[str]:
        return self.registry.names()  # from memory: the folder is scanned again only when it changed

    def has_adapter(self, name: str) -> bool:
        return name != self.limits.model_name and name in self.registry

    def adapter_info(self, name: str) -> P.AdapterInfo:
        entry = self.registry.info(name)
        return P.AdapterInfo(name=name, loaded=any(name in s.loaded for s in self.states), path=entry.path,
                             url=entry.url)

    def adapter_infos(self, names: list[str]) -> list[P.AdapterInfo]:
        loaded = {n for s in self.states for n in s.loaded}
        out = []
        for name in names:
            try:
                entry = self.registry.info(name)
            except AdapterNotFound:  # gone since it was listed
                continue
            out.append(P.AdapterInfo(name=name, loaded=name in loaded, path=entry.path, url=entry.url))
        return out

    def _check(self, origin: Origin, name: str) -> None:
        """Refuse a registration as one process would: fetched, parsed, fitted and probed by a replica, which holds
        the model (a URL's copy stays in that replica's cache)."""
        failure = self.replicas.check.remote(origin, name).result(timeout_s=120)
        if failure is not None:
            raise failure.error()

    def register_adapter(self, name: str, path: str | None = None, url: str | None = None) -> None:
        registry = self.registry
        registry.claim(name)
        if url is not None:
            registry.check_allowed(url)
            self._check(Origin("url", url), name)
            registry.claim(name)  # still free?
            registry.add_url(name, url)
            return
        real = registry.resolve_path(path)
        self._check(Origin("path", registry.directory.relative(real)), name)
        registry.claim(name)  # still free?
        registry.add_path(name, real)

    def upload_adapter(self, name: str, stream: BinaryIO) -> None:
        directory = self.registry.need_directory()
        self.registry.upload(name, stream, self.config.max_upload_bytes,
                             check=lambda tmp: self._check(Origin("path", directory.relative(tmp)), name))

    def remove_adapter(self, name: str) -> None:
        self.registry.remove(name)  # hidden here; a file uploaded through the API is deleted
        answers = self.replicas.broadcast("forget", name).results(timeout_s=30, return_exceptions=True)
        for answer in answers:
            if isinstance(answer, Exception):  # that replica is gone: its successor never loaded it
                log.warning("replica did not unload %r: %s", name, answer)


class RemoteStream:
    """The ingress's end of one request on a replica: the replica's events (a stream of lists, one per engine step,
    or one list at the end) pumped into the request's `JobEvents`. Cancelling it cancels the call, and with it the
    jobs on the replica."""

    def __init__(self, response, events: JobEvents, incremental: bool):
        self.response = response
        self.task = asyncio.ensure_future(self._pump(events, incremental))

    async def _pump(self, events: JobEvents, incremental: bool) -> None:
        try:
            batches = self.response if incremental else _once(self.response)
            async for batch in batches:
                for ev in batch:
                    events.sink(replace(ev, error=ev.error.error()) if isinstance(ev.error, Failure) else ev)
        except asyncio.CancelledError:
            raise
        except RayActorError as exc:  # the replica died (its successor is starting)
            log.warning("engine replica lost mid-request: %s", exc)
            events.sink(Event(0, error=APIError(503, "the engine replica serving this request stopped before it "
                                                     "finished: retry", "service_unavailable")))
        except Exception as exc:
            log.exception("engine replica call failed")
            events.sink(Event(0, error=APIError(503, f"the engine replica could not serve this request "
                                                     f"({type(exc).__name__}): retry", "service_unavailable")))

    def cancel(self) -> None:
        if not self.task.done():
            self.task.cancel()
            self.response.cancel()


async def _once(response):
    yield await response


class RemoteJob:
    """One choice of a request running on a replica (a `JobHandle`)."""

    def __init__(self, index: int, prompt_ids: list[int], stream: RemoteStream):
        self.index, self.prompt_ids, self.stream = index, prompt_ids, stream

    def cancel(self) -> None:
        self.stream.cancel()


def merge_expositions(parts: list[tuple[str, str]]) -> str:
    """Prometheus texts of several processes as one: each family's HELP/TYPE once, then all its samples, each
    with a `replica` label."""
    families: dict[str, list[str]] = {}
    family: list[str] = []
    for replica, text in parts:
        label = 'replica="' + replica.replace("\\", "\\\\").replace('"', '\\"') + '"'
        for line in text.splitlines():
            if line.startswith("# "):
                name = line.split(" ", 3)[2]
                family = families.setdefault(name, [])
                if line not in family:
                    family.append(line)
            elif line:
                cut = min(i for i in (line.find("{"), line.find(" ")) if i >= 0)
                rest = line[cut + 1:] if line[cut] == "{" else "} " + line[cut + 1:]
                family.append(f"{line[:cut]}{{{label}{',' if line[cut] == '{' else ''}{rest}")
    return "\n".join(line for lines in families.values() for line in lines) + "\n"
