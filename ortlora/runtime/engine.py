"""The step-level engine: one onnxruntime session, a static KV cache, `prefill(rows)` and `decode(rows)`.

The KV cache is one buffer per layer and kind, [slots, kv_heads, max_len, head_dim], bound through IOBinding as
both `past_key_values.N.*` and `present.N.*`: GroupQueryAttention sees equal pointers and writes each new token in
place, so nothing is copied between steps. A row of a batch is (slot, new tokens, adapter); a slot's cached length
is `lengths[slot]` and its attention-mask prefix of ones. A decode step binds slots [0, hi) with hi = 1 + the
highest slot that decodes; a slot in that range that does not decode gets a dummy token written at its first free
position (its length + 1), which is scratch space the slot's next real token overwrites.

Adapters are ordinary graph inputs (onnxruntime 1.32's `run_with_iobinding` ignores RunOptions' active adapters).
A batch whose rows all use one adapter (or none) runs the exported graph with that adapter's tensors bound; a batch
that mixes adapters runs the mixed-adapter graph (see multi_lora.py) on the adapter pool, both built the first time
they are needed (or up front by `build_mixed()`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnxruntime as ort

from ortlora.adapters.validate import load_model_proto, model_lora_inputs
from ortlora.errors import ModelError, OrtloraError
from ortlora.runtime import hugepages, multi_lora
from ortlora.runtime.adapter_store import Adapter
from ortlora.runtime.providers import session_providers

KEEP = "num_logits_to_keep"
PREFILL_CHUNK = 2048  # longer prompts are prefilled in pieces (GQA's attention scratch grows with chunk x total)
BINDING_CACHE = 32  # IOBindings kept per session, one per (slot range, adapter or adapter set)


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime needs from `genai_config.json` (onnxruntime-genai's layout, written by export)."""
    folder: Path
    filename: str
    num_layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    eos_ids: tuple[int, ...]
    pad_id: int
    threads: int | None
    past_key: str = "past_key_values.%d.key"
    past_value: str = "past_key_values.%d.value"
    present_key: str = "present.%d.key"
    present_value: str = "present.%d.value"

    @classmethod
    def read(cls, folder: str | Path) -> "ModelInfo":
        folder = Path(folder)
        path = folder / "genai_config.json"
        if not folder.is_dir():
            raise ModelError(f"{folder}: no such model folder (export one with `ortlora export`)")
        if not path.is_file():
            raise ModelError(f"{folder} has no genai_config.json: not an exported model folder")
        try:
            model = json.loads(path.read_text())["model"]
            dec = model["decoder"]
            eos = model.get("eos_token_id", [])
            ins, outs = dec.get("inputs", {}), dec.get("outputs", {})
            info = cls(
                folder=folder, filename=dec.get("filename", "model.onnx"), num_layers=int(dec["num_hidden_layers"]),
                kv_heads=int(dec["num_key_value_heads"]), head_dim=int(dec["head_size"]),
                vocab_size=int(model["vocab_size"]), context_length=int(model["context_length"]),
                eos_ids=tuple([eos] if isinstance(eos, int) else eos), pad_id=int(model.get("pad_token_id", 0)),
                threads=dec.get("session_options", {}).get("intra_op_num_threads"),
                past_key=ins.get("past_key_names", cls.past_key),
                past_value=ins.get("past_value_names", cls.past_value),
                present_key=outs.get("present_key_names", cls.present_key),
                present_value=outs.get("present_value_names", cls.present_value),
            )
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            raise ModelError(f"{path} is not a valid genai_config.json: {type(exc).__name__}: {exc}") from None
        if not (folder / info.filename).is_file():
            raise ModelError(f"{folder} has no {info.filename} (named in genai_config.json)")
        return info

    def kv_names(self) -> list[tuple[str, str]]:
        """(past input, present output) pairs, keys then values per layer."""
        return [(pat_in % i, pat_out % i) for i in range(self.num_layers)
                for pat_in, pat_out in ((self.past_key, self.present_key), (self.past_value, self.present_value))]


@dataclass
class Row:
    slot: int
    tokens: Sequence[int]
    adapter: Adapter | None = None


def session_options(threads: int | None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Denormal floats (e.g. from exp() underflow) run through slow microcode paths: flushing them to zero made a
    # Qwen2.5-0.5B decode step 6% faster in int4 and 4% in fp32 (19.6 vs 20.9 ms, 74.1 vs 77.2 ms), which is where
    # onnxruntime-genai runs on the same folder; logits change by far less than the tests' tolerances.
    so.add_session_config_entry("session.set_denormal_as_zero", "1")
    return so


def _value(arr: np.ndarray) -> ort.OrtValue:
    return ort.OrtValue.ortvalue_from_numpy(arr)


class _Graph:
    """One session and the IOBindings it keeps per bound slot range (KV and logits stay bound between calls)."""

    def __init__(self, session: ort.InferenceSession):
        self.session = session
        self.inputs = {i.name for i in session.get_inputs()} | {i.name for i in session.get_overridable_initializers()}
        self.bindings: dict[tuple, tuple[ort.IOBinding, dict]] = {}


class Engine:
    def __init__(self, folder: str | Path, *, slots: int = 1, max_len: int | None = None, threads: int | None = None,
                 provider: str | None = None):
        self.provider = provider  # None: genai_config.json's (see providers.py)
        self.info = ModelInfo.read(folder)
        self.folder = self.info.folder
        if slots < 1:
            raise OrtloraError(f"slots must be at least 1, got {slots}")
        self.slots = slots
        self.max_len = min(max_len or self.info.context_length, self.info.context_length)
        self.threads = threads or self.info.threads
        self.model_path = self.folder / self.info.filename
        proto = load_model_proto(self.model_path)  # the graph only, no weights
        self.lora_inputs = model_lora_inputs(proto)
        # int4 decode gains ~5% from weights on huge pages, fp32 nothing (see hugepages.py)
        self._huge_pages = any(n.op_type == "MatMulNBits" for n in proto.graph.node)
        del proto
        before = hugepages.anonymous_regions() if self._huge_pages else set()
        try:
            session = ort.InferenceSession(str(self.model_path), session_options(self.threads),
                                           providers=session_providers(self.folder, self.provider))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"{self.model_path}: onnxruntime cannot load it: {exc}") from None
        if self._huge_pages:
            hugepages.collapse_new_regions(before)
        self._single = _Graph(session)
        self._mixed: _Graph | None = None
        past = {i.name: i for i in session.get_inputs()}
        first = self.info.kv_names()[0][0]
        if first not in past:
            raise ModelError(f"{self.model_path} has no input {first} (genai_config.json names it)")
        self.dtype = np.dtype(np.float16 if "float16" in past[first].type else np.float32)
        self.has_keep = KEEP in self._single.inputs
        shape = (slots, self.info.kv_heads, self.max_len, self.info.head_dim)
        self.kv = {past_name: np.zeros(shape, self.dtype) for past_name, _ in self.info.kv_names()}
        self.lengths = np.zeros(slots, np.int64)  # cached tokens per slot
        self._free = list(range(slots))
        self._pool: multi_lora.AdapterPool | None = None
        self._logits: dict[tuple[int, int], np.ndarray] = {}  # one-position logits buffer per slot range
        self._decode_io: dict[int, tuple] = {}  # hi -> (input_ids, attention_mask, ones per row, OrtValues)

    # -- slots ----------------------------------------------------------------------------------------------
    def acquire_slot(self) -> int:
        """The lowest free slot (keeps decode batches dense); raises when all are taken."""
        if not self._free:
            raise OrtloraError(f"all {self.slots} KV cache slots are in use")
        self._free.sort()
        slot = self._free.pop(0)
        self.lengths[slot] = 0
        return slot

    def release_slot(self, slot: int) -> None:
        self.lengths[slot] = 0
        if slot not in self._free:
            self._free.append(slot)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def truncate(self, slot: int, length: int) -> None:
        """Keep only the first `length` cached tokens of `slot` (a conversation's shared prefix)."""
        self.lengths[slot] = min(int(self.lengths[slot]), length)

    # -- steps ----------------------------------------------------------------------------------------------
    def prefill(self, rows: Sequence[Row], batched: bool = False) -> np.ndarray:
        """Append each row's tokens to its slot; returns each row's last-position logits [rows, vocab].

        One row per run by default. `batched` runs new rows (empty slots, no other occupied slot between them)
        together, right-padded, with the logits of each row's own last position."""
        for row in rows:
            if not len(row.tokens):
                raise OrtloraError("a prefill row needs at least one token")
            start = int(self.lengths[row.slot])
            if start + len(row.tokens) > self.max_len:
                raise OrtloraError(f"slot {row.slot}: {start} cached + {len(row.tokens)} new tokens exceed the "
                                   f"context of {self.max_len} tokens")
        if batched and len(rows) > 1 and self._can_batch(rows):
            return self._prefill_batch(rows)
        out = np.empty((len(rows), self.info.vocab_size), np.float32)
        for i, row in enumerate(rows):
            tokens = list(row.tokens)
            for k in range(0, len(tokens), PREFILL_CHUNK):
                chunk = tokens[k:k + PREFILL_CHUNK]
                total = int(self.lengths[row.slot]) + len(chunk)
                ids = np.asarray([chunk], np.int64)
                mask = np.ones((1, total), np.int64)
                logits = self._run(row.slot, row.slot + 1, ids, mask, [row.adapter])
                self.lengths[row.slot] = total
            out[i] = logits[0, -1]
        return out

    def _can_batch(self, rows: Sequence[Row]) -> bool:
        slots = {r.slot for r in rows}
        lo, hi = min(slots), max(slots) + 1
        others_free = all(s in slots or s in self._free for s in range(lo, hi))
        return (len(slots) == len(rows) and others_free and not self.lengths[lo:hi].any()
                and max(len(r.tokens) for r in rows) <= PREFILL_CHUNK)

    def _prefill_batch(self, rows: Sequence[Row]) -> np.ndarray:
        """Right-padded rows in slots [lo, hi) as one first prompt; free slots in between get a dummy token."""
        lo, hi = min(r.slot for r in rows), max(r.slot for r in rows) + 1
        lens = np.ones(hi - lo, np.int64)
        width = max(len(r.tokens) for r in rows)
        ids = np.zeros((hi - lo, width), np.int64)
        adapters: list[Adapter | None] = [rows[0].adapter] * (hi - lo)
        for r in rows:
            ids[r.slot - lo, :len(r.tokens)] = r.tokens
            lens[r.slot - lo] = len(r.tokens)
            adapters[r.slot - lo] = r.adapter
        mask = (np.arange(width)[None, :] < lens[:, None]).astype(np.int64)
        keep = width - int(min(len(r.tokens) for r in rows)) + 1  # enough positions for every row's last one
        logits = self._run(lo, hi, ids, mask, adapters, keep=keep)  # [hi - lo, keep or width, vocab]
        out = np.empty((len(rows), self.info.vocab_size), np.float32)
        for i, r in enumerate(rows):
            out[i] = logits[r.slot - lo, len(r.tokens) - 1 - (width - logits.shape[1])]
            self.lengths[r.slot] = len(r.tokens)
        return out

    def decode(self, rows: Sequence[Row]) -> np.ndarray:
        """One new token per row, all rows in one run; returns logits [rows, vocab] in the order of `rows`,
        valid until the engine's next run (it may be a view of the engine's output buffer)."""
        if not rows:
            return np.empty((0, self.info.vocab_size), np.float32)
        slots = [r.slot for r in rows]
        if len(set(slots)) != len(slots):
            raise OrtloraError(f"decode rows share a slot: {slots}")
        hi = max(slots) + 1
        for r in rows:
            if len(r.tokens) != 1:
                raise OrtloraError(f"a decode row takes exactly one token, slot {r.slot} got {len(r.tokens)}")
            if self.lengths[r.slot] >= self.max_len:
                raise OrtloraError(f"slot {r.slot} is full: the context holds {self.max_len} tokens")
        ids, mask, marked, values = self._decode_buffers(hi)
        ids[:] = 0
        new_len = np.minimum(self.lengths[:hi] + 1, self.max_len)  # dummy rows: scratch at their first free place
        adapters: list[Adapter | None] = [None] * hi
        for r in rows:
            ids[r.slot, 0] = r.tokens[0]
            adapters[r.slot] = r.adapter
        for b in range(hi):  # the mask keeps its full width (a fixed shape); only the changed ends are rewritten
            n, m = int(new_len[b]), int(marked[b])
            if n > m:
                mask[b, m:n] = 1
            elif n < m:
                mask[b, n:m] = 0
            marked[b] = n
        # a full slot that does not decode loses its last position to the dummy token
        full = [s for s in range(hi) if s not in slots and self.lengths[s] >= self.max_len]
        active = {id(r.adapter): r.adapter for r in rows}
        if len(active) == 1:
            adapters = [rows[0].adapter] * hi
        logits = self._run(0, hi, ids, mask, adapters, values=values)
        for s in slots:
            self.lengths[s] += 1
        for s in full:
            self.lengths[s] = self.max_len - 1
        if logits.dtype == np.float32 and slots == list(range(hi)):
            return logits[:, -1]  # a view (a fresh 0.6 MB copy a step cost ~0.15 ms in page faults)
        return logits[slots, -1].astype(np.float32, copy=False)  # fancy indexing copies

    def _decode_buffers(self, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[ort.OrtValue, ...]]:
        """input_ids [hi, 1] and attention_mask [hi, max_len] kept between decode steps, with each mask row's
        count of ones. A mask as wide as the cache gives every step the same input shapes: onnxruntime then
        reuses its memory plan (a growing mask cost ~1 ms per step on Qwen2.5-0.5B int4), and GroupQueryAttention
        reads each row's length from the mask's ones (same logits, bit for bit)."""
        if hi not in self._decode_io:
            ids, mask = np.zeros((hi, 1), np.int64), np.zeros((hi, self.max_len), np.int64)
            # their OrtValues are made once too (~20 us each a step otherwise)
            self._decode_io[hi] = (ids, mask, np.zeros(hi, np.int64), (_value(ids), _value(mask)))
        return self._decode_io[hi]

    # -- running ------------------------------------------------------------------------------------------
    def _run(self, lo: int, hi: int, ids: np.ndarray, mask: np.ndarray, adapters: Sequence[Adapter | None],
             keep: int = 1, values: tuple[ort.OrtValue, ort.OrtValue] | None = None) -> np.ndarray:
        """One run over slots [lo, hi); returns logits [hi - lo, positions, vocab] for the last `keep` positions
        (all positions for a model without num_logits_to_keep). `values`: OrtValues over `ids` and `mask`."""
        distinct = {a.uid: a for a in adapters if a is not None}
        mixed = len(distinct) > 1 or (len(distinct) == 1 and None in adapters)
        graph = self._mixed_graph() if mixed else self._single
        last_only = (self.has_keep and keep == 1) or ids.shape[1] == 1
        lora_feeds = {}
        if mixed:
            pool = self._adapter_pool()
            generation = pool.generation
            slot_of = pool.place(distinct)
            if pool.generation != generation:  # a higher rank rebuilt the buffers: older bindings hold the old ones
                graph.bindings.clear()
            groups = pool.groups([slot_of[a.uid] if a is not None else 0 for a in adapters])
            lora_feeds = groups.feeds
            lora_key = ("pool", pool.generation, groups.first, groups.count)
            params = lambda: pool.views(groups.first, groups.count)  # noqa: E731 (only for a new binding)
        else:
            adapter = next(iter(distinct.values()), None)
            # only the adapter's own tensors are bound: the others keep their rank-0 defaults, and every bound
            # input costs onnxruntime time on each run (336 rank-0 inputs cost ~5% of an int4 decode step)
            lora_key = adapter.uid if adapter is not None else 0
            params = lambda: adapter.params if adapter is not None else {}  # noqa: E731
        binding, state = self._binding(graph, lo, hi, last_only, lora_key, params)
        if values is None or state.get("io") is not values:  # decode's persistent buffers stay bound
            ids_value, mask_value = values or (_value(ids), _value(mask))
            binding.bind_ortvalue_input("input_ids", ids_value)
            binding.bind_ortvalue_input("attention_mask", mask_value)
            state["io"] = values
        if self.has_keep and not last_only:
            binding.bind_ortvalue_input(KEEP, _value(np.array(keep, np.int64)))
        for name, arr in lora_feeds.items():
            binding.bind_ortvalue_input(name, _value(arr))
        graph.session.run_with_iobinding(binding)
        if last_only:
            return state["logits"]
        return binding.get_outputs()[len(state["kv"])].numpy()  # outputs come in binding order

    def _binding(self, graph: _Graph, lo: int, hi: int, last_only: bool, lora_key,
                 params: Callable[[], dict[str, np.ndarray]]
                 ) -> tuple[ort.IOBinding, dict]:
        """The IOBinding for slots [lo, hi) and one adapter (or adapter set): the KV slices bound as past and
        present (one buffer), the LoRA tensors, and for one-position logits a persistent output buffer."""
        key = (lo, hi, last_only, lora_key)
        found = graph.bindings.pop(key, None)
        if found is None:
            binding = graph.session.io_binding()
            state: dict = {"kv": [], "lora": lora_key}
            for past_name, present_name in self.info.kv_names():
                value = _value(self.kv[past_name][lo:hi])  # a view: the same memory as the cache
                binding.bind_ortvalue_input(past_name, value)
                binding.bind_ortvalue_output(present_name, value)
                state["kv"].append(value)
            if self.has_keep and last_only:
                state["keep"] = _value(np.array(1, np.int64))
                binding.bind_ortvalue_input(KEEP, state["keep"])
            if last_only:
                logits = self._logits.get((lo, hi))
                if logits is None:
                    logits = self._logits[(lo, hi)] = np.empty((hi - lo, 1, self.info.vocab_size), self.dtype)
                state["logits"] = logits
                binding.bind_ortvalue_output("logits", _value(logits))
            else:  # the shape varies: onnxruntime allocates it
                binding.bind_output("logits")
            state["lora_values"] = [(name, _value(np.ascontiguousarray(arr))) for name, arr in params().items()]
            for name, value in state["lora_values"]:
                binding.bind_ortvalue_input(name, value)
            found = (binding, state)
        graph.bindings[key] = found  # most recently used last
        while len(graph.bindings) > BINDING_CACHE:
            del graph.bindings[next(iter(graph.bindings))]
        return found

    def build_mixed(self) -> None:
        """Build the mixed-adapter session now (a server does it at start-up rather than on its first mixed
        batch); a model without LoRA inputs has none to build."""
        if self.lora_inputs:
            self._mixed_graph()

    def _mixed_graph(self) -> _Graph:
        if self._mixed is None:
            if not self.lora_inputs:
                raise OrtloraError("the model has no LoRA inputs, so a batch cannot mix adapters")
            proto = multi_lora.mixed_adapter_model(self.model_path, self.lora_inputs)
            so = session_options(self.threads)
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.folder))
            # Pre-packing stays on although it gives this session its own copy of the float weights: without it
            # a 4-row fp32 decode step ran 2.5x slower (B re-packed every call) and an int4 one 25x slower.
            before = hugepages.anonymous_regions() if self._huge_pages else set()
            session = ort.InferenceSession(proto.SerializeToString(), so,
                                           providers=session_providers(self.folder, self.provider))
            if self._huge_pages:
                hugepages.collapse_new_regions(before)
            self._mixed = _Graph(session)
        return self._mixed

    def _adapter_pool(self) -> multi_lora.AdapterPool:
        """Slots for the adapters of mixed batches: a batch has at most `slots` rows, so as many adapters."""
        if self._pool is None:
            self._pool = multi_lora.AdapterPool(self.lora_inputs, self.slots, self.dtype)
        return self._pool

    def forget_adapter(self, adapter: Adapter) -> None:
        """Drop the bindings and the pool slot that hold `adapter` (the store calls this on unload)."""
        if self._pool is not None:
            self._pool.forget(adapter)
        for key in [k for k in self._single.bindings if k[3] == adapter.uid]:
            del self._single.bindings[key]
