"""The server's parts, wired: the runtime's engine, tokenizer and adapters (`ortlora.runtime.adapters.Adapters`,
the one owner of every adapter's life); tenants; metrics; the scheduler. `Server` is what the HTTP app
(`create_app`) talks to: it maps API names onto the adapters and nothing more.
"""

from __future__ import annotations

import time
from pathlib import Path

from ortlora import __version__
from dataclasses import dataclass

from ortlora.runtime.adapters import DEFAULT_MAX_RANK, Adapter, Adapters, AdapterSpec, Recipe
from ortlora.model_folder import ModelInfo
from ortlora.runtime.engine import Engine
from ortlora.runtime.batch import Batch
from ortlora.runtime.sampling import SamplingParams
from ortlora.runtime.tokenizer import Tokenizer
from ortlora.serve import jobs as jobs_
from ortlora.serve import protocol as P
from ortlora.serve.errors import APIError
from ortlora.serve.metrics import Metrics
from ortlora.runtime.scheduler import Scheduler
from ortlora.serve.tenants import Tenants

DEFAULT_MAX_LEN = 4096
MIN_TEMPERATURE = 1e-5


class Server:
    def __init__(self, model: str | Path, *, adapters: str | Path | None = None, tenants: Tenants | None = None,
                 max_batch: int = 16, max_loaded_adapters: int = 64, max_queue: int = 256,
                 max_model_len: int | None = None, model_name: str | None = None, threads: int | None = None,
                 max_body_bytes: int = 16 << 20, max_upload_bytes: int = 1 << 30, max_choices: int = 64,
                 prefill_chunk: int | None = None, provider: str | None = None,
                 max_num_batched_tokens: int | None = None, max_lora_rank: int = DEFAULT_MAX_RANK):
        problems = [f"{flag} must be at least 1, got {v}" for flag, v in (
            ("--max-batch", max_batch), ("--max-loaded-adapters", max_loaded_adapters), ("--max-queue", max_queue),
            ("--prefill-chunk", 1 if prefill_chunk is None else prefill_chunk),
            ("--max-num-batched-tokens", 1 if max_num_batched_tokens is None else max_num_batched_tokens),
            ("--max-lora-rank", max_lora_rank)) if v < 1]
        if problems:
            raise APIError(400, "; ".join(problems))  # a CLI error (OrtloraError) before anything is loaded
        self.version = __version__
        self.folder = Path(model)
        self.model_name = model_name or self.folder.resolve().name
        self.created = int(time.time())
        # KV cache: [slots, kv_heads, max_len, head_dim] per layer, reserved up front, touched as it fills
        max_len = max_model_len or min(DEFAULT_MAX_LEN, ModelInfo.read(model).context_length)
        self.engine = Engine(model, slots=max_batch, threads=threads, max_len=max_len, provider=provider)
        self.tokenizer = Tokenizer(model)
        self.eos_ids = frozenset(self.tokenizer.eos_ids) | frozenset(self.engine.info.eos_ids)
        self.context_length = self.engine.max_len
        self.max_token_chars = self.tokenizer.max_token_chars()  # prompts longer than context x this: refused untokenized
        self.vocab_size = self.engine.info.vocab_size
        self.max_body_bytes, self.max_upload_bytes, self.max_choices = max_body_bytes, max_upload_bytes, max_choices
        self.tenants = tenants or Tenants.open()
        self.metrics = Metrics(max_batch)
        self.adapters = Adapters.for_engine(self.engine, capacity=max_loaded_adapters, directory=adapters,
                                            reserved=(self.model_name,), max_rank=max_lora_rank)
        batch = Batch(self.engine, self.adapters, prefill_chunk=prefill_chunk,
                      max_num_batched_tokens=max_num_batched_tokens)
        self.scheduler = Scheduler(batch, self.tokenizer,
                                   self.eos_ids, self.metrics, max_queue=max_queue, release=self.adapters.release,
                                   base_label=self.model_name, cache_namespace=self.tenants.cache_namespace)
        self.adapters.on_unload(self._unloaded)

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.scheduler.batch.calibrate()  # run costs: the first steps are planned with the right budget
        self.scheduler.start()

    def stop(self, timeout: float | None = 30.0) -> bool:
        return self.scheduler.shutdown(timeout)

    # -- adapters: API names onto the runtime's Adapters --------------------------------------------------------
    def acquire(self, name: "str | AdapterChoice | None") -> Adapter | None:
        """Hold adapter `name` (or a scaled / combined choice) for one choice (loaded on first use); None = the
        base model."""
        if name is None:
            return None
        loads = self.adapters.loads
        choice = name if isinstance(name, AdapterChoice) else AdapterChoice(name)
        adapter = self.adapters.acquire(choice.spec, scale=choice.scale)
        if self.adapters.loads == loads:
            self.metrics.adapter_cache_hits.inc()
        else:
            self.metrics.adapter_loads.inc()
            self.metrics.loaded_adapters.set(len(self.adapters))
        return adapter

    def release(self, adapter: Adapter | None) -> None:
        self.adapters.release(adapter)

    def _unloaded(self, adapter: Adapter) -> None:
        """(any thread, the adapters' lock held) The engine drops its cached tensors on its own thread."""
        self.metrics.adapter_evictions.inc()
        self.metrics.loaded_adapters.set(len(self.adapters))
        self.scheduler.forget_adapter(adapter)

    def adapter_names(self) -> list[str]:
        self.adapters.refresh()  # files dropped into the folder since: listed too
        return self.adapters.names()

    def has_adapter(self, name: str) -> bool:
        return name != self.model_name and name in self.adapters

    def add_adapter_path(self, name: str, path: str) -> None:
        self.adapters.register(name, path)

    def add_adapter_upload(self, name: str, stream) -> None:
        self.adapters.upload(name, stream, self.max_upload_bytes)

    def remove_adapter(self, name: str) -> None:
        self.adapters.unregister(name)

    def adapter_info(self, name: str) -> P.AdapterInfo:
        info = self.adapters.info(name)
        return P.AdapterInfo(name=info.name, loaded=info.loaded, path=info.path)

    # -- requests -----------------------------------------------------------------------------------------------
    async def start_jobs(self, adapter: str | None, prompts: list[list[int]], n: int, params: list[SamplingParams],
                         tenant: str):
        """The engine client's one call (see ortlora.serve.jobs.submit): jobs on this process's scheduler."""
        return await jobs_.start(self, adapter, prompts, n, params, tenant)

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
            logit_bias=self._logit_bias(body.logit_bias), logprobs=body.logprobs_k(), grammar=body._grammar,
            prompt_logprobs=_prompt_logprobs(body))

    def _logit_bias(self, bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
        out = tuple((int(k), float(v)) for k, v in (bias or {}).items())
        bad = [t for t, _ in out if t >= self.vocab_size]
        if bad:
            raise APIError(400, f"logit_bias token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})",
                           param="logit_bias")
        return out


def _prompt_logprobs(body) -> int | None:
    """vLLM's `prompt_logprobs`, or for completions' `echo` with `logprobs` that many alternatives (the more of
    both when both are asked)."""
    asked = [k for k in (body.prompt_logprobs, body.logprobs if getattr(body, "echo", False) else None)
             if k is not None]
    return max(asked) if asked else None


@dataclass(frozen=True)
class AdapterChoice:
    """What one request asks for: an adapter name or {name: weight}, at `scale` (resolved by the app)."""
    spec: AdapterSpec
    scale: float = 1.0

    @property
    def label(self) -> str | None:
        """Its name in metrics and messages: the adapters' names (`a1`, `a1+a2`), without the weights, so that
        clients choosing scales cannot grow the metrics' label sets without bound."""
        recipe = Recipe.of(self.spec, self.scale)
        return None if recipe is None else "+".join(name for name, _ in recipe.parts)


def adapter_label(adapter: "str | AdapterChoice | None") -> str | None:
    return adapter.label if isinstance(adapter, AdapterChoice) else adapter
