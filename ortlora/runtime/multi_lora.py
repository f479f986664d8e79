"""A different adapter on every row of a batch: the mixed-adapter graph, derived from the model on disk at load time.

The adapters of a batch sit in a pool of slots, each padded to the pool's rank R. The rows are gathered into
groups, one per slot in use (padded to the largest group G), and each group meets only its own slot's weights in
one batched MatMul, which reads the weights where they lie:

    x [B,T,in] ─MatMul(W)──────────────────────────────────────────────────────────────────────────┐
       │                                                                                            Add ─> y
       └─Gather(adapter_gather)─Reshape(adapter_group_shape)─MatMul(lora_A)─MatMul(lora_B)─┐
         [S·G,T,in]             [S,G·T,in]                   [S,in,R]       [S,R,out]       │
                           Gather(adapter_scatter) <─ Reshape(adapter_ungroup_shape) <──────┘
                           [B,T,out]: each row back from its group

What each row b (adapter slot s[b]; slot 0 is all zeros, for rows without an adapter) reads and writes, in every
LoRA module:

    y[b] = x[b] @ W + (x[b] @ lora_A[s[b]]) @ lora_B[s[b]]        lora_A [slots, in, R], lora_B [slots, R, out]

A model exported with DoRA inputs also scales each row by its slot's factor before the bias (ones for LoRA
adapters and slot 0), gathered per row from a [slots, out] pool buffer:

    y[b] = (x[b] @ W + (x[b] @ lora_A[s[b]]) @ lora_B[s[b]]) * dora_scale[s[b]] (+ bias)

       y ─Mul─> ...           dora_scale [S,out] ─Gather(adapter_row_slot [B])─Unsqueeze(1)─> [B,1,out] ─┘

Each step reads every slot in use once and multiplies each row by its own slot alone (the designs measured against
this one: benchmarks/NOTES.md#mixed-adapter-graph). Slots are the first axis of one buffer per input, so a run of slots
is a contiguous view: a step binds only the slots in use, and placing an adapter copies it alone. The buffers and
the row grouping live in pool.py (`AdapterPool`); which adapter sits in which slot is decided by the adapters' owner
(ortlora.runtime.adapters.Adapters), through the pool.

The weights stay in the folder's external data file: the derived graph is handed to onnxruntime as bytes with the
folder as the external data path, so the folder itself is unchanged (and still loads in onnxruntime-genai).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper

from ortlora.adapters.validate import LoraInput
from ortlora.naming import is_dora_scale, is_lora_a
from ortlora.errors import ModelError

GATHER, SCATTER, ROW_SLOT = "adapter_gather", "adapter_scatter", "adapter_row_slot"
GROUP_SHAPE, UNGROUP_SHAPE = "adapter_group_shape", "adapter_ungroup_shape"
SLOTS_DIM, RANK_DIM = "adapter_slots", "adapter_pool_rank"


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
    if GATHER in {i.name for i in graph.input}:
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
    inputs += [helper.make_tensor_value_info(GATHER, TensorProto.INT64, ["adapter_group_rows"]),
               helper.make_tensor_value_info(SCATTER, TensorProto.INT64, ["batch_size"]),
               helper.make_tensor_value_info(GROUP_SHAPE, TensorProto.INT64, [3]),
               helper.make_tensor_value_info(UNGROUP_SHAPE, TensorProto.INT64, [3])]
    if dora_names:
        inputs.append(helper.make_tensor_value_info(ROW_SLOT, TensorProto.INT64, ["batch_size"]))
    del graph.input[:]
    graph.input.extend(inputs)

    nodes, consumed, grouped = [], set(), {}
    for node in graph.node:
        lora = [(i, name) for i, name in enumerate(node.input) if name in names]
        if not lora:
            nodes.append(node)
            continue
        name = lora[0][1]
        if name in dora_names and node.op_type == "Mul" and len(lora) == 1 and lora[0][0] == 1:
            consumed.add(name)  # each row's factor: its slot's row of the pool buffer
            rows, per_row = f"{name}/rows", f"{name}/per_row"
            nodes += [helper.make_node("Gather", [name, ROW_SLOT], [rows], name=f"{name}/gather", axis=0),
                      helper.make_node("Unsqueeze", [rows, _ONE_AXIS], [per_row], name=f"{name}/unsqueeze")]
            node.input[1] = per_row
            nodes.append(node)
            continue
        if node.op_type != "MatMul" or len(lora) != 1 or lora[0][0] != 1:
            raise ModelError(f"{model_path}: node {node.name!r} ({node.op_type}) uses LoRA input {name} in a way "
                             "the mixed-adapter graph does not know (a MatMul by the weight was expected)")
        consumed.add(name)
        if name in a_names:  # group the rows once per distinct input (q, k and v share theirs)
            x = node.input[0]
            if x not in grouped:
                rows, grouped[x] = f"{x}/adapter_rows", f"{x}/adapter_groups"
                nodes += [helper.make_node("Gather", [x, GATHER], [rows], name=f"{x}/adapter_gather", axis=0),
                          helper.make_node("Reshape", [rows, GROUP_SHAPE], [grouped[x]], name=f"{x}/adapter_group")]
            node.input[0] = grouped[x]
            nodes.append(node)
        else:  # and put each row's result back in its place
            out, by_group, by_row = node.output[0], f"{name}/groups", f"{name}/rows"
            node.output[0] = by_group
            nodes += [node,
                      helper.make_node("Reshape", [by_group, UNGROUP_SHAPE], [by_row], name=f"{name}/ungroup"),
                      helper.make_node("Gather", [by_row, SCATTER], [out], name=f"{name}/scatter", axis=0)]
    missing = names - consumed
    if missing:
        raise ModelError(f"{model_path}: LoRA inputs not used by any node: {', '.join(sorted(missing))}")
    del graph.node[:]
    graph.node.extend(nodes)
    if dora_names:
        graph.initializer.append(onnx.numpy_helper.from_array(np.array([1], np.int64), _ONE_AXIS))
    return proto


_ONE_AXIS = "adapter_axis_1"  # Unsqueeze's axes: [B, out] -> [B, 1, out]

