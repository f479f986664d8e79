"""A different adapter on every row of a batch: the mixed-adapter graph, derived from the model on disk at load time.

The adapters of a batch sit in a pool of slots, each padded to the pool's rank R. The rows are gathered into
groups, one per slot in use (padded to the largest group G), and each group meets only its own slot's weights in
one batched MatMul, which reads the weights where they lie:

    x [B,T,in] ─MatMul(W)───────────────────────────────────────────────────────────────────────────────┐
       │                                                                                               Add ─> y
       └─Gather(adapter_gather)─Reshape(adapter_group_shape)─MatMul(lora_A)─Where(live)─MatMul(lora_B)─┐
         [S·G,T,in]             [S,G·T,in]                   [S,in,R]       [S,1,1]     [S,R,out]      │
                           Gather(adapter_scatter) <─ Reshape(adapter_ungroup_shape) <─────────────────┘
                           [B,T,out]: each row back from its group

What each row b (adapter slot s[b]; slot 0 is all zeros, for rows without an adapter) reads and writes, in every
LoRA module:

    y[b] = x[b] @ W + (x[b] @ lora_A[s[b]]) @ lora_B[s[b]]        lora_A [slots, in, R], lora_B [slots, R, out]

Rows at slot 0 add nothing, so they are not computed one by one: slot 0's group holds one of them, every such row
reads that one's result, and the group is not live (`adapter_group_live` False: its [G·T, R] product replaced by
zeros, so that one row's non-finite activations cannot reach the others as 0 x inf). Otherwise slot 0 would take every
row whose adapter lacks a class, and every group of the class would be padded to that many rows.

A model exported with DoRA inputs also scales each row by its slot's factor before the bias (ones for LoRA
adapters and slot 0), gathered per row from a [slots, out] pool buffer:

    y[b] = (x[b] @ W + (x[b] @ lora_A[s[b]]) @ lora_B[s[b]]) * dora_scale[s[b]] (+ bias)

       y ─Mul─> ...           dora_scale [S,out] ─Gather(adapter_row_slot [B])─Unsqueeze(1)─> [B,1,out] ─┘

Each step reads every slot in use once and multiplies each row by its own slot alone (the designs measured against
this one: benchmarks/NOTES.md#mixed-adapter-graph). Slots are the first axis of one buffer per input, so a run of slots
is a contiguous view: a step binds only the slots in use, and placing an adapter copies it alone. The buffers and
the row grouping live in pool.py (`AdapterPool`); which adapter sits in which slot is decided by the adapters' owner
(ortlora.runtime.adapters.Adapters), through the pool.

The LoRA modules fall into classes, one per block of a layer (`module_classes`: `self_attn`, `mlp`, ...), and each
class has its own slots and its own index inputs (`index_names(k)`: `adapter_gather.k`, ...). An adapter takes a
slot only in the classes it has modules in, so a step binds, per class, only the slots of the adapters that have
it: an attention-only adapter is not read (nor multiplied, at the pool's rank) for the MLP. A row whose adapter lacks a
class meets that class's slot 0.

The weights stay in the folder's external data file: the derived graph is handed to onnxruntime as bytes with the
folder as the external data path, so the folder itself is unchanged (and still loads in onnxruntime-genai).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper

from ortlora.adapters.validate import LoraInput
from ortlora.naming import is_dora_scale, is_lora_a, parse_input_name
from ortlora.errors import ModelError

GATHER, SCATTER, ROW_SLOT = "adapter_gather", "adapter_scatter", "adapter_row_slot"
GROUP_SHAPE, UNGROUP_SHAPE, LIVE = "adapter_group_shape", "adapter_ungroup_shape", "adapter_group_live"
SLOTS_DIM, RANK_DIM = "adapter_slots", "adapter_pool_rank"


class IndexNames(NamedTuple):
    """One module class's index inputs: how a run's rows meet that class's slots."""
    gather: str
    scatter: str
    group_shape: str
    ungroup_shape: str
    row_slot: str  # DoRA models only
    live: str  # per group: False where it is slot 0's (its product replaced by zeros)

    @property
    def grouping(self) -> tuple[str, str, str, str]:
        """The inputs a group of rows is bound with (the unified graph's prompt group has its own of these)."""
        return self.gather, self.scatter, self.group_shape, self.live


def index_names(k: int) -> IndexNames:
    """The index inputs of module class `k` (`module_classes`)."""
    return IndexNames(*(f"{name}.{k}" for name in (GATHER, SCATTER, GROUP_SHAPE, UNGROUP_SHAPE, ROW_SLOT, LIVE)))


def module_class(module: str) -> str:
    """The block a LoRA module belongs to, the same in every layer: its parent path without layer indices
    (`model.layers.3.self_attn.q_proj` -> `model.layers.self_attn`)."""
    return ".".join(part for part in module.split(".")[:-1] if not part.isdigit())


def module_classes(lora_inputs: Mapping[str, LoraInput]) -> list[list[str]]:
    """The keys of `lora_inputs` by module class, classes in order of first appearance (the pool's and the graph's
    class k are the same)."""
    classes: dict[str, list[str]] = {}
    for key in lora_inputs:
        parsed = parse_input_name(key)
        classes.setdefault(module_class(parsed[0] if parsed else key), []).append(key)
    return list(classes.values())


def mixed_adapter_model(model_path: str | Path, lora_inputs: Mapping[str, LoraInput]) -> onnx.ModelProto:
    """The mixed-adapter version of `model_path` (weights not loaded: they stay external)."""
    proto = onnx.load(str(model_path), load_external_data=False)
    graph = proto.graph
    a_names = {li.name for key, li in lora_inputs.items() if is_lora_a(key)}
    dora_names = {li.name for key, li in lora_inputs.items() if is_dora_scale(key)}
    b_names = {li.name for li in lora_inputs.values()} - a_names - dora_names
    names = a_names | b_names | dora_names
    if not names:
        raise ModelError(f"{model_path} has no LoRA inputs: there is nothing to mix")
    classes = module_classes(lora_inputs)
    class_of = {lora_inputs[key].name: k for k, keys in enumerate(classes) for key in keys}
    if any(i.name.startswith(GATHER) for i in graph.input):
        raise ModelError(f"{model_path} already has an {GATHER} input")
    # the rank-0 defaults go: every pool tensor is fed
    kept = [t for t in graph.initializer if t.name not in names]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    inputs = []
    for vi in graph.input:
        if vi.name in names:
            tt = vi.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim]
            if vi.name not in dora_names:  # a factor keeps its [out]
                dims = [dims[0], RANK_DIM] if vi.name in a_names else [RANK_DIM, dims[1]]
            vi = helper.make_tensor_value_info(vi.name, tt.elem_type, [SLOTS_DIM, *dims])
        inputs.append(vi)
    for k in range(len(classes)):
        idx = index_names(k)
        # each class its own symbol: its groups' rows differ from another class's (one symbol is one size)
        inputs += [helper.make_tensor_value_info(idx.gather, TensorProto.INT64, [f"adapter_group_rows.{k}"]),
                   helper.make_tensor_value_info(idx.scatter, TensorProto.INT64, ["adapter_rows"]),
                   helper.make_tensor_value_info(idx.group_shape, TensorProto.INT64, [3]),
                   helper.make_tensor_value_info(idx.ungroup_shape, TensorProto.INT64, [3]),
                   helper.make_tensor_value_info(idx.live, TensorProto.BOOL, [f"adapter_groups.{k}", 1, 1])]
        if any(class_of[name] == k for name in dora_names):
            inputs.append(helper.make_tensor_value_info(idx.row_slot, TensorProto.INT64, ["batch_size"]))
    del graph.input[:]
    graph.input.extend(inputs)

    types = {vi.name: vi.type.tensor_type.elem_type for vi in graph.input}
    zero_of = {name: f"{ZERO}.{types[name]}" for name in a_names}
    nodes, consumed, grouped = [], set(), {}
    for node in graph.node:
        lora = [(i, name) for i, name in enumerate(node.input) if name in names]
        if not lora:
            nodes.append(node)
            continue
        name = lora[0][1]
        idx = index_names(class_of[name])
        if name in dora_names and node.op_type == "Mul" and len(lora) == 1 and lora[0][0] == 1:
            consumed.add(name)  # each row's factor: its slot's row of the pool buffer
            rows, per_row = f"{name}/rows", f"{name}/per_row"
            nodes += [helper.make_node("Gather", [name, idx.row_slot], [rows], name=f"{name}/gather", axis=0),
                      helper.make_node("Unsqueeze", [rows, _ONE_AXIS], [per_row], name=f"{name}/unsqueeze")]
            node.input[1] = per_row
            nodes.append(node)
            continue
        if node.op_type != "MatMul" or len(lora) != 1 or lora[0][0] != 1:
            raise ModelError(f"{model_path}: node {node.name!r} ({node.op_type}) uses LoRA input {name} in a way "
                             "the mixed-adapter graph does not know (a MatMul by the weight was expected)")
        consumed.add(name)
        if name in a_names:  # group the rows once per distinct input and class (q, k and v share theirs)
            x = node.input[0]
            if (x, idx) not in grouped:
                k = class_of[name]
                rows, grouped[x, idx] = f"{x}/adapter_rows.{k}", f"{x}/adapter_groups.{k}"
                nodes += [helper.make_node("Gather", [x, idx.gather], [rows], name=rows, axis=0),
                          helper.make_node("Reshape", [rows, idx.group_shape], [grouped[x, idx]],
                                           name=grouped[x, idx])]
            node.input[0] = grouped[x, idx]
            product = node.output[0]  # [S, G·T, R]: slot 0's group (not live) zeroed
            node.output[0] = f"{product}/all"
            nodes += [node, helper.make_node("Where", [idx.live, node.output[0], zero_of[name]], [product],
                                             name=f"{name}/live")]
        else:  # and put each row's result back in its place
            out, by_group, by_row = node.output[0], f"{name}/groups", f"{name}/rows"
            node.output[0] = by_group
            nodes += [node,
                      helper.make_node("Reshape", [by_group, idx.ungroup_shape], [by_row], name=f"{name}/ungroup"),
                      helper.make_node("Gather", [by_row, idx.scatter], [out], name=f"{name}/scatter", axis=0)]
    missing = names - consumed
    if missing:
        raise ModelError(f"{model_path}: LoRA inputs not used by any node: {', '.join(sorted(missing))}")
    del graph.node[:]
    graph.node.extend(nodes)
    if dora_names:
        graph.initializer.append(onnx.numpy_helper.from_array(np.array([1], np.int64), _ONE_AXIS))
    for elem_type, zero in {types[name]: zero for name, zero in zero_of.items()}.items():
        graph.initializer.append(helper.make_tensor(zero, elem_type, [], [0]))
    return proto


_ONE_AXIS = "adapter_axis_1"  # Unsqueeze's axes: [B, out] -> [B, 1, out]
ZERO = "adapter_zero"  # per LoRA dtype: what a group that is not live gets

