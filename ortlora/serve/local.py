"""`LocalEngine`: the `EngineClient` of one process — the runtime's engine, tokenizer and adapters
(`ortlora.runtime.adapters.Adapters`, the one owner of every loaded adapter's life, over the `AdapterRegistry` of
names and sources), metrics and the scheduler's engine thread, wired together. A Ray engine replica is one of these
without HTTP. Adapter metrics follow the adapters' events (loads, uses, unloads).
"""

from __future__ import annotations

import time
import weakref
from typing import BinaryIO

from starlette.concurrency import run_in_threadpool

from ortlora import __version__
from ortlora.errors import ModelError
from ortlora.model_folder import ModelInfo
from ortlora.runtime import constraints
from ortlora.runtime.adapters import Adapter, AdapterEvent, AdapterLoaded, Adapters, AdapterUnloaded, AdapterUsed
from ortlora.runtime.engine import Engine
from ortlora.runtime.batch import Batch
from ortlora.runtime.tokenizer import Tokenizer
from ortlora.serve import protocol as P
from ortlora.serve.config import DEFAULT_MAX_LEN, ServeConfig
from ortlora.serve.engine_client import AdapterChoice, EngineHealth, JobEvents, Jobs, Limits, Work
from ortlora.serve.metrics import Metrics
from ortlora.runtime.scheduler import Job, Scheduler


class LocalEngine:
    """Implements `ortlora.serve.engine_client.EngineClient` on this process's engine thread."""

    def __init__(self, config: ServeConfig, *, tenant_shares: bool = True):
        """`tenant_shares` False: the loaded adapters are one plain LRU (a Ray replica: see replica.py)."""
        self.config = config
        max_len = config.max_model_len or min(DEFAULT_MAX_LEN, ModelInfo.read(config.model).context_length)
        # KV cache: [slots, kv_heads, max_len, head_dim] per layer, reserved up front, touched as it fills
        self.engine = Engine(config.model, slots=config.max_batch, threads=config.threads, max_len=max_len,
                             provider=config.provider, unified_steps=config.unified_steps)
        self.tokenizer = Tokenizer(config.model)
        eos_ids = frozenset(self.tokenizer.eos_ids) | frozenset(self.engine.info.eos_ids)
        folder = self.engine.folder
        model_name = config.model_name or folder.resolve().name
        self.limits = Limits(model_name=model_name, version=__version__, created=int(time.time()),
                             context_length=self.engine.max_len, vocab_size=self.engine.info.vocab_size,
                             max_token_chars=self.tokenizer.max_token_chars(), max_choices=config.max_choices,
                             eos_ids=eos_ids)
        self.metrics = Metrics(config.max_batch)
        self.registry = config.adapter_registry(reserved=(model_name,))
        self.adapters = Adapters.for_engine(self.engine, capacity=config.max_loaded_adapters, registry=self.registry,
                                            pins=config.pin, revalidate_s=config.adapter_revalidate,
                                            tenant_shares=tenant_shares, max_rank=config.max_lora_rank)
        batch = Batch(self.engine, self.adapters, prefill_chunk=config.prefill_chunk,
                      max_num_batched_tokens=config.max_num_batched_tokens)
        self.scheduler = Scheduler(batch, self.tokenizer, eos_ids, self.metrics, max_queue=config.max_queue,
                                   release=self.adapters.release, base_label=model_name)
        self.adapters.listen(self._adapter_event)
        self.adapters.load_pins()  # a pin that names nothing, or pins that fill the capacity: refused at start
        self._started = False
        constraints.GRAMMARS.configure(config.grammar_cache_bytes, config.grammar_cache_tenant_bytes)

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Calibrate (the model's first runs) and start the engine thread; again: nothing (the CLI starts the engine
        before the HTTP server, so that a model that cannot run is a one-line error, then the app's start-up)."""
        if self._started:
            return
        try:
            self.scheduler.batch.calibrate()  # run costs: the first steps are planned with the right budget
        except Exception as exc:  # onnxruntime's error: a model that cannot run, before any request
            raise ModelError(f"the model in {self.config.model} failed its start-up run: "
                             + " ".join(str(exc).split())) from None
        self.scheduler.start()
        self._started = True

    def drain(self) -> None:
        self.scheduler.drain()

    def stop(self, timeout: float | None = 30.0) -> bool:
        done = self.scheduler.shutdown(timeout)
        self.registry.close()
        return done

    def health(self) -> EngineHealth:
        s = self.scheduler
        return EngineHealth(ready=not s.draining, draining=s.draining, running=s.running_count,
                            waiting=s.waiting_count)

    def metrics_text(self) -> str:
        cache = self.registry.opened_cache()
        if cache is not None:
            self.metrics.adapter_disk_cache_bytes.set(cache.nbytes())
        return self.metrics.render()

    # -- work -------------------------------------------------------------------------------------------------------
    async def submit(self, work: Work, *, incremental: bool = True) -> Jobs:
        """One job per (prompt, choice) on the scheduler, each holding its adapter (loaded here, off the event
        loop, on first use). Events are sent as they come, `incremental` or not."""
        events = JobEvents()
        leases: list[Adapter | None] = []
        grammar = work.params[0].grammar if work.params else None
        held = None
        if grammar is not None:  # compiled off the engine thread (a hit when the API layer checked it here)
            held = await run_in_threadpool(constraints.hold, grammar, self.tokenizer, self.limits.eos_ids, work.tenant)
        try:
            for _ in work.params:
                leases.append(await run_in_threadpool(self.acquire, work.adapter, work.tenant))
            label = work.adapter.label if work.adapter is not None else None
            arrival = time.monotonic()
            jobs = Jobs([Job(index=i, prompt_ids=work.prompts[i // work.n], adapter=leases[i], adapter_name=label,
                             params=p, sink=events.sink, tenant=work.tenant, cache_namespace=work.cache_namespace,
                             arrival=arrival) for i, p in enumerate(work.params)], events)
            self.scheduler.submit(jobs)  # QueueFull -> 429, ShuttingDown -> 503
        except BaseException:
            for lease in leases:
                self.adapters.release(lease)
            if held is not None:
                held.release()
            raise
        if held is not None:  # the grammar stays compiled (and counted) while the request lives
            weakref.finalize(jobs, held.release)
        return jobs

    def acquire(self, choice: AdapterChoice | None, tenant: str = "") -> Adapter | None:
        """Hold the adapter (or scaled / combined choice) for one job of `tenant`, loaded on first use; None = the
        base model."""
        if choice is None:
            return None
        return self.adapters.acquire(choice.spec, scale=choice.scale, tenant=tenant)

    def _adapter_event(self, event: AdapterEvent) -> None:
        """(any thread, the adapters' lock held) Metrics; an unloaded version's cached tensors are dropped by the
        engine on its own thread."""
        m = self.metrics
        if isinstance(event, AdapterUsed):
            (m.adapter_cache_misses if event.cold else m.adapter_cache_hits).inc(tenant=event.tenant)
            return
        if isinstance(event, AdapterLoaded) and event.cause != "derived":
            m.adapter_loads.inc()
            m.adapter_load_seconds.observe(event.seconds)
        elif isinstance(event, AdapterUnloaded):
            m.adapter_evictions.inc(reason=event.reason)
            self.scheduler.forget_adapter(event.adapter)
        m.loaded_adapters.set(event.loaded)
        m.loaded_adapter_bytes.set(event.loaded_bytes)

    # -- adapters ---------------------------------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return self.adapters.names()  # from memory: the folder is scanned again only when it changed

    def has_adapter(self, name: str) -> bool:
        return name != self.limits.model_name and name in self.adapters

    def adapter_info(self, name: str) -> P.AdapterInfo:
        info = self.adapters.info(name)
        return P.AdapterInfo(name=info.name, loaded=info.loaded, path=info.path, url=info.url)

    def adapter_infos(self, names: list[str]) -> list[P.AdapterInfo]:
        return [P.AdapterInfo(name=i.name, loaded=i.loaded, path=i.path, url=i.url) for i in self.adapters.infos(names)]

    def register_adapter(self, name: str, path: str | None = None, url: str | None = None) -> None:
        if url is not None:
            self.adapters.register_url(name, url)
        else:
            self.adapters.register(name, path)

    def upload_adapter(self, name: str, stream: BinaryIO) -> None:
        self.adapters.upload(name, stream, self.config.max_upload_bytes)

    def remove_adapter(self, name: str) -> None:
        self.adapters.unregister(name)

    def loaded_adapters(self) -> list[str]:
        return self.adapters.loaded()
