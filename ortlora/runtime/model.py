"""`ortlora.Model`: one exported folder, many adapters, streaming generation.

    model = ortlora.Model("out")
    model.adapters.load("a1.onnx_adapter", name="a1")
    for chunk in model.stream("Hello", adapter="a1", max_new_tokens=64, temperature=0.7):
        print(chunk.text, end="")
    texts = model.generate(["p1", "p2"], adapter=["a1", None])   # one batch, one adapter per row
    model.generate("p", adapter="a1", adapter_scale=0.5)           # a1 at half strength
    model.generate("p", adapter={"a1": 0.7, "a2": 0.3})            # an exact weighted combination
    model.adapters.unload("a1")
"""

from __future__ import annotations

import numbers
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterator, Sequence

from ortlora.errors import OrtloraError
from ortlora.runtime.adapters import Adapter, Adapters, AdapterSpec
from ortlora.runtime.engine import PREFIX_CACHE_BYTES, Engine
from ortlora.runtime.generation import Batch, Chunk, Completion, Request, SlotLease, run_to_end
from ortlora.runtime.sampling import SamplingParams
from ortlora.runtime.tokenizer import Tokenizer

Prompt = str | Sequence[int]


class Model:
    def __init__(self, folder: str | Path, *, slots: int = 4, max_len: int | None = None, threads: int | None = None,
                 adapter_capacity: int | None = None, provider: str | None = None,
                 prefix_cache_bytes: int = PREFIX_CACHE_BYTES):
        """`slots`: rows decoded together (KV cache slots); `max_len`: tokens per slot (default: the model's
        context length; memory is only touched as it fills); `threads`: default genai_config.json's
        intra_op_num_threads, else every core; `provider`: the execution provider, default genai_config.json's;
        `prefix_cache_bytes`: KV of prompt prefixes kept for reuse per adapter (0: none; see prefix_cache.py)."""
        self.folder = Path(folder)
        self.engine = Engine(folder, slots=slots, max_len=max_len, threads=threads, provider=provider,
                             prefix_cache_bytes=prefix_cache_bytes)
        self.tokenizer = Tokenizer(folder)
        self.adapters = Adapters.for_engine(self.engine, capacity=adapter_capacity)
        self._forgotten: deque[Adapter] = deque()  # let go by the adapters: the engine drops them between steps
        self.adapters.on_unload(self._forgotten.append)
        self.eos_ids = frozenset(self.tokenizer.eos_ids) | frozenset(self.engine.info.eos_ids)
        self._lock = threading.RLock()  # the engine runs one step at a time

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

    def _request(self, prompt, messages, adapter: AdapterSpec, params: SamplingParams,
                 lease: SlotLease | None = None, adapter_scale: float = 1.0) -> Request:
        ids = self.encode(prompt, messages)
        held = self.adapters.acquire(adapter, scale=adapter_scale)
        return Request(ids, params, self.tokenizer, held, eos_ids=self.eos_ids, lease=lease)

    def reserve_slot(self) -> SlotLease:
        """A KV slot for a conversation: `stream(..., lease=it)` prefills only what a prompt adds to the previous
        prompt + output. Give it back with `release_slot`."""
        with self._lock:
            return SlotLease(self.engine.acquire_slot())

    def release_slot(self, lease: SlotLease) -> None:
        with self._lock:
            self.engine.release_slot(lease.slot)
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
        request = self._request(prompt, messages, adapter, self._params(params, sampling), lease, adapter_scale)
        return self._stream(request)

    def _batch(self) -> Batch:
        return Batch(self.engine, self.adapters)

    def _step(self, batch: Batch) -> list:
        with self._lock:
            while self._forgotten:
                self.engine.forget_adapter(self._forgotten.popleft())
            return batch.step()

    def _stream(self, request: Request) -> Iterator[Chunk]:
        batch = self._batch()
        batch.add(request)
        try:
            while batch:
                events = self._step(batch)
                if not events:  # every slot is taken by other generations: wait for one to finish
                    time.sleep(0.002)
                for _, chunk in events:
                    if chunk.error is not None:
                        raise chunk.error
                    yield chunk
        finally:
            with self._lock:
                batch.cancel(request)

    def complete(self, prompts: Prompt | Sequence[Prompt], adapter: AdapterSpec | Sequence[AdapterSpec] = None, *,
                 params: SamplingParams | None = None, adapter_scale: float | Sequence[float] = 1.0,
                 **sampling) -> list[Completion]:
        """Generate for every prompt in one batch (each row with its own adapter and scale, see `stream`);
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
        requests = []
        try:
            for p, a, scale in zip(prompts, adapters, scales):
                requests.append(self._request(p, None, a, sp, adapter_scale=scale))
            with self._lock:
                return run_to_end(self._batch(), requests, step=self._step)
        finally:
            for r in requests:  # a failure part-way must not leave adapters held
                if not r.released:
                    self.adapters.release(r.adapter)
                    r.released = True

    def generate(self, prompts: Prompt | Sequence[Prompt], adapter: AdapterSpec | Sequence[AdapterSpec] = None, *,
                 params: SamplingParams | None = None, adapter_scale: float | Sequence[float] = 1.0,
                 **sampling) -> str | list[str]:
        """The generated texts: one string for one text prompt, else a list."""
        results = self.complete(prompts, adapter, params=params, adapter_scale=adapter_scale, **sampling)
        single = isinstance(prompts, str) or _is_ids(prompts)
        return results[0].text if single else [r.text for r in results]


def _is_ids(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(t, numbers.Integral) for t in prompt)
