"""The step-level engine: one onnxruntime session, a static KV cache, `run(rows)` (a prefill run), `decode(rows)`.

A row of a batch is (slot, new tokens, adapter, how many of its last positions' logits). What each run reads and
writes, per row b in slot s:

    kv[layer][s, :, :len[s]]            read: the slot's cached keys/values (its attention-mask prefix of ones)
    kv[layer][s, :, len[s]:len[s]+T]    written in place: the T new tokens' keys/values (past and present are one
                                        buffer bound twice, so GroupQueryAttention appends without a copy)
    logits[b] = decoder(tokens[b] | kv[s]) with  y = x @ W + (x @ A[b]) @ B[b]  in every LoRA module, where
                A[b], B[b] are row b's adapter's tensors (zeros: the base model); a model with DoRA inputs
                also multiplies y by row b's adapter's dora_scale (ones: LoRA adapters and the base model)
    len[s] += T

A decode step binds slots [0, hi), hi = 1 + the highest decoding slot; a slot in that range that does not decode
gets a dummy token written at position len[s] (scratch its next real token overwrites) and its length stays.

With `unified_steps`, `step(decode_rows, prompt_rows)` runs a decode step and one prefill run as one run (unified.py:
the graph's tokens as one row, the attention called per group), so the prompt reads the weights in the decode rows'
pass; in that graph the LoRA rows of every run are its tokens.

A prefill run (`run`) is either one row over any cached past, or several rows whose slots are empty (prompts not yet
begun), right-padded to the run's width, in any slots: onnxruntime's GroupQueryAttention refuses a batch of more
than one row with more than one new token once a past is given (its CPU kernel would compute each row's own past,
its input check stops it: benchmarks/NOTES.md#packed-prefill). Such a packed run writes its keys and values into a
staging cache as wide as the run, [rows, kv_heads, width, head_dim], copied into each row's slot afterwards (the
real tokens only): the slots need not be adjacent, and the attention scratch is rows x width x width, not x max_len.
The LM head computes only the positions a run asks for (combined.gather_logits_rows).

Every run goes through one session of the mixed-adapter graph (multi_lora.py, combined.py), so the weights are held
once: a run with adapters binds the adapter pool's slots they sit in (one adapter on every row: one slot), whose
slots hold the only copy of a placed adapter's weights; a run without adapters binds none (rank-0 defaults). The
adapters' owner (`ortlora.runtime.adapters.Adapters`) gives the pool its adapters. Adapters are graph inputs:
onnxruntime's `run_with_iobinding` ignores RunOptions' active adapters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import onnxruntime as ort

from ortlora.adapters.validate import load_model_proto, model_lora_inputs
from ortlora.errors import ModelError, OrtloraError
from ortlora.model_folder import ModelInfo
from ortlora.naming import is_dora_scale
from ortlora.runtime import combined, hugepages, unified
from ortlora.runtime.bindings import Binding, BindingKey, DecodeInputs, Graph, LoraRun, PoolKey, ort_value
from ortlora.runtime.multi_lora import index_names, module_classes
from ortlora.runtime.pool import AdapterPool, group_rows
from ortlora.runtime.prefix_cache import PrefixCache
from ortlora.runtime.providers import session_providers

if TYPE_CHECKING:
    from ortlora.runtime.adapter import Adapter

KEEP = "num_logits_to_keep"
ROWS = combined.LOGITS_ROWS
PREFILL_CHUNK = 2048  # padded tokens in one run at most (GQA's attention scratch grows with tokens x cache length)
BINDING_CACHE = 32  # IOBindings kept per session, one per (slot range, adapter or adapter set)
PROBE_TOKENS = (1, 2, 3, 4)  # any short input shows an adapter that makes the logits non-finite
PREFIX_CACHE_BYTES = 512 << 20  # default bound of the prefix cache (Qwen2.5-0.5B fp32: ~21k tokens)


@dataclass
class Row:
    slot: int
    tokens: Sequence[int]
    adapter: "Adapter | None" = None  # ortlora.runtime.adapters.Adapter: params (input name -> array) and uid
    logits: int = 1  # logits of the row's last `logits` positions (0: none, len(tokens): every one; prefill only)


def session_options(threads: int | None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = 4  # a failed run raises its message: onnxruntime's own error line would repeat it
    so.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # denormals (e.g. from exp() underflow) take slow microcode paths; see benchmarks/NOTES.md#denormals
    so.add_session_config_entry("session.set_denormal_as_zero", "1")
    return so


class Engine:
    def __init__(self, folder: str | Path, *, slots: int = 1, max_len: int | None = None, threads: int | None = None,
                 pool: AdapterPool | None = None, provider: str | None = None,
                 prefix_cache_bytes: int = PREFIX_CACHE_BYTES, unified_steps: bool = False):
        """`pool`: the adapter pool mixed runs use (its owner places adapters in it); made here if not given.
        `provider`: the execution provider, None for genai_config.json's (see providers.py). `prefix_cache_bytes`:
        the bound of the prompt prefixes' KV kept for later requests (prefix_cache.py); 0 turns it off.
        `unified_steps`: give the graph a prompt group, so that `step` runs decode rows and a prompt in one run
        (unified.py: it saves a step's prompt run its pass over the weights, and costs every run a copy of its
        LoRA results: benchmarks/NOTES.md#unified-steps)."""
        self.provider = provider
        self.info = ModelInfo.read(folder)
        self.folder = self.info.folder
        if slots < 1:
            raise OrtloraError(f"slots must be at least 1, got {slots}")
        self.slots = slots
        self.max_len = min(max_len or self.info.context_length, self.info.context_length)
        self.threads = threads or self.info.threads
        self.model_path = self.folder / self.info.filename
        self.hugepages_thread = None  # moving an int4 model's pre-packed weights onto huge pages, after loading
        proto = load_model_proto(self.model_path)  # the graph only, no weights
        self.lora_inputs = model_lora_inputs(proto)
        # int4 decode gains from weights on huge pages, fp32 nothing (benchmarks/NOTES.md#huge-pages)
        self._huge_pages = any(n.op_type == "MatMulNBits" for n in proto.graph.node)
        # the mixed graph serves every run (one session, one copy of the weights); given as bytes, with the external
        # data found where the folder's files resolve to (a folder of symlinks loads too)
        del proto
        model = combined.engine_model(self.model_path, self.lora_inputs)
        # a step's decode rows and one prompt run in one pass over the weights, where the graph's form allows
        self.unified = unified_steps and unified.add_prompt_group(model)
        so = session_options(self.threads)
        data = combined.relocate_external_data(model, self.folder)
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(data))
        # pre-packing stays on: without it B is re-packed every call (benchmarks/NOTES.md#engine-step-costs)
        self._graph = Graph(self._session(model.SerializeToString(), so))
        del model
        self.lora_classes = module_classes(self.lora_inputs)  # the pool's and the graph's module classes
        self._one_slot: dict[tuple[int, int], dict[str, np.ndarray]] = {}  # per class and row count: one-slot inputs
        past = {i.name: i for i in self._graph.session.get_inputs()}
        first = self.info.kv_names()[0][0]
        if first not in past:
            raise ModelError(f"{self.model_path} has no input {first} (genai_config.json names it)")
        self.dtype = np.dtype(np.float16 if "float16" in past[first].type else np.float32)
        session = self._graph.session
        self.has_keep = KEEP in past or KEEP in {i.name for i in session.get_overridable_initializers()}
        self.has_rows = ROWS in past  # the LM head computes only the positions asked for
        shape = (slots, self.info.kv_heads, self.max_len, self.info.head_dim)  # [slots, kv_heads, max_len, head_dim]
        # small pages: a slot's first token must not make 2 MB of each of its stripes resident (hugepages.py)
        self.kv = {past_name: hugepages.sparse_zeros(shape, self.dtype) for past_name, _ in self.info.kv_names()}
        self.lengths = np.zeros(slots, np.int64)  # cached tokens per slot
        self._free = list(range(slots))
        self.pool = pool
        self._logits: dict[tuple[int, int], np.ndarray] = {}  # one-position logits buffer per slot range
        self._decode_inputs: dict[int, DecodeInputs] = {}  # per hi
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        # a unified step's prompt LoRA inputs that its adapters do not have
        self.rank0 = unified.rank0_values(self.lora_inputs, self.dtype) if self.unified else {}

    def _session(self, model: str | bytes, so: ort.SessionOptions) -> ort.InferenceSession:
        before = hugepages.anonymous_regions() if self._huge_pages else set()
        try:
            session = ort.InferenceSession(model, so, providers=session_providers(self.folder, self.provider))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"{self.model_path}: onnxruntime cannot load it: {exc}") from None
        if self._huge_pages:
            self.hugepages_thread = hugepages.collapse_in_background(before)
        return session

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
    def packable(self, row: Row) -> bool:
        """Can `row` share a run with others? Only while its slot holds nothing (see `run`)."""
        return not self.lengths[row.slot]

    def run(self, rows: Sequence[Row]) -> list[np.ndarray]:
        """One prefill run: append each row's tokens to its slot; returns per row the logits [row.logits, vocab] of
        its last `row.logits` positions. One row over any past, or several rows whose slots are all empty."""
        if not rows:
            return []
        for row in rows:
            self._check_room(row)
        if len({r.slot for r in rows}) != len(rows):
            raise OrtloraError(f"rows of one run share a slot: {[r.slot for r in rows]}")
        if len(rows) == 1:
            return self._run_one(rows[0])
        begun = [r.slot for r in rows if not self.packable(r)]
        if begun:
            raise OrtloraError(f"slots {begun} hold tokens: a row with a past runs alone (onnxruntime's "
                               "GroupQueryAttention takes one such row per run)")
        return self._run_packed(rows)

    def prefill(self, rows: Sequence[Row], batched: bool = True) -> np.ndarray:
        """Every row's tokens into its slot in as few runs as `run` allows (with `batched`, rows over empty slots
        together, at most PREFILL_CHUNK padded tokens a run; the others alone, in pieces of PREFILL_CHUNK); returns
        each row's last-position logits [rows, vocab]."""
        out = np.empty((len(rows), self.info.vocab_size), np.float32)
        fresh = [i for i, r in enumerate(rows) if batched and self.packable(r) and len(r.tokens) <= PREFILL_CHUNK]
        alone = [i for i in range(len(rows)) if i not in fresh]
        fresh.sort(key=lambda i: len(rows[i].tokens))
        while fresh:  # the shortest first: similar lengths share a run
            group = [fresh.pop(0)]
            while fresh and (len(group) + 1) * len(rows[fresh[0]].tokens) <= PREFILL_CHUNK:
                group.append(fresh.pop(0))
            for i, logits in zip(group, self.run([Row(rows[i].slot, rows[i].tokens, rows[i].adapter) for i in group])):
                out[i] = logits[-1]
        for i in alone:
            row, tokens = rows[i], list(rows[i].tokens)
            for k in range(0, len(tokens), PREFILL_CHUNK):
                piece = tokens[k:k + PREFILL_CHUNK]
                logits = self.run([Row(row.slot, piece, row.adapter, int(k + len(piece) == len(tokens)))])[0]
            out[i] = logits[-1]
        return out

    def _check_room(self, row: Row) -> None:
        if not len(row.tokens):
            raise OrtloraError("a prefill row needs at least one token")
        if not 0 <= row.logits <= len(row.tokens):
            raise OrtloraError(f"a row of {len(row.tokens)} tokens has no {row.logits} positions' logits")
        start = int(self.lengths[row.slot])
        if start + len(row.tokens) > self.max_len:
            raise OrtloraError(f"slot {row.slot}: {start} cached + {len(row.tokens)} new tokens exceed the context "
                               f"of {self.max_len} tokens")

    def _run_one(self, row: Row) -> list[np.ndarray]:
        """A row over its slot's past: the slot's cache bound directly (past and present one buffer)."""
        n, total = len(row.tokens), int(self.lengths[row.slot]) + len(row.tokens)
        ids = np.asarray([row.tokens], np.int64)
        logits = self._run(row.slot, row.slot + 1, ids, np.ones((1, total), np.int64), [row.adapter],
                           positions=np.arange(n - max(row.logits, 1), n))
        self.lengths[row.slot] = total
        return [logits[len(logits) - row.logits:]]

    def _run_packed(self, rows: Sequence[Row]) -> list[np.ndarray]:
        """Rows over empty slots, right-padded to width S, through a staging cache [rows, kv_heads, S, head_dim];
        each row's real tokens' keys and values are then copied into its slot."""
        width = max(len(r.tokens) for r in rows)
        ids = np.zeros((len(rows), width), np.int64)  # [rows, S], right-padded
        mask = np.zeros((len(rows), width), np.int64)  # a first prompt: GQA reads each row's length from it
        wanted = []
        for b, r in enumerate(rows):
            n = len(r.tokens)
            ids[b, :n], mask[b, :n] = r.tokens, 1
            wanted.append(np.arange(n - r.logits, n) + b * width)
        positions = np.concatenate(wanted)
        shape = (len(rows), self.info.kv_heads, width, self.info.head_dim)
        staging = {name: np.empty(shape, self.dtype) for name in self.kv}
        lora = self.lora_run([r.adapter for r in rows for _ in range(width if self.unified else 1)])
        io = self._graph.session.io_binding()
        for past_name, present_name in self.info.kv_names():
            value = ort_value(staging[past_name])
            io.bind_ortvalue_input(past_name, value)
            io.bind_ortvalue_output(present_name, value)
        held = [(name, ort_value(np.ascontiguousarray(arr)))
                for name, arr in {**lora.params(), **lora.feeds}.items()]
        held += [("input_ids", ort_value(ids)), ("attention_mask", ort_value(mask))]
        held += self._position_inputs(positions, width, len(rows))
        for name, value in held:
            io.bind_ortvalue_input(name, value)
        io.bind_output("logits")
        self._graph.session.run_with_iobinding(io)
        logits = self._pick(io.get_outputs()[len(staging)].numpy(), positions, width, len(rows))
        out, at = [], 0
        for b, r in enumerate(rows):
            n = len(r.tokens)
            for name, arr in self.kv.items():
                arr[r.slot, :, :n] = staging[name][b, :, :n]
            self.lengths[r.slot] = n
            out.append(logits[at:at + r.logits])
            at += r.logits
        return out

    def _position_inputs(self, positions: np.ndarray, width: int, rows: int) -> list[tuple[str, ort.OrtValue]]:
        """The input naming the positions whose logits a run computes (at least one: the graph needs a row)."""
        if self.has_rows:
            return [(ROWS, ort_value(positions if len(positions) else np.zeros(1, np.int64)))]
        if self.has_keep:  # every position (0 = all), picked in `_pick`
            return [(KEEP, ort_value(np.array(0, np.int64)))]
        return []

    def _pick(self, logits: np.ndarray, positions: np.ndarray, width: int, rows: int) -> np.ndarray:
        """[len(positions), vocab] float32 out of a run's logits output."""
        if self.has_rows:
            return logits[:len(positions), 0].astype(np.float32, copy=False)
        return logits.reshape(rows * width, -1)[positions].astype(np.float32, copy=False)

    def decode(self, rows: Sequence[Row]) -> np.ndarray:
        """One new token per row, all rows in one run; returns logits [rows, vocab] in the order of `rows`,
        valid until the engine's next run (it may be a view of the engine's output buffer)."""
        if not rows:
            return np.empty((0, self.info.vocab_size), np.float32)
        slots, hi, inputs, adapters = self._decode_rows(rows)
        logits = self._run(0, hi, inputs.ids, inputs.mask, adapters, values=inputs.values)
        self._decoded(slots, hi)
        if logits.dtype == np.float32 and slots == list(range(hi)):
            return logits[:, -1]  # a view: a copy costs page faults (benchmarks/NOTES.md#engine-step-costs)
        return logits[slots, -1].astype(np.float32, copy=False)  # fancy indexing copies

    def _decode_rows(self, rows: Sequence[Row]) -> tuple[list[int], int, DecodeInputs, list]:
        """A decode run's slots [0, hi): the rows' slots, hi, the filled inputs, the adapter of each slot (a slot that
        does not decode is a dummy row: scratch at len[s]; it takes the rows' one adapter when they share one)."""
        slots = self._check_decode(rows)
        hi = max(slots) + 1
        inputs = self._decode_inputs.get(hi) or self._decode_inputs.setdefault(hi, DecodeInputs.make(hi, self.max_len))
        tokens = np.zeros(hi, np.int64)
        tokens[slots] = [r.tokens[0] for r in rows]
        inputs.fill(tokens, np.minimum(self.lengths[:hi] + 1, self.max_len))
        adapters = [None] * hi
        for r in rows:
            adapters[r.slot] = r.adapter
        if len({id(r.adapter) for r in rows}) == 1:  # one adapter: dummy rows take it too (no mixed run)
            adapters = [rows[0].adapter] * hi
        return slots, hi, inputs, adapters

    def _decoded(self, slots: list[int], hi: int) -> None:
        """After a decode run over [0, hi): the rows' slots one longer; a full slot that did not decode lost its last
        position to the dummy token."""
        full = [s for s in range(hi) if s not in slots and self.lengths[s] >= self.max_len]
        self.lengths[slots] += 1
        self.lengths[full] = self.max_len - 1

    # -- a decode step and a prompt run in one pass over the weights (unified.py) -----------------------------
    def mergeable(self, decode_rows: Sequence[Row], prompt_rows: Sequence[Row]) -> bool:
        """Can `prompt_rows` (one prefill run, as `run` takes it) share the run of `decode_rows` (`step`)? With a
        prompt group in the graph: rows over empty slots, or one row over a past the decode rows do not bind."""
        if not (self.unified and decode_rows and prompt_rows):
            return False
        if all(self.packable(r) for r in prompt_rows):
            return True
        return len(prompt_rows) == 1 and prompt_rows[0].slot > max(r.slot for r in decode_rows)

    def step(self, decode_rows: Sequence[Row], prompt_rows: Sequence[Row]) -> tuple[np.ndarray, list[np.ndarray]]:
        """`decode(decode_rows)` and `run(prompt_rows)` as one run (see `mergeable`): the weights are read once for
        both. Returns what those two return."""
        if not self.mergeable(decode_rows, prompt_rows):
            raise OrtloraError("these prompt rows cannot share the decode rows' run")
        for row in prompt_rows:
            self._check_room(row)
        taken = [r.slot for r in prompt_rows] + [r.slot for r in decode_rows]
        if len(set(taken)) != len(taken):
            raise OrtloraError(f"rows of one run share a slot: {taken}")
        slots, hi, inputs, decode_adapters = self._decode_rows(decode_rows)
        prompt = unified.PromptGroup.make(self, prompt_rows)
        distinct = {a.uid: a for a in decode_adapters + prompt.adapters if a is not None}
        slot_of = self._place(distinct) if distinct and self.lora_inputs else {}  # one placement for both groups
        lora = self.lora_run(decode_adapters, slot_of)
        b = self._binding(lora, BindingKey(0, hi, False, lora.key, prompt=True))
        _bind_inputs(b, inputs.values, lora.feeds)
        held = prompt.bind(self, b, slot_of)
        rows = np.concatenate([np.arange(hi), prompt.positions + hi])
        held.append(ort_value(rows))
        b.io.bind_ortvalue_input(ROWS, held[-1])
        b.io.bind_output("logits")
        self._graph.session.run_with_iobinding(b.io)
        logits = b.io.get_outputs()[len(b.kv)].numpy()
        self._decoded(slots, hi)
        return logits[slots, 0].astype(np.float32), prompt.finish(self, logits[hi:, 0].astype(np.float32))

    def _check_decode(self, rows: Sequence[Row]) -> list[int]:
        slots = [r.slot for r in rows]
        if len(set(slots)) != len(slots):
            raise OrtloraError(f"decode rows share a slot: {slots}")
        for r in rows:
            if len(r.tokens) != 1:
                raise OrtloraError(f"a decode row takes exactly one token, slot {r.slot} got {len(r.tokens)}")
            if self.lengths[r.slot] >= self.max_len:
                raise OrtloraError(f"slot {r.slot} is full: the context holds {self.max_len} tokens")
        return slots

    def probe(self, params: dict[str, np.ndarray], tokens: Sequence[int] = PROBE_TOKENS) -> np.ndarray:
        """Last-position logits [vocab] of `tokens` with adapter tensors `params` (input name -> array), from an
        empty cache of its own: touches no slot, binding or pool, so any thread may call it while steps run."""
        ids = np.asarray([[t % self.info.vocab_size for t in tokens]], np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if self.lora_inputs:  # a pool of one slot (see _lora)
            rows = ids.shape[1] if self.unified else 1  # the LoRA rows: tokens in the unified graph
            feeds.update(self.one_slot_inputs(rows), **{name: arr[None] for name, arr in params.items()})
        empty = np.zeros((1, self.info.kv_heads, 0, self.info.head_dim), self.dtype)
        feeds.update({past_name: empty for past_name, _ in self.info.kv_names()})
        if self.has_rows:
            feeds[ROWS] = np.array([ids.shape[1] - 1], np.int64)
        elif self.has_keep:
            feeds[KEEP] = np.array(1, np.int64)
        return self._graph.session.run(["logits"], feeds)[0][-1, -1]

    # -- running ------------------------------------------------------------------------------------------
    def _run(self, lo: int, hi: int, ids: np.ndarray, mask: np.ndarray, adapters: Sequence,
             positions: np.ndarray | None = None, values: tuple[ort.OrtValue, ort.OrtValue] | None = None
             ) -> np.ndarray:
        """One run over slots [lo, hi) bound as the cache; returns logits [positions, vocab] for one row's
        `positions`, or (decode: None) [hi - lo, 1, vocab] for every row's one position. `values`: OrtValues over
        `ids` and `mask`."""
        if self.unified and ids.shape[1] > 1:  # its LoRA rows are tokens (unified.py)
            adapters = [a for a in adapters for _ in range(ids.shape[1])]
        lora = self.lora_run(adapters)
        last_only = positions is None
        b = self._binding(lora, BindingKey(lo, hi, last_only, lora.key))
        _bind_inputs(b, values or (ort_value(ids), ort_value(mask)), lora.feeds)
        if not last_only:
            for name, value in self._position_inputs(positions, ids.shape[1], hi - lo):
                b.io.bind_ortvalue_input(name, value)
            b.io.bind_output("logits")  # a fresh output: the last run's has another shape
        self._graph.session.run_with_iobinding(b.io)
        if last_only:
            return b.logits
        return self._pick(b.io.get_outputs()[len(b.kv)].numpy(), positions, ids.shape[1], hi - lo)

    def _place(self, distinct: dict) -> dict[int, tuple[int, ...]]:
        """Pool slots for `distinct` (uid -> adapter), all of one run; a rebuilt pool drops the bindings."""
        pool = self._adapter_pool()
        generation = pool.generation
        slot_of = pool.place(distinct)
        if pool.generation != generation:  # a rank changed: older bindings hold the old buffers
            self._graph.bindings.clear()
        return slot_of

    def lora_run(self, adapters: Sequence, slot_of: dict[int, tuple[int, ...]] | None = None) -> LoraRun:
        """Rows with adapters: the pool, whose slots hold them (the pool holds the only copy of a placed adapter's
        weights), bound per module class: the slots of the run's adapters that have the class (one adapter on every
        row: its own modules of the class). A class that none of the run's adapters has, or a run without adapters:
        nothing bound, its LoRA inputs keep their rank-0 defaults (every bound input costs onnxruntime time on each
        run)."""
        distinct = {a.uid: a for a in adapters if a is not None}
        if not self.lora_inputs:
            return LoraRun(0, dict, {})
        if not distinct:  # the grouping a per-run input: one binding serves runs of different row (token) counts
            return LoraRun(0, dict, self.one_slot_inputs(len(adapters)))
        pool = self._adapter_pool()
        slot_of = self._place(distinct) if slot_of is None else slot_of
        bound, feeds = [], {}
        for k, run in enumerate(pool.runs):
            row_slots = [slot_of[a.uid][k] if a is not None else 0 for a in adapters]
            if not any(row_slots):
                feeds.update(self._one_slot_run(k, len(adapters)))
                bound.append(None)
                continue
            groups = run.groups(row_slots)
            feeds.update(groups.feeds)
            only = run.occupant[groups.first].uid if groups.count == 1 else 0
            bound.append((groups.first, groups.count, only))
        return LoraRun(PoolKey(pool.generation, tuple(bound)), lambda: _pool_views(pool, bound, distinct), feeds)

    def _binding(self, lora: LoraRun, key: BindingKey) -> Binding:
        """The IOBinding for slots [lo, hi) and one adapter (or pool range): the KV slices bound as past and
        present (one buffer), the LoRA tensors, and for one-position logits a persistent output buffer."""
        bindings = self._graph.bindings
        found = bindings.pop(key, None)
        if found is None:
            io = self._graph.session.io_binding()
            kv = []
            for past_name, present_name in self.info.kv_names():
                value = ort_value(self.kv[past_name][key.lo:key.hi])  # a view: the same memory as the cache
                io.bind_ortvalue_input(past_name, value)
                io.bind_ortvalue_output(present_name, value)
                kv.append(value)
            found = Binding(io, kv, None, [])
            if key.last_only and (self.has_rows or self.has_keep):  # one position per row
                found.keep = ort_value(np.arange(key.hi - key.lo) if self.has_rows else np.array(1, np.int64))
                io.bind_ortvalue_input(ROWS if self.has_rows else KEEP, found.keep)
            if key.last_only:
                found.logits = self._logits.get((key.lo, key.hi))
                if found.logits is None:
                    found.logits = self._logits[(key.lo, key.hi)] = np.empty(
                        (key.hi - key.lo, 1, self.info.vocab_size), self.dtype)
                io.bind_ortvalue_output("logits", ort_value(found.logits))
            else:  # the shape varies: onnxruntime allocates it
                io.bind_output("logits")
            found.lora = [(name, ort_value(np.ascontiguousarray(arr))) for name, arr in lora.params().items()]
            for name, value in found.lora:
                io.bind_ortvalue_input(name, value)
        bindings[key] = found  # most recently used last
        while len(bindings) > BINDING_CACHE:
            bindings.popitem(last=False)
        return found

    def one_slot_inputs(self, rows: int) -> dict[str, np.ndarray]:
        """The index inputs of a run whose `rows` rows all meet one pool slot in every class."""
        return {name: arr for k in range(len(self.lora_classes)) for name, arr in self._one_slot_run(k, rows).items()}

    def _one_slot_run(self, k: int, rows: int) -> dict[str, np.ndarray]:
        """Class `k`'s index inputs for `rows` rows over one slot (made once per class and row count)."""
        found = self._one_slot.get((k, rows))
        if found is None:
            dora = any(is_dora_scale(key) for key in self.lora_classes[k])
            found = self._one_slot[(k, rows)] = group_rows([1] * rows, index_names(k), dora).feeds
        return found

    def _adapter_pool(self) -> AdapterPool:
        """The pool mixed runs use: the adapters' owner's, or (an engine used alone) one of its own."""
        if self.pool is None:
            self.pool = AdapterPool(self.lora_inputs, self.slots, self.dtype)
        return self.pool

    def forget_adapter(self, adapter) -> None:
        """Drop the pool slot, bindings and cached prefixes of `adapter` (its owner calls this, on this engine's
        thread, when it unloads it)."""
        if self.pool is not None:
            generation = self.pool.generation
            self.pool.forget(adapter)
            if self.pool.generation != generation:  # shrunk: bindings hold the old buffers
                self._graph.bindings.clear()
        if self.prefix_cache is not None:
            self.prefix_cache.forget(adapter.uid)
        for key in [k for k in self._graph.bindings if isinstance(k.lora, PoolKey) and adapter.uid in k.lora.only]:
            del self._graph.bindings[key]


def _pool_views(pool: AdapterPool, bound: list, adapters: dict) -> dict[str, np.ndarray]:
    """The pool views a run binds (`bound`: per class None or (first, count, only)): one adapter's own inputs of a
    class where it alone is bound (its others keep their rank-0 defaults), else the class's slots."""
    out = {}
    for run, b in zip(pool.runs, bound):
        if b is None:
            continue
        first, count, only = b
        views = run.views(first, count)
        if only:
            adapter = adapters[only]
            own = set(getattr(adapter, "shapes", None) or adapter.params)
            views = {name: v for name, v in views.items() if name in own}
        out.update(views)
    return out


def _bind_inputs(b: Binding, values: tuple[ort.OrtValue, ort.OrtValue], feeds: dict[str, np.ndarray]) -> None:
    """input_ids / attention_mask (`values`) and the row grouping `feeds` on `b`, each bound only when it changed
    (decode's persistent buffers stay bound; rebinding costs far more than comparing a few indices)."""
    if b.inputs is not values:
        b.io.bind_ortvalue_input("input_ids", values[0])
        b.io.bind_ortvalue_input("attention_mask", values[1])
        b.inputs = values
    for name, arr in feeds.items():
        bound = b.groups.get(name)
        if bound is None or not np.array_equal(bound[0], arr):
            b.groups[name] = (arr, ort_value(arr))
            b.io.bind_ortvalue_input(name, b.groups[name][1])
