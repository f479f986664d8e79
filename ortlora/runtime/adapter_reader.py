"""`AdapterReader`: an adapter on local disk -> weights a model can run, or AdapterInvalid saying why not.

    path (.onnx_adapter, or a PEFT folder: converted once, cached) ─> read into one private copy ─> parsed ─>
    fits the model's LoRA inputs ─> finite ─> the model's probe step on them is finite ─> weights

A derived adapter (a weighted combination or scale of loaded ones, `combine`) passes the same checks, its summed
rank first.

Every refusal names the adapter by `label` (default: `adapter 'NAME'`), never a server path: the file's path and the
hidden roots (the adapters folder, the cache folder) are replaced in the message.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ortlora import naming
from ortlora.adapters.cached import convert_cached
from ortlora.adapters.merge import check_finite, combine
from ortlora.adapters.onnx_adapter import open_onnx_adapter
from ortlora.adapters.validate import LoraInput, model_feeds
from ortlora.errors import AdapterError, AdapterInvalid
from ortlora.runtime.adapter_dir import CACHE

Weights = dict[str, np.ndarray]  # graph input name -> array in the model's dtype: A [in, r], B [r, out], DoRA [out]


# rank 64 covers the ranks adapters are trained with (8-64) while the LoRA path stays a few % of a step and a pool
# slot's memory bounded (benchmarks/NOTES.md#isolation)
DEFAULT_MAX_RANK = 64


class AdapterReader:
    """`probe(weights) -> logits` runs one short input through the model with an adapter's tensors (None: no
    probe). `hidden`: {root: placeholder} paths that messages must not show."""

    def __init__(self, lora_inputs: Mapping[str, LoraInput],
                 probe: Callable[[Weights], np.ndarray] | None = None, hidden: Mapping[Path, str] | None = None,
                 max_rank: int | None = DEFAULT_MAX_RANK):
        if max_rank is not None and max_rank < 1:
            raise AdapterError(f"the maximum LoRA rank must be at least 1, got {max_rank}")
        self.lora_inputs = dict(lora_inputs)
        self.probe = probe
        self.hidden = dict(hidden or {})
        self.max_rank = max_rank
        self._reading = threading.Lock()
        # bytes no adapter within max_rank can exceed: every LoRA input at the maximum rank in float64, twice over,
        # and 1 MiB for names and tables (no bound without a maximum rank)
        self._largest_file = float("inf") if max_rank is None else 2 * 8 * sum(
            math.prod(d if isinstance(d, int) else max_rank for d in li.shape) for li in self.lora_inputs.values()
        ) + (1 << 20)

    def read(self, path: Path, name: str, label: str | None = None, peft_cache: Path | None = None,
             probe: bool = True) -> Weights:
        """The checked weights of `path` (PEFT folders' conversions kept in `peft_cache`, default beside it);
        `probe` False: content that passed the probe step before (the same version loaded again) skips it.

        One file is read and checked at a time, whatever the threads asking: concurrent reads on a few cores
        contend with the engine's thread for the CPU and the interpreter lock, so each read and every step between
        them would take longer (benchmarks/NOTES.md#adapter-loads)."""
        label = label or f"adapter {name!r}"
        try:
            if path.is_dir():  # a PEFT folder: converted once, checked against the model, cached
                path = convert_cached(path, self.lora_inputs, peft_cache or path.parent / CACHE)
            with self._reading:
                size = _size(path)
                if size > self._largest_file:  # said from its metadata, never read into memory
                    check_rank(ranks(model_feeds(open_onnx_adapter(path).params, self.lora_inputs, label)),
                               self.max_rank, label)
                    raise AdapterInvalid(f"{label} is {size} bytes, more than any adapter this server takes for "
                                         f"this model can be (rank <= {self.max_rank})")
                # a private copy read in one call: a rewrite of the file cannot reach a running request
                params = open_onnx_adapter(path, private=True).params
                feeds = model_feeds(params, self.lora_inputs, label)
                check_rank(ranks(feeds), self.max_rank, label)
                del params
                check_finite(feeds, label)
        except AdapterInvalid:
            raise  # says `label`, never a path
        except AdapterError as exc:
            message = str(exc).replace(str(path), label)
            for root, placeholder in self.hidden.items():
                message = message.replace(str(root), placeholder)
            raise AdapterInvalid(message) from None
        if probe:
            self._probe(feeds, label)
        return feeds

    def _probe(self, feeds: Weights, label: str) -> None:
        """Refuse weights that make the probe step's logits NaN or infinite."""
        if self.probe is not None and feeds and not np.isfinite(self.probe(feeds)).all():
            raise AdapterInvalid(overflow_refusal(label))

    def combine(self, parts: Sequence, weights: Sequence[float], label: str,
                base: Callable[[str], np.ndarray] | None) -> Weights:
        """The checked weights of a derived adapter (`label`): loaded adapters `parts` (their `name`, `shapes` and
        `params`) combined exactly with `weights` (ortlora.adapters.merge.combine). Its rank per module is the sum
        of its parts', checked against `max_rank` from their shapes before any weight is read or combined; the
        result is checked finite and probed like a file."""
        combined: dict[str, int] = {}
        for part, w in zip(parts, weights):
            for module, r in (ranks(part.shapes) if w else {}).items():
                combined[module] = combined.get(module, 0) + r
        check_rank(combined, self.max_rank, f"adapter {label!r}")
        try:
            params = combine([p.params for p in parts], list(weights), [f"adapter {p.name!r}" for p in parts], base)
        except AdapterError as exc:
            raise AdapterInvalid(str(exc)) from None
        check_finite(params, f"adapter {label!r}")
        self._probe(params, f"adapter {label!r}")
        return params


def _size(path: Path) -> int:
    """The file's size; 0 where it cannot be read (opening it then says why)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def overflow_refusal(label: str) -> str:
    """Why an adapter whose weights make the model's logits NaN or infinite is refused (by the probe step, or by a
    request's first step)."""
    return f"{label} makes the model's logits NaN or infinite (its weights are too large for this model): refused"


def lazy_base(folder: Path) -> Callable[[str], np.ndarray]:
    """The model's base weights, read only when a scaled DoRA adapter first needs them."""
    held: list = []

    def weight(module: str) -> np.ndarray:
        if not held:
            from ortlora.adapters.base_weights import BaseWeights

            held.append(BaseWeights(folder))
        return held[0](module)

    return weight


def ranks(shapes: Mapping[str, object]) -> dict[str, int]:
    """Module -> rank of an adapter's tensors (or their shapes): the width of each A [in, r]."""
    out = {}
    for name, value in shapes.items():
        if naming.is_lora_a(name):
            shape = getattr(value, "shape", value)
            out[naming.parse_input_name(name)[0]] = int(shape[1])
    return out


def check_rank(module_ranks: Mapping[str, int], max_rank: int | None, label: str) -> None:
    """Refuse ranks (per module) above `max_rank` (vLLM's --max-lora-rank): every row of a batch pays for the
    pool's rank, and the pool's memory is slots x rank."""
    if max_rank is None or not module_ranks:
        return
    module, rank = max(module_ranks.items(), key=lambda kv: kv[1])
    if rank > max_rank:
        raise AdapterInvalid(f"{label} has rank {rank} ({module}), above this server's limit of {max_rank} "
                             "(--max-lora-rank); a combination's rank is the sum of its parts'")
