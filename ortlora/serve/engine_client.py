"""The seam between the HTTP API and the engines it drives.

    app.py ── translate.py: OpenAI body -> Work ──> EngineClient.submit(work) -> Jobs (events per choice)
                                                       ├─ LocalEngine (serve/local.py): this process's scheduler
                                                       └─ RayEngine (serve/ray/client.py): engine replicas

`app.py` is written against `EngineClient` alone: starting jobs (generation, and prompt scoring: a job whose
`params.prompt_logprobs` is set, with `max_new_tokens` 0 to score only), the adapter operations, health, metrics,
start/stop. Both implementations are built by composition and answer every request feature alike. What the API
layer needs to check a request before it reaches an engine (the context, the vocabulary, ...) is the frozen
`Limits`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import BinaryIO, Hashable, Protocol

from ortlora.adapters.merge import AdapterSpec, Recipe
from ortlora.runtime.sampling import SamplingParams
from ortlora.serve import protocol as P
from ortlora.serve.metrics import Metrics
from ortlora.runtime.scheduler import Event


@dataclass(frozen=True)
class AdapterChoice:
    """What one request runs: an adapter name or {name: weight} (an exact weighted combination), at `scale`."""
    spec: AdapterSpec
    scale: float = 1.0

    @property
    def label(self) -> str | None:
        """Its name in metrics and messages: the adapters' names (`a1`, `a1+a2`), without the weights, so that
        clients choosing scales cannot grow the metrics' label sets without bound."""
        recipe = Recipe.of(self.spec, self.scale)
        return None if recipe is None else "+".join(name for name, _ in recipe.parts)

    @property
    def names(self) -> tuple[str, ...]:
        """The registered adapters it is made of."""
        return (self.spec,) if isinstance(self.spec, str) else tuple(self.spec)


@dataclass(frozen=True)
class Work:
    """One request's jobs: one per (prompt, choice), prompt-major, each with its own sampling settings."""
    adapter: AdapterChoice | None  # None: the base model
    prompts: list[list[int]]
    n: int
    params: list[SamplingParams]  # len(prompts) * n
    tenant: str = ""
    cache_namespace: Hashable = ("tenant", "")  # prompt prefixes' KV is reused only within one namespace


@dataclass(frozen=True)
class Limits:
    """What the API layer checks a request against before it reaches an engine."""
    model_name: str
    version: str
    created: int
    context_length: int
    vocab_size: int
    max_token_chars: int  # the longest token's text: a prompt of more than context x this is refused untokenized
    max_choices: int
    eos_ids: frozenset[int]


@dataclass(frozen=True)
class EngineHealth:
    ready: bool  # False: draining, or (Ray) no replica answers
    draining: bool
    running: int
    waiting: int


class JobEvents:
    """The events of one request's jobs, handed from the engine's thread (`sink`) to the event loop."""

    def __init__(self):
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._head: Event | None = None

    def sink(self, ev: Event) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, ev)

    async def peek(self) -> Event:
        if self._head is None:
            self._head = await self._queue.get()
        return self._head

    async def get(self) -> Event:
        ev = await self.peek()
        self._head = None
        return ev

    def ready(self) -> list[Event]:
        """The events already queued, without waiting (after `get`: what one engine step sent)."""
        out = [] if self._head is None else [self._head]
        self._head = None
        while not self._queue.empty():
            out.append(self._queue.get_nowait())
        return out


class JobHandle(Protocol):
    """One choice as the response builders see it."""
    index: int
    prompt_ids: list[int]

    def cancel(self) -> None: ...


class Jobs(list):
    """The running jobs of one request (one `JobHandle` per choice) and their events."""

    def __init__(self, jobs: list[JobHandle], events: JobEvents):
        super().__init__(jobs)
        self.events = events

    def cancel(self) -> None:
        for job in self:
            job.cancel()


class EngineClient(Protocol):
    """What the HTTP API needs from the engines behind it."""
    limits: Limits
    tokenizer: "ortlora.runtime.tokenizer.Tokenizer"  # noqa: F821
    metrics: Metrics  # the HTTP layer counts its answers here

    def start(self) -> None: ...

    def drain(self) -> None:
        """Refuse new work from now on (503); running and queued work still finishes."""

    def stop(self, timeout: float | None = 30.0) -> bool:
        """Drain, wait up to `timeout` s for in-flight work, stop; True if all of it finished."""

    async def submit(self, work: Work, *, incremental: bool = True) -> Jobs:
        """Queue `work` (adapters held for each job, loaded on first use). Raises the typed errors the API maps to
        statuses: AdapterNotFound (404), AdapterBusy / QueueFull (429), ShuttingDown (503), ... `incremental`
        False: the caller waits for the whole answer, so the events may arrive all at once."""

    def adapter_names(self) -> list[str]: ...

    def has_adapter(self, name: str) -> bool: ...

    def adapter_info(self, name: str) -> P.AdapterInfo: ...

    def adapter_infos(self, names: list[str]) -> list[P.AdapterInfo]:
        """`adapter_info` of each of `names` still registered, in one pass (listings of thousands)."""

    def register_adapter(self, name: str, path: str | None = None, url: str | None = None) -> None:
        """Register a file (or PEFT folder) inside the adapters directory, or a URL under a prefix the operator
        allows, as `name`: fetched, checked and probed first (AdapterUnavailable: the URL did not answer)."""

    def upload_adapter(self, name: str, stream: BinaryIO) -> None:
        """Write an uploaded `.onnx_adapter` into the adapters directory as `name`, checked before it is kept."""

    def remove_adapter(self, name: str) -> None: ...

    def health(self) -> EngineHealth: ...

    def metrics_text(self) -> str:
        """Every metric in Prometheus' text format (with Ray: the ingress's and every replica's)."""
