"""The server's parts, wired: the runtime's engine, tokenizer and adapter store; the adapter registry; tenants;
metrics; the scheduler. `Server` is what the HTTP app (`create_app`) talks to.

Adapters are loaded on first use (memory-mapped, through the runtime's AdapterStore, an LRU of
`--max-loaded-adapters`). Each HTTP choice holds its adapter until it ends; unloading an adapter that running
requests hold (DELETE, or a replacement under the same name) only takes it out of the registry at once, and
the store lets it go when the last of them ends.
"""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

from ortlora import __version__
from ortlora.errors import AdapterError
from ortlora.runtime.adapter_store import Adapter, AdapterStore
from ortlora.runtime.engine import Engine
from ortlora.runtime.generation import Batch
from ortlora.runtime.sampling import SamplingParams
from ortlora.runtime.tokenizer import Tokenizer
from ortlora.serve import protocol as P
from ortlora.serve.errors import APIError
from ortlora.serve.metrics import Metrics
from ortlora.serve.registry import AdapterRegistry
from ortlora.serve.scheduler import Scheduler
from ortlora.serve.tenants import Tenants

DEFAULT_MAX_LEN = 4096
MIN_TEMPERATURE = 1e-5  # KV cache per slot: [slots, kv_heads, max_len, head_dim] per layer, allocated up front


class Server:
    def __init__(self, model: str | Path, *, adapters: str | Path | None = None, tenants: Tenants | None = None,
                 max_batch: int = 16, max_loaded_adapters: int = 64, max_queue: int = 256,
                 max_model_len: int | None = None, model_name: str | None = None, threads: int | None = None,
                 max_body_bytes: int = 16 << 20, max_upload_bytes: int = 1 << 30, max_choices: int = 64):
        problems = [f"{flag} must be at least 1, got {v}" for flag, v in (
            ("--max-batch", max_batch), ("--max-loaded-adapters", max_loaded_adapters), ("--max-queue", max_queue))
            if v < 1]
        if problems:
            raise APIError(400, "; ".join(problems))  # a CLI error (OrtloraError) before anything is loaded
        self.version = __version__
        self.folder = Path(model)
        self.model_name = model_name or self.folder.resolve().name
        self.created = int(time.time())
        self.engine = Engine(model, slots=max_batch, threads=threads,
                             max_len=max_model_len or min(DEFAULT_MAX_LEN, _context(model)))
        self.tokenizer = Tokenizer(model)
        self.eos_ids = frozenset(self.tokenizer.eos_ids) | frozenset(self.engine.info.eos_ids)
        self.context_length = self.engine.max_len
        self.vocab_size = self.engine.info.vocab_size
        self.max_body_bytes, self.max_upload_bytes, self.max_choices = max_body_bytes, max_upload_bytes, max_choices
        self.tenants = tenants or Tenants.open()
        self.metrics = Metrics(max_batch)
        self.registry = AdapterRegistry(adapters, self.engine.lora_inputs or None, reserved=(self.model_name,))
        self.store = AdapterStore(self.engine.lora_inputs, capacity=max_loaded_adapters)
        self.store.on_unload(self._unloaded)
        self.scheduler = Scheduler(Batch(self.engine, self), self.tokenizer, self.eos_ids, self.metrics,
                                   max_queue=max_queue, release=self.release, base_label=self.model_name)
        self._lock = threading.RLock()
        self._keys: dict[str, str] = {}  # registered name -> store key (a new key for each registration)
        self._versions = itertools.count(1)
        self._pending: set[str] = set()  # store keys to unload when their last holder releases them

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        # the mixed-adapter session takes seconds to build: at start-up, not in the first mixed batch
        build = getattr(self.engine, "build_mixed", None)  # when the runtime offers it
        if build is not None and self.engine.lora_inputs:
            build()
        self.scheduler.start()

    def stop(self, timeout: float | None = 30.0) -> bool:
        return self.scheduler.shutdown(timeout)

    # -- adapters -----------------------------------------------------------------------------------------------
    def _key(self, name: str) -> str:
        if name not in self._keys:
            self._keys[name] = f"{name}@{next(self._versions)}"
        return self._keys[name]

    def acquire(self, name: str | None) -> Adapter | None:
        """Hold adapter `name` for one choice (loading it on first use); None = the base model."""
        if name is None:
            return None
        with self._lock:
            key = self._key(name)
            if key in self.store:
                self.metrics.adapter_cache_hits.inc()
                return self.store.acquire(key)
            path = self.registry.path(name)
            try:
                self.store.load(path, key, checked=self.registry.take_checked(name))
            except AdapterError as exc:
                if "are in use" in str(exc):  # every loaded adapter is held by a running request
                    raise APIError(429, f"cannot load adapter {name!r} now: {exc}") from None
                raise
            self.metrics.adapter_loads.inc()
            self.metrics.loaded_adapters.set(len(self.store))
            return self.store.acquire(key)

    def release(self, adapter: Adapter | None) -> None:
        """A choice ended (engine thread, or the HTTP side if it never ran). The Batch calls this too."""
        if adapter is None:
            return
        with self._lock:
            self.store.release(adapter)
            if adapter.name in self._pending and adapter.refs == 0:
                self._pending.discard(adapter.name)
                if adapter.name in self.store:
                    self.store.unload(adapter.name)

    def _unloaded(self, adapter: Adapter) -> None:
        self.metrics.adapter_evictions.inc()
        self.metrics.loaded_adapters.set(len(self.store))
        self.scheduler.forget_adapter(adapter)  # the engine drops its cached tensors on its own thread

    def add_adapter_path(self, name: str, path: str) -> None:
        with self._lock:
            self.registry.add_path(name, path)
            self._retire(name)
            self._preload(name)

    def add_adapter_upload(self, name: str, stream) -> None:
        with self._lock:
            self.registry.add_upload(name, stream, self.max_upload_bytes)
            self._retire(name)
            self._preload(name)

    def _preload(self, name: str) -> None:
        try:
            self.release(self.acquire(name))
        except APIError:  # the store is full of running adapters: it loads on first use instead
            pass
        finally:  # what registration parsed is for this load only: never left for a later file of that name
            self.registry.take_checked(name)

    def remove_adapter(self, name: str) -> None:
        with self._lock:
            self.registry.remove(name)
            self._retire(name)

    def _retire(self, name: str) -> None:
        """Forget the store key of `name`; unload it now, or when the requests holding it end."""
        key = self._keys.pop(name, None)
        if key is None or key not in self.store:
            return
        if self.store.get(key).refs:
            self._pending.add(key)
        else:
            self.store.unload(key)

    def adapter_info(self, name: str) -> P.AdapterInfo:
        with self._lock:
            path = self.registry.path(name)
            key = self._keys.get(name)
            loaded = key is not None and key in self.store
        root = self.registry.root
        return P.AdapterInfo(name=name, loaded=loaded, path=str(path.relative_to(root)) if root else None)

    # -- requests -----------------------------------------------------------------------------------------------
    def sampling_params(self, body, max_new_tokens: int, seed: int | None) -> SamplingParams:
        temperature = 1.0 if body.temperature is None else body.temperature
        if temperature < MIN_TEMPERATURE:  # logits / 1e-300 overflow: a temperature this low is greedy anyway
            temperature = 0.0
        return SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature,
            top_k=max(body.top_k, 0), top_p=1.0 if body.top_p is None else body.top_p, min_p=body.min_p,
            repetition_penalty=body.repetition_penalty, seed=seed, stop=tuple(body.stop_list()),
            ignore_eos=body.ignore_eos, min_new_tokens=min(body.min_tokens, max_new_tokens),
            stop_token_ids=tuple(body.stop_token_ids or ()),
            presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
            logit_bias=self._logit_bias(body.logit_bias), logprobs=body.logprobs_k(), grammar=body._grammar)

    def _logit_bias(self, bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
        out = tuple((int(k), float(v)) for k, v in (bias or {}).items())
        bad = [t for t, _ in out if t >= self.vocab_size]
        if bad:
            raise APIError(400, f"logit_bias token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})",
                           param="logit_bias")
        return out


def _context(model: str | Path) -> int:
    from ortlora.runtime.engine import ModelInfo

    return ModelInfo.read(model).context_length
