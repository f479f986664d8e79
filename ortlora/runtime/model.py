"""`ortlora.Model`: one exported folder, many adapters, streaming generation.

    model = ortlora.Model("out")
    model.adapters.load("a1.onnx_adapter", name="a1")
    for chunk in model.stream("Hello", adapter="a1", max_new_tokens=64, temperature=0.7):
        print(chunk.text, end="")
    texts = model.generate(["p1", "p2"], adapter=["a1", None])   # one batch, one adapter per row
    model.generate("p", adapter="a1", adapter_scale=0.5)           # a1 at half strength
    model.generate("p", adapter={"a1": 0.7, "a2": 0.3})            # an exact weighted combination
    model.adapters.unload("a1")

One engine thread (ortlora.runtime.scheduler) runs every generation of a Model: calls from several threads share
its decode steps and its step budget, as a server's requests do.
"""

from __future__ import annotations

import numbers
import queue
import threading
import weakref
from pathlib import Path
from typing import Any, Iterator, Sequence

from ortlora.errors import GenerationError, OrtloraError
from ortlora.runtime.adapters import DEFAULT_MAX_RANK, Adapters, AdapterSpec
from ortlora.runtime.batch import Batch
from ortlora.runtime.engine import PREFIX_CACHE_BYTES, Engine
from ortlora.runtime.request import Chunk, Completion, SlotLease
from ortlora.runtime.sampling import SamplingParams
from ortlora.runtime.scheduler import Event, Job, Scheduler
from ortlora.runtime.tokenizer import Tokenizer

MAX_QUEUE = 1 << 16  # generations waiting for a slot (one caller: no tenant to hold back)

Prompt = str | Sequence[int]


class Model:
    def __init__(self, folder: str | Path, *, slots: int = 4, max_len: int | None = None, threads: int | None = None,
                 adapter_capacity: int | None = None, provider: str | None = None,
                 prefix_cache_bytes: int = PREFIX_CACHE_BYTES, max_num_batched_tokens: int | None = None,
                 prefill_chunk: int | None = None, max_lora_rank: int = DEFAULT_MAX_RANK, unified_steps: bool = False):
        """`slots`: rows decoded together (KV cache slots); `max_len`: tokens per slot (default: the model's
        context length; memory is only touched as it fills); `threads`: default genai_config.json's
        intra_op_num_threads, else every core; `provider`: the execution provider, default genai_config.json's;
        `prefix_cache_bytes`: KV of prompt prefixes kept for reuse per adapter (0: none; see prefix_cache.py);
        `max_num_batched_tokens` / `prefill_chunk`: prompt tokens a step with nothing / something decoding (default:
        from measured costs, see budget.py); `max_lora_rank`: adapters (and combinations) above it are refused;
        `unified_steps`: a step's prompt run shares the decode rows' run (see Engine)."""
        self.folder = Path(folder)
        self.engine = Engine(folder, slots=slots, max_len=max_len, threads=threads, provider=provider,
                             prefix_cache_bytes=prefix_cache_bytes, unified_steps=unified_steps)
        self.tokenizer = Tokenizer(folder)
        self.adapters = Adapters.for_engine(self.engine, capacity=adapter_capacity, max_rank=max_lora_rank)
        eos_ids = frozenset(self.tokenizer.eos_ids) | frozenset(self.engine.info.eos_ids)
        self.batch = Batch(self.engine, self.adapters, prefill_chunk=prefill_chunk,
                           max_num_batched_tokens=max_num_batched_tokens)
        self.scheduler = Scheduler(self.batch, self.tokenizer, eos_ids, max_queue=MAX_QUEUE,
                                   release=self.adapters.release, cache_namespace=lambda tenant: None)
        self.adapters.on_unload(self.scheduler.forget_adapter)  # dropped by the engine thread between steps
        self._started = False
        self._start_lock = threading.Lock()
        # the engine thread holds the scheduler, not the model: a model let go stops its thread
        self._finalizer = weakref.finalize(self, self.scheduler.shutdown, 0)

    def _engine(self) -> Scheduler:
        """The engine thread, started (after measuring run costs for the step budget) on first use."""
        with self._start_lock:
            if not self._started:
                self.batch.calibrate()
                self.scheduler.start()
                self._started = True
        return self.scheduler

    def close(self) -> None:
        """Stop the engine thread (running generations end with an error)."""
        self._finalizer()

    @property
    def eos_ids(self) -> frozenset[int]:
        """The ids that end a generation (the tokenizer's and genai_config.json's)."""
        return self.scheduler.eos_ids

    @eos_ids.setter
    def eos_ids(self, ids) -> None:
        self.scheduler.eos_ids = frozenset(ids)

    @property
    def max_len(self) -> int:
        return self.engine.max_len

    # -- prompts ------------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kw) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kw)

    def encode(self, prompt: Prompt | None = None, messages: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of a prompt: text (special tokens added as the tokenizer defines), ids as given, or chat
        `messages` rendered with the model's chat template."""
        if (prompt is None) == (messages is None):
            raise OrtloraError("give either a prompt or chat messages")
        if messages is not None:
            ids = self.tokenizer.encode(self.apply_chat_template(messages), add_special_tokens=False)
        elif isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise OrtloraError("the prompt is empty (it encodes to no tokens)")
        if len(ids) >= self.max_len:
            raise OrtloraError(f"the prompt is {len(ids)} tokens long but the context holds {self.max_len} "
                               "(prompt + at least one new token); shorten the prompt or raise max_len up to the "
                               f"model's context_length {self.engine.info.context_length}")
        bad = [t for t in ids if not 0 <= t < self.engine.info.vocab_size]
        if bad:
            raise OrtloraError(f"token ids {bad[:5]} are outside the vocabulary (0..{self.engine.info.vocab_size - 1})")
        return ids

    def _job(self, prompt, messages, adapter: AdapterSpec, params: SamplingParams, sink, index: int = 0,
             lease: SlotLease | None = None, adapter_scale: float = 1.0) -> Job:
        ids = self.encode(prompt, messages)
        held = self.adapters.acquire(adapter, scale=adapter_scale)
        return Job(index, ids, held, held.name if held is not None else None, params, sink, lease=lease)

    def reserve_slot(self) -> SlotLease:
        """A KV slot for a conversation: `stream(..., lease=it)` prefills only what a prompt adds to the previous
        prompt + output. Give it back with `release_slot`."""
        return SlotLease(self._engine().call(self.engine.acquire_slot).result())

    def release_slot(self, lease: SlotLease) -> None:
        self._engine().call(lambda: self.engine.release_slot(lease.slot)).result()
        lease.ids = []

    @staticmethod
    def _params(params: SamplingParams | None, kwargs: dict) -> SamplingParams:
        if params is not None and kwargs:
            raise OrtloraError("pass either params=SamplingParams(...) or sampling keywords, not both")
        if "stop" in kwargs and isinstance(kwargs["stop"], str):
            kwargs["stop"] = (kwargs["stop"],)
        elif "stop" in kwargs:
            kwargs["stop"] = tuple(kwargs["stop"] or ())
        try:
            return params or SamplingParams(**kwargs)
        except TypeError as exc:
            raise OrtloraError(f"unknown sampling setting: {exc}") from None

    # -- generation -----------------------------------------------------------------------------------------
    def stream(self, prompt: Prompt | None = None, adapter: AdapterSpec = None, *,
               messages: list[dict[str, Any]] | None = None, params: SamplingParams | None = None,
               lease: SlotLease | None = None, adapter_scale: float = 1.0, **sampling) -> Iterator[Chunk]:
        """Yield the output as it is generated; the last chunk has `finish_reason` set. The adapter is held (an
        unload waits or fails) until the generator finishes or is closed. With a `lease` (see `reserve_slot`)
        the cached prefix of the conversation is reused. `adapter`: a name, {name: weight} (an exact weighted
        combination) or None; `adapter_scale` multiplies its strength (0: the base model)."""
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        job = self._job(prompt, messages, adapter, self._params(params, sampling), events.put, lease=lease,
                        adapter_scale=adapter_scale)
        return self._stream(job, events)

    def _stream(self, job: Job, events: "queue.SimpleQueue[Event]") -> Iterator[Chunk]:
        try:
            self._engine().submit([job])
        except BaseException:
            self.adapters.release(job.adapter)
            raise
        try:
            while True:
                ev = events.get()
                if ev.error is not None:
                    raise ev.error
                yield _chunk(ev)
                if ev.finish_reason is not None:
                    return
        finally:  # a generator closed early: its slot and adapter are given back before this returns
            self.scheduler.cancel(job)

    def complete(self, prompts: Prompt | Sequence[Prompt], adapter: AdapterSpec | Sequence[AdapterSpec] = None, *,
                 params: SamplingParams | None = None, adapter_scale: float | Sequence[float] = 1.0,
                 **sampling) -> list[Completion]:
        """Generate for every prompt (each row with its own adapter and scale, see `stream`), all queued at once;
        returns one Completion each."""
        prompts = [prompts] if isinstance(prompts, str) or _is_ids(prompts) else list(prompts)
        adapters = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * len(prompts)
        if len(adapters) != len(prompts):
            raise OrtloraError(f"{len(prompts)} prompts but {len(adapters)} adapters: give one adapter (or None) "
                               "per prompt, or a single name for all")
        scales = list(adapter_scale) if isinstance(adapter_scale, (list, tuple)) else [adapter_scale] * len(prompts)
        if len(scales) != len(prompts):
            raise OrtloraError(f"{len(prompts)} prompts but {len(scales)} adapter scales")
        sp = self._params(params, sampling)
        names = {n for a in adapters if a is not None for n in ([a] if isinstance(a, str) else a)}
        unknown = sorted(n for n in names if isinstance(n, str) and n not in self.adapters)
        if unknown:
            self.adapters.get(unknown[0])  # raises, naming the loaded ones
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        jobs: list[Job] = []
        try:
            for i, (p, a, scale) in enumerate(zip(prompts, adapters, scales)):
                jobs.append(self._job(p, None, a, sp, events.put, index=i, adapter_scale=scale))
            self._engine().submit(jobs)
        except BaseException:
            for job in jobs:  # a failure part-way must not leave adapters held
                self.adapters.release(job.adapter)
            raise
        try:
            left = len(jobs)
            while left:
                ev = events.get()
                if ev.error is not None:
                    raise GenerationError(f"prompt {ev.index}: {ev.error}" if len(jobs) > 1 else str(ev.error))
                left -= ev.finish_reason is not None
        finally:
            for job in jobs:
                self.scheduler.cancel(job)
        return [job.request.completion() for job in jobs]

    def generate(self, prompts: Prompt | Sequence[Prompt], adapter: AdapterSpec | Sequence[AdapterSpec] = None, *,
                 params: SamplingParams | None = None, adapter_scale: float | Sequence[float] = 1.0,
                 **sampling) -> str | list[str]:
        """The generated texts: one string for one text prompt, else a list."""
        results = self.complete(prompts, adapter, params=params, adapter_scale=adapter_scale, **sampling)
        single = isinstance(prompts, str) or _is_ids(prompts)
        return results[0].text if single else [r.text for r in results]


def _chunk(ev: Event) -> Chunk:
    return Chunk(ev.text, ev.token_ids, ev.finish_reason, ev.error, ev.logprobs, ev.prompt_logprobs)


def _is_ids(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(t, numbers.Integral) for t in prompt)
