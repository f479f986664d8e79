"""One run for a step's decode rows and a prompt: a second group of rows in the engine's graph, so that the step's
prompt work reads the weights in the same pass as its decode rows.

onnxruntime's GroupQueryAttention takes either rows of one token over any past, or several rows of new tokens over
no past, in one call (benchmarks/NOTES.md#packed-prefill): a step's decode rows and a prompt cannot share a call.
Everything else in a decoder works token by token. So the graph runs its tokens as one row [1, N, hidden]
(N = the decode group's tokens, then the prompt group's; one row, so that a projection is one GEMM of N rows) and
splits them only where rows meet:

    input_ids [B,S] ──────────┐
    prompt.input_ids [Bp,Sp] ─ Concat as [1,N] ─ embedding ─> [1,N,H] ─...─ per token: norms, projections (the
                                                                            weights read once for all N), LoRA
                                                                            (two groups, below), activations
    q,k,v [1,N,·] ─Split(B·S, Bp·Sp)─┬─ [B,S,·]   GroupQueryAttention(past_key_values.*,        attention_mask)─┐
                                     └─ [Bp,Sp,·] GroupQueryAttention(prompt.past_key_values.*, prompt.attention_mask)
                                                                                       Concat ─> [1,N,·] ─...─┘
    LoRA:  x [1,N,in] ─ tokens by slot (adapter_gather ...) ─ lora_A, lora_B ───────────── [D rows] ─┐
                      └ tokens by slot (prompt.adapter_gather, + B·S) ─ prompt.lora_A, prompt.lora_B [P rows] ┴ Concat
                         ─ Gather(adapter_scatter ++ prompt.adapter_scatter + D rows) ─> [1,N,out]

The LoRA rows are tokens (axis 1): the engine groups a run's tokens by slot, a prompt row's tokens with its slot.
The logits rows are flat token positions, the prompt group's after the decode group's. Every prompt input has a
default (one token over no past, rank-0 LoRA, its grouping of one), so a run that binds only the first group is
the graph's run as before plus one scratch token. The prompt group's LoRA inputs are the pool's buffers bound a
second time (a view of the slots its tokens use), so a prompt's adapter need not sit next to the decode rows' ones.

What it costs every run: the scratch token, and the Concat of the two groups' LoRA results (a copy of every
module's LoRA output, N rows): measured in benchmarks/NOTES.md#unified-steps, which is why the engine builds it
only when asked (`Engine(unified_steps=True)`, `serve --unified-steps`).

`add_prompt_group` leaves a graph whose form it does not know (no GroupQueryAttention, the mask or the token ids read
by anything but the attention lengths and the embedding, DoRA inputs) unchanged: the engine then runs a step's
prompt work apart, as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from ortlora.naming import is_lora_a
from ortlora.runtime import multi_lora
from ortlora.runtime.bindings import Binding, ort_value

if TYPE_CHECKING:
    from ortlora.runtime.engine import Engine, Row

PROMPT = "prompt."  # the prompt group's inputs and outputs: the decode group's names with this prefix
GQA = "GroupQueryAttention"


def prompt_name(name: str) -> str:
    return PROMPT + name


def add_prompt_group(proto: onnx.ModelProto) -> bool:
    """Give the engine's graph (combined.engine_model, with `logits_rows`) a prompt group; False, graph unchanged,
    where its form is not the one this knows."""
    g = proto.graph
    inputs = {i.name: i for i in g.input}
    init = {t.name: t for t in g.initializer}
    if not {"input_ids", "attention_mask", "logits_rows"} <= inputs.keys() or any(
            name.startswith(multi_lora.ROW_SLOT) for name in inputs):
        return False
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in g.node:
        for k, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, k))
    attention = [n for n in g.node if n.op_type == GQA]
    if not attention or any(not _known_attention(n, init) for n in attention):
        return False
    if any(n.op_type not in ("Gather", "GatherBlockQuantized") or k != 1 for n, k in consumers.get("input_ids", [])):
        return False
    mask_nodes = _mask_nodes(g, consumers, init)
    if mask_nodes is None:
        return False
    past_inputs = {name for n in attention for name in n.input[3:5]}
    if not past_inputs <= inputs.keys() or any(
            n.op_type != GQA for name in past_inputs for n, _ in consumers.get(name, [])):
        return False
    lora = _lora_nodes(g, consumers, inputs)
    if lora is None:
        return False

    b = _Builder(g)
    # -- one row of tokens: both groups' ids as [1, N] ----------------------------------------------------------
    ids_p = b.input(prompt_name("input_ids"), inputs["input_ids"], np.zeros((1, 1), np.int64))
    mask_p = b.input(prompt_name("attention_mask"), inputs["attention_mask"], np.ones((1, 1), np.int64))
    row = b.const("unified/row", np.array([1, -1], np.int64))
    ids_all = b.op("Concat", [b.op("Reshape", ["input_ids", row], "unified/ids_d"),
                              b.op("Reshape", [ids_p, row], "unified/ids_p")], "unified/ids", axis=1)
    for node, k in consumers.get("input_ids", []):
        node.input[k] = ids_all
    n_d = b.op("Reshape", [b.op("Size", ["input_ids"], "unified/n_d"), b.const("unified/one", np.array([1], np.int64))],
               "unified/n_d1")
    n_p = b.op("Reshape", [b.op("Size", [ids_p], "unified/n_p"), "unified/one"], "unified/n_p1")
    split = b.op("Concat", [n_d, n_p], "unified/split", axis=0)
    minus_one = b.const("unified/minus_one", np.array([-1], np.int64))
    shape_d = b.op("Concat", [b.op("Shape", ["input_ids"], "unified/shape_d0"), minus_one], "unified/shape_d", axis=0)
    shape_p = b.op("Concat", [b.op("Shape", [ids_p], "unified/shape_p0"), minus_one], "unified/shape_p", axis=0)
    tokens = b.const("unified/tokens", np.array([1, -1, 0], np.int64))  # [rows, S, X] -> [1, rows·S, X]

    # -- the attention lengths of the prompt group: the mask's nodes again, over prompt.attention_mask ----------
    renamed = {"attention_mask": mask_p}
    for node in mask_nodes:
        clone = onnx.NodeProto()
        clone.CopyFrom(node)
        clone.name = prompt_name(node.name)
        clone.input[:] = [renamed.get(x, x) for x in node.input]
        clone.output[:] = [renamed.setdefault(o, prompt_name(o)) if o else o for o in node.output]
        b.nodes.append(clone)

    # -- attention: one call per group ---------------------------------------------------------------------------
    for node in attention:
        parts_d, parts_p = [], []
        for k in range(3):
            x = node.input[k] if k < len(node.input) else ""
            if not x:
                parts_d.append(x)
                parts_p.append(x)
                continue
            d, p = b.op("Split", [x, split], f"{x}/unified_split", outputs=2, axis=1)
            parts_d.append(b.op("Reshape", [d, shape_d], f"{x}/unified_d"))
            parts_p.append(b.op("Reshape", [p, shape_p], f"{x}/unified_p"))
        prompt = onnx.NodeProto()
        prompt.CopyFrom(node)
        prompt.name = prompt_name(node.name)
        extra = list(node.input[3:])
        for k, name in enumerate(extra):
            if name in inputs:  # the past
                extra[k] = b.input(prompt_name(name), inputs[name], _empty_past(inputs[name]))
            else:
                extra[k] = renamed.get(name, name)
        prompt.input[:] = parts_p + extra
        out_d, out_p = f"{node.output[0]}/unified_d", f"{node.output[0]}/unified_p"
        prompt.output[:] = [out_p] + [prompt_name(o) if o else o for o in node.output[1:]]
        for o in node.output[1:]:
            if o:
                b.output(prompt_name(o), o)
        joined = node.output[0]
        node.input[:3] = parts_d
        node.output[0] = out_d
        b.nodes.append(prompt)
        b.op("Concat", [b.op("Reshape", [out_d, tokens], f"{joined}/unified_rows_d"),
                        b.op("Reshape", [out_p, tokens], f"{joined}/unified_rows_p")], joined, axis=1, name=joined)

    # -- LoRA: the prompt group's rows meet their own view of the pool --------------------------------------------
    if not lora.modules:
        b.finish()
        return True
    scatters, grouped_p = {}, {}
    for idx in lora.classes:  # per module class, the prompt group's grouping beside the decode group's
        group = [b.input(prompt_name(name), inputs[name], default)
                 for name, default in zip(idx.grouping, _group_defaults())]
        gather_p = b.op("Add", [group[0], n_d], f"unified/gather_p{idx.gather}")
        d_rows = b.op("Reshape", [b.op("Size", [idx.gather], f"unified/d_rows0{idx.gather}"), "unified/one"],
                      f"unified/d_rows{idx.gather}")
        shifted = b.op("Add", [group[1], d_rows], f"unified/sp{idx.gather}")
        scatters[idx.scatter] = b.op("Concat", [idx.scatter, shifted], f"unified/scatter{idx.gather}", axis=0)
        for gather, reshape in lora.groupings:
            if gather.input[1] == idx.gather:
                x = gather.input[0]
                rows = b.op("Gather", [x, gather_p], f"{reshape.output[0]}/unified_rows", axis=1)
                grouped_p[reshape.output[0]] = b.op("Reshape", [rows, group[2]], f"{reshape.output[0]}/unified")
    for node, _ in lora.groupings:  # the LoRA rows are tokens: axis 1 of [1, N, in]
        _set_axis(node, 1)
    for a, live, bb, ungroup, scatter_node in lora.modules:
        a_p = b.input(prompt_name(a.input[1]), inputs[a.input[1]], numpy_helper.to_array(init[a.input[1]]))
        b_p = b.input(prompt_name(bb.input[1]), inputs[bb.input[1]], numpy_helper.to_array(init[bb.input[1]]))
        h = b.op("MatMul", [grouped_p[a.input[0]], a_p], f"{a.name}/unified_p")
        h = b.op("Where", [prompt_name(live.input[0]), h, live.input[2]], f"{live.name}/unified_p")
        res = b.op("Reshape", [b.op("MatMul", [h, b_p], f"{bb.name}/unified_p"), tokens], f"{ungroup.name}/unified_p")
        ungroup.input[1] = tokens  # [S, G, out] -> [1, S·G, out], whatever S·G: adapter_ungroup_shape is not read
        scatter_node.input[:] = [b.op("Concat", [ungroup.output[0], res], f"{ungroup.name}/unified_both", axis=1),
                                 scatters[scatter_node.input[1]]]
        _set_axis(scatter_node, 1)
    b.finish()
    return True


def _known_attention(node: onnx.NodeProto, init: dict) -> bool:
    """A GroupQueryAttention whose inputs after total_sequence_length (the rotary caches, ...) are initializers or
    absent: nothing else per row that the prompt group would need its own of."""
    return node.domain == "com.microsoft" and len(node.input) >= 7 and all(
        not x or x in init for x in node.input[7:])


def _mask_nodes(g: onnx.GraphProto, consumers: dict, init: dict) -> list[onnx.NodeProto] | None:
    """The nodes computing attention lengths from `attention_mask` (in graph order), if they read nothing else
    at run time and only GroupQueryAttention's seqlens_k / total_sequence_length read them; else None."""
    made: set[str] = {"attention_mask"}
    nodes, ids = [], set()
    for node in g.node:
        if node.op_type == GQA or not any(x in made for x in node.input):
            continue
        if any(x and x not in made and x not in init and not _constant(g, x) for x in node.input):
            return None
        nodes.append(node)
        ids.add(id(node))
        made.update(o for o in node.output if o)
    if made & {o.name for o in g.output}:
        return None
    for name in made:
        for node, k in consumers.get(name, []):
            if id(node) in ids:
                continue
            if node.op_type != GQA or k not in (5, 6):
                return None
    return nodes


def _constant(g: onnx.GraphProto, name: str) -> bool:
    return any(n.op_type == "Constant" and name in n.output for n in g.node)


class _Lora:
    def __init__(self):
        self.classes: list[multi_lora.IndexNames] = []  # the module classes' index inputs
        self.groupings: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []  # Gather(x, adapter_gather.k), its Reshape
        self.modules: list[tuple] = []  # (MatMul A, Where live, MatMul B, ungroup Reshape, scatter Gather)


def _lora_nodes(g: onnx.GraphProto, consumers: dict, inputs: dict) -> _Lora | None:
    """The mixed graph's LoRA paths (multi_lora.py): none for a model without LoRA inputs; None for another form."""
    lora = _Lora()
    k = 0
    while multi_lora.index_names(k).gather in inputs:
        lora.classes.append(multi_lora.index_names(k))
        k += 1
    if not lora.classes:
        return lora
    for idx in lora.classes:
        for node, pos in consumers.get(idx.gather, []):
            nxt = consumers.get(node.output[0], [])
            if node.op_type != "Gather" or pos != 1 or len(nxt) != 1 or nxt[0][0].op_type != "Reshape":
                return None
            lora.groupings.append((node, nxt[0][0]))
    for gather, reshape in lora.groupings:
        idx = next(c for c in lora.classes if c.gather == gather.input[1])
        for a, pos in consumers.get(reshape.output[0], []):
            live = _only(consumers, a.output[0])  # Where(adapter_group_live, A's product, 0)
            if live is None or live.op_type != "Where" or live.input[0] != idx.live:
                return None
            b = _only(consumers, live.output[0])
            ungroup = _only(consumers, b.output[0]) if b is not None else None
            scatter = _only(consumers, ungroup.output[0]) if ungroup is not None else None
            if (a.op_type != "MatMul" or pos != 0 or b is None or b.op_type != "MatMul" or ungroup is None
                    or ungroup.input[1] != idx.ungroup_shape or scatter is None
                    or list(scatter.input) != [ungroup.output[0], idx.scatter]
                    or a.input[1] not in inputs or b.input[1] not in inputs):
                return None
            lora.modules.append((a, live, b, ungroup, scatter))
    return lora if lora.modules else None  # pool inputs that no LoRA path reads: not this graph


def _only(consumers: dict, name: str):
    found = consumers.get(name, [])
    return found[0][0] if len(found) == 1 else None


def _set_axis(node: onnx.NodeProto, axis: int) -> None:
    for attr in node.attribute:
        if attr.name == "axis":
            attr.i = axis
            return
    node.attribute.append(helper.make_attribute("axis", axis))


def _group_defaults() -> list[np.ndarray]:
    """The prompt group's row grouping when it is the scratch token: one row, one slot (the rank-0 defaults)."""
    return [np.zeros(1, np.int64), np.zeros(1, np.int64), np.array([1, -1, 0], np.int64), np.ones((1, 1, 1), bool)]


def rank0_values(lora_inputs: dict, dtype: np.dtype) -> dict[str, ort.OrtValue]:
    """Per LoRA input, one slot at rank 0 (A [1, in, 0], B [1, 0, out]): what a unified step binds to the prompt
    group's LoRA inputs its adapters do not have."""
    return {li.name: ort_value(np.zeros((1, li.shape[0], 0) if is_lora_a(k) else (1, 0, li.shape[1]), dtype))
            for k, li in lora_inputs.items()}


def _empty_past(vi: onnx.ValueInfoProto) -> np.ndarray:
    """[1, kv_heads, 0, head_dim] of the past's type."""
    tt = vi.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in tt.shape.dim]
    return np.zeros([1, dims[1], 0, dims[3]], helper.tensor_dtype_to_np_dtype(tt.elem_type))


def _prompt_value_info(name: str, like: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    vi = onnx.ValueInfoProto()
    vi.CopyFrom(like)
    vi.name = name
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_param"):
            d.dim_param = prompt_name(d.dim_param)
    return vi


class _Builder:
    """New nodes, inputs (with defaults) and outputs for a graph; `finish` puts the nodes in a valid order."""

    def __init__(self, g: onnx.GraphProto):
        self.g = g
        self.nodes: list[onnx.NodeProto] = []
        self._taken = {n.name for n in g.node}

    def op(self, op_type: str, inputs: list[str], out: str, *, outputs: int = 1, name: str | None = None,
           **attrs):
        names = [out] if outputs == 1 else [f"{out}/{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=name or f"{out}/node", **attrs))
        return names[0] if outputs == 1 else names

    def const(self, name: str, value: np.ndarray) -> str:
        self.g.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def input(self, name: str, like: onnx.ValueInfoProto, default: np.ndarray) -> str:
        """A new input `name` typed as `like` (its symbolic dims the prompt group's own), with a default."""
        self.g.input.append(_prompt_value_info(name, like))
        self.g.initializer.append(numpy_helper.from_array(default, name))
        return name

    def output(self, name: str, like: str) -> None:
        self.g.output.append(_prompt_value_info(name, next(o for o in self.g.output if o.name == like)))

    def finish(self) -> None:
        """The graph's nodes and the new ones, topologically sorted (a node after everything it reads)."""
        everything = list(self.g.node) + self.nodes
        produced = {o: n for n in everything for o in n.output if o}
        done: set[int] = set()
        order: list[onnx.NodeProto] = []
        for root in everything:
            stack = [(root, False)]
            while stack:
                node, expanded = stack.pop()
                if id(node) in done:
                    continue
                if expanded:
                    done.add(id(node))
                    order.append(node)
                    continue
                stack.append((node, True))
                for x in node.input:
                    dep = produced.get(x)
                    if dep is not None and id(dep) not in done:
                        stack.append((dep, False))
        copies = [onnx.NodeProto() for _ in order]
        for c, n in zip(copies, order):
            c.CopyFrom(n)
        del self.g.node[:]
        self.g.node.extend(copies)


# -- the engine's side: a step's prompt rows bound as the prompt group (Engine.step) ---------------------------------
class PromptGroup:
    """The prompt rows of a unified step: their inputs, bound under the prompt group's names, and what is done with
    their outputs. Rows over empty slots go through a staging cache, as in `Engine._run_packed`; one row over a past
    is bound to its slot (which the step's decode rows do not bind: `Engine.mergeable`)."""

    def __init__(self, rows: Sequence[Row], ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
                 staging: dict[str, np.ndarray] | None, width: int):
        self.rows, self.ids, self.mask, self.positions, self.staging = rows, ids, mask, positions, staging
        self.adapters = [r.adapter for r in rows for _ in range(width)]  # per token: the LoRA rows are tokens

    @classmethod
    def make(cls, engine: Engine, rows: Sequence[Row]) -> PromptGroup:
        width = max(len(r.tokens) for r in rows)
        ids = np.zeros((len(rows), width), np.int64)
        if engine.packable(rows[0]):
            mask = np.zeros((len(rows), width), np.int64)
            for b, r in enumerate(rows):
                ids[b, :len(r.tokens)], mask[b, :len(r.tokens)] = r.tokens, 1
            shape = (len(rows), engine.info.kv_heads, width, engine.info.head_dim)
            staging = {name: np.empty(shape, engine.dtype) for name in engine.kv}
        else:
            ids[0] = rows[0].tokens
            mask = np.ones((1, int(engine.lengths[rows[0].slot]) + width), np.int64)
            staging = None
        positions = np.concatenate([np.arange(len(r.tokens) - r.logits, len(r.tokens)) + b * width
                                    for b, r in enumerate(rows)])
        return cls(rows, ids, mask, positions, staging, width)

    def bind(self, engine: Engine, b: Binding, slot_of: dict[int, int]) -> list[ort.OrtValue]:
        """The group's ids, mask, caches and LoRA inputs on `b`; returns the values that must outlive the run."""
        held = [ort_value(self.ids), ort_value(self.mask)]
        b.io.bind_ortvalue_input(prompt_name("input_ids"), held[0])
        b.io.bind_ortvalue_input(prompt_name("attention_mask"), held[1])
        slot = self.rows[0].slot
        for past_name, present_name in engine.info.kv_names():
            cache = self.staging[past_name] if self.staging is not None else engine.kv[past_name][slot:slot + 1]
            held.append(ort_value(cache))
            b.io.bind_ortvalue_input(prompt_name(past_name), held[-1])
            b.io.bind_ortvalue_output(prompt_name(present_name), held[-1])
        if engine.lora_inputs:
            held += self._bind_lora(engine, b, slot_of)
        return held

    def _bind_lora(self, engine: Engine, b: Binding, slot_of: dict[int, int]) -> list[ort.OrtValue]:
        """The group's own view of the pool, as `Engine.lora_run` makes a run's (the slots its tokens' adapters sit in;
        one adapter: its modules only), the other LoRA inputs at rank 0, and its grouping. The LoRA inputs are bound
        again only when that view changes."""
        lora = engine.lora_run(self.adapters, slot_of)
        if b.prompt_lora != lora.key:
            views = lora.params()
            b.prompt_held = [(n, ort_value(views[n]) if n in views else zero) for n, zero in engine.rank0.items()]
            for n, value in b.prompt_held:
                b.io.bind_ortvalue_input(prompt_name(n), value)
            b.prompt_lora = lora.key
        names = [n for k in range(len(engine.lora_classes)) for n in multi_lora.index_names(k).grouping]
        held = [ort_value(lora.feeds[n]) for n in names]
        for n, value in zip(names, held):
            b.io.bind_ortvalue_input(prompt_name(n), value)
        return held

    def finish(self, engine: Engine, logits: np.ndarray) -> list[np.ndarray]:
        """Each row's tokens are in its slot (the staging cache copied in, lengths set); per row its logits."""
        out, at = [], 0
        for b, r in enumerate(self.rows):
            n = len(r.tokens)
            if self.staging is not None:
                for name, arr in engine.kv.items():
                    arr[r.slot, :, :n] = self.staging[name][b, :, :n]
                engine.lengths[r.slot] = n
            else:
                engine.lengths[r.slot] += n
            out.append(logits[at:at + r.logits])
            at += r.logits
        return out
