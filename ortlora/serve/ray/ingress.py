"""The ingress deployment: app.py's FastAPI app (every endpoint, tenants, errors, streaming) over a `Frontend`,
which offers app.py what the single-process `Server` does, with a Ray handle as its engine client: a request's
jobs go to an engine replica chosen by Ray Serve's multiplexing (the adapter's name is the model id), and their
events come back as a stream.

The ingress owns the adapters' registrations (one replica of it: the names registered or hidden live in its
memory, as in the single-process server): it resolves a request's adapter in the shared directory, writes
uploads there (checked on a replica, which holds the model to probe them), and broadcasts deletes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from dataclasses import replace
from pathlib import Path

from ray import serve
from ray.exceptions import RayActorError
from starlette.concurrency import run_in_threadpool

from ortlora.errors import AdapterNotFound
from ortlora.runtime.adapter_dir import AdapterDirectory
from ortlora.runtime.tokenizer import Tokenizer
from ortlora.serve import protocol as P
from ortlora.serve.errors import APIError
from ortlora.serve.jobs import JobEvents, Jobs
from ortlora.serve.metrics import Metrics
from ortlora.serve.ray.replica import EngineInfo, Failure, ReplicaState, Work
from ortlora.runtime.scheduler import Event
from ortlora.serve.server import Server
from ortlora.serve.tenants import Tenants

log = logging.getLogger("ortlora.serve")
START_TIMEOUT_S = 600.0
POLL_S = 1.0  # how often the ingress asks every replica for its state (readiness, load, loaded adapters)


class Frontend(Server):
    """What app.py's handlers use in the Ray ingress: a `Server` without an engine. It inherits the translation of a
    request (sampling parameters), so the two stay one code, and replaces every part that touches an engine or
    adapter weights (`Server.__init__` is not called: there is no engine here to build)."""

    def __init__(self, replicas, info: EngineInfo, model: str, adapters: str | None, tenants: str | None,
                 max_body_bytes: int = 16 << 20, max_upload_bytes: int = 1 << 30, max_choices: int = 64):
        self.replicas = replicas  # DeploymentHandle of the engine replicas
        self.folder = Path(model)
        self.eos_ids = info.eos_ids
        self.model_name, self.version, self.created = info.model_name, info.version, info.created
        self.context_length, self.vocab_size, self.max_token_chars = (info.context_length, info.vocab_size,
                                                                      info.max_token_chars)
        self.max_body_bytes, self.max_upload_bytes, self.max_choices = max_body_bytes, max_upload_bytes, max_choices
        self.tokenizer = Tokenizer(model)
        self.tenants = Tenants.load(tenants) if tenants else Tenants.open()
        self.directory = AdapterDirectory(adapters, reserved=(self.model_name,)) if adapters else None
        self.metrics = ClusterMetrics(self)
        self.scheduler = _Health(self)  # /health reads the scheduler's counts
        self.states: list[ReplicaState] = []  # the last poll's answers
        self.draining = False
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="ortlora-replica-poll", daemon=True)

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._poller.start()

    def stop(self, timeout: float | None = 30.0) -> bool:
        self.draining = True
        self._stop.set()
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

    def acquire(self, name: str | None):
        raise APIError(400, "this request needs adapter weights in the ingress, which holds none with --replicas")

    def release(self, adapter) -> None:
        pass

    # -- adapters: registrations in the shared directory ----------------------------------------------------------
    def _need_directory(self) -> AdapterDirectory:
        if self.directory is None:
            raise APIError(400, "there is no adapters directory (start the server with --adapters DIR)")
        return self.directory

    def adapter_names(self) -> list[str]:
        if self.directory is None:
            return []
        self.directory.refresh()  # files dropped into the folder since: listed too
        return self.directory.names()

    def has_adapter(self, name: str) -> bool:
        try:
            self._need_directory().path(name)
        except (AdapterNotFound, APIError):
            return False
        return True

    def adapter_info(self, name: str) -> P.AdapterInfo:
        path = self._need_directory().path(name)
        return P.AdapterInfo(name=name, loaded=any(name in s.loaded for s in self.states),
                             path=self.directory.relative(path))

    def _check(self, path, name: str) -> None:
        """Refuse a file as a registration would: parsed, fitted and probed by a replica, which holds the model."""
        failure = self.replicas.check.remote(self.directory.relative(path), name).result(timeout_s=120)
        if failure is not None:
            raise failure.error()

    def add_adapter_path(self, name: str, path: str) -> None:
        # Adapters.register's steps, with the check on a replica
        directory = self._need_directory()
        directory.claim(name)
        real = directory.resolve(path)
        self._check(real, name)
        directory.claim(name)  # still free?
        directory.add(name, real)

    def add_adapter_upload(self, name: str, stream) -> None:
        self._need_directory().upload(name, stream, self.max_upload_bytes, check=lambda tmp: self._check(tmp, name))

    def remove_adapter(self, name: str) -> None:
        self._need_directory().remove(name)  # hidden here; a file uploaded through the API is deleted
        answers = self.replicas.broadcast("forget", name).results(timeout_s=30, return_exceptions=True)
        for answer in answers:
            if isinstance(answer, Exception):  # that replica is gone: its successor never loaded it
                log.warning("replica did not unload %r: %s", name, answer)

    # -- requests: the engine client ---------------------------------------------------------------------------------
    async def start_jobs(self, adapter: str | None, prompts: list[list[int]], n: int, params, tenant: str) -> Jobs:
        if self.draining:
            raise APIError(503, "the server is shutting down and accepts no new requests")
        if not self.states:
            raise APIError(503, "no engine replica is ready (starting or restarting): retry shortly",
                           "service_unavailable")
        source, version = None, ()
        if adapter is not None:
            path = await run_in_threadpool(self._need_directory().path, adapter)
            source, version = self.directory.relative(path), _version(path)
        work = Work(adapter, source, version, prompts, n, list(params), tenant)
        events = JobEvents()
        options = {"stream": True} if adapter is None else {"stream": True, "multiplexed_model_id": adapter}
        stream = RemoteStream(self.replicas.options(**options).generate.remote(work), events)
        return Jobs([RemoteJob(i, prompts[i // n], stream) for i in range(len(params))], events)


class RemoteStream:
    """The ingress's end of one request on a replica: the replica's event stream pumped into the request's
    `JobEvents`. Cancelling it cancels the stream, and with it the jobs on the replica."""

    def __init__(self, response, events: JobEvents):
        self.response = response
        self.task = asyncio.ensure_future(self._pump(events))

    async def _pump(self, events: JobEvents) -> None:
        try:
            async for batch in self.response:
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


class RemoteJob:
    """One choice of a request running on a replica: what jobs.py's response builders read of a `Job`."""

    def __init__(self, index: int, prompt_ids: list[int], stream: RemoteStream):
        self.index, self.prompt_ids, self.stream = index, prompt_ids, stream

    def cancel(self) -> None:
        self.stream.cancel()


class _Health:
    """The scheduler's view /health reads, over all replicas: not ready (503) while no replica answers."""

    def __init__(self, frontend: Frontend):
        self.frontend = frontend

    @property
    def draining(self) -> bool:
        return self.frontend.draining or not self.frontend.states

    @property
    def running_count(self) -> int:
        return sum(s.running for s in self.frontend.states)

    @property
    def waiting_count(self) -> int:
        return sum(s.waiting for s in self.frontend.states)


class ClusterMetrics(Metrics):
    """The ingress's metrics (HTTP answers) and every replica's, in one exposition, each sample labelled with its
    `replica` ("ingress" for the ingress's own)."""

    def __init__(self, frontend: Frontend):
        super().__init__()
        self.frontend = frontend

    def render(self) -> str:
        states = self.frontend.poll()
        self.frontend.states = states
        return merge_expositions([("ingress", super().render())] + [(s.replica, s.metrics) for s in states])


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


def _version(path) -> tuple:
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@serve.ingress()
class Ingress:
    """The ingress deployment: app.py's app over a Frontend."""

    async def __init__(self, replicas, config: dict):
        info = await asyncio.wait_for(replicas.describe.remote(), START_TIMEOUT_S)  # a first replica is up
        self.frontend = Frontend(replicas, info, **config)

    def __serve_build_asgi_app__(self):
        from ortlora.serve.app import create_app

        return create_app(self.frontend)
