"""What the engine keeps bound between runs: IOBindings per (slot range, adapters), their keys, decode's persistent
inputs, and how a run meets the adapter pool. Creating a binding and its OrtValues costs more than a decode step's
bookkeeping, so they are made once and reused (benchmarks/NOTES.md#engine-step-costs)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
import onnxruntime as ort


def ort_value(arr: np.ndarray) -> ort.OrtValue:
    return ort.OrtValue.ortvalue_from_numpy(arr)


class PoolKey(NamedTuple):
    """The adapter pool as bound by one run: its buffers' generation and per module class None (nothing bound:
    rank-0 defaults) or (first, count, only): the slots [first, first + count) and the uid of the one adapter whose
    modules of the class alone are bound (0: every input of the class)."""
    generation: int
    runs: tuple[tuple[int, int, int] | None, ...]

    @property
    def only(self) -> set[int]:
        return {b[2] for b in self.runs if b is not None and b[2]}


class BindingKey(NamedTuple):
    lo: int  # slots [lo, hi) bound
    hi: int
    last_only: bool  # decode: one position per row, into a persistent output buffer
    lora: int | PoolKey  # 0: no adapter; else the pool slots (and inputs) the run binds
    prompt: bool = False  # a unified step's: its prompt group's inputs are bound too (engine.Engine.step)


@dataclass
class Binding:
    """An IOBinding kept between runs and the values it holds (they must live as long as it does)."""
    io: ort.IOBinding
    kv: list[ort.OrtValue]  # views of the cache, bound as past and present
    logits: np.ndarray | None  # [hi - lo, 1, vocab], bound as output when last_only
    lora: list[tuple[str, ort.OrtValue]]
    keep: ort.OrtValue | None = None  # decode's num_logits_to_keep = 1 or logits_rows = [0, hi - lo)
    inputs: tuple[ort.OrtValue, ort.OrtValue] | None = None  # decode's persistent input_ids / attention_mask
    groups: dict[str, tuple[np.ndarray, ort.OrtValue]] = field(default_factory=dict)  # the row grouping bound
    prompt_lora: object = None  # a unified step's: the pool range its prompt group's LoRA inputs are bound to
    prompt_held: list = field(default_factory=list)  # and the values bound there


@dataclass
class DecodeInputs:
    """input_ids [hi, 1] and attention_mask [hi, max_len] kept between decode steps, with each mask row's count
    of ones. A mask as wide as the cache gives every step the same shapes, so onnxruntime reuses its memory plan;
    GroupQueryAttention reads each row's length from the mask's ones."""
    ids: np.ndarray
    mask: np.ndarray
    ones: np.ndarray
    values: tuple[ort.OrtValue, ort.OrtValue]  # made once (~20 us each a step otherwise)

    @classmethod
    def make(cls, hi: int, max_len: int) -> "DecodeInputs":
        ids, mask = np.zeros((hi, 1), np.int64), np.zeros((hi, max_len), np.int64)
        return cls(ids, mask, np.zeros(hi, np.int64), (ort_value(ids), ort_value(mask)))

    def fill(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Row b feeds tokens[b] over lengths[b] cached + new positions; only the changed mask ends are written."""
        self.ids[:, 0] = tokens
        for b, (n, m) in enumerate(zip(lengths.tolist(), self.ones.tolist())):
            if n > m:
                self.mask[b, m:n] = 1
            elif n < m:
                self.mask[b, n:m] = 0
        self.ones[:] = lengths


@dataclass
class LoraRun:
    """How one run meets its adapters: the binding's LoRA key, the tensors to bind for a new binding, and per-run
    index inputs (the row grouping)."""
    key: int | PoolKey
    params: Callable[[], dict[str, np.ndarray]]
    feeds: dict[str, np.ndarray]


class Graph:
    """One session and the IOBindings it keeps per BindingKey (KV and logits stay bound between calls)."""

    def __init__(self, session: ort.InferenceSession):
        self.session = session
        self.bindings: OrderedDict[BindingKey, Binding] = OrderedDict()  # least recently used first
