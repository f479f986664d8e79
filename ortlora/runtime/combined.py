"""The one model the engine loads: the mixed-adapter graph (multi_lora.py) serves every run, so that one session
holds one copy of the weights whatever mixes of adapters run.

Two sessions over one folder (the exported graph for single-adapter runs, the mixed graph for mixed ones) each
pre-pack their own copy of the weights (benchmarks/NOTES.md#one-session). In the mixed graph a run with one adapter
binds the one pool slot it sits in, and a run without one binds nothing: every pool input gets a rank-0 default
here ([1, in, 0] / [1, 0, out]), as the exported graph's LoRA inputs have (binding all of them each run costs time,
benchmarks/NOTES.md#engine-step-costs).

The LM head reads only the positions a run asks for (`gather_logits_rows`): a packed prefill of several prompts needs
each row's last position, a prompt being scored every position of its own, a chunk in the middle of a prompt none.

The model goes to onnxruntime as bytes, its external data found from the folder the data files really lie in
(`relocate_external_data`): a folder of symlinks (the Hugging Face cache's layout) loads too, and the folder on disk
stays as exported (onnxruntime-genai loads it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ortlora.errors import ModelError
from ortlora.model_folder import LoraInput
from ortlora.naming import is_dora_scale, is_lora_a
from ortlora.runtime import multi_lora


LOGITS_ROWS = "logits_rows"  # int64 [N]: flat positions (row * width + position) whose logits a run computes
_CAP_OPS = ("Identity", "Mul", "Div", "Tanh")  # between the LM head's MatMul and `logits` (gemma2's soft-capping)
_HEAD_OPS = ("MatMul", "FusedMatMul", "MatMulNBits", "MatMulIntegerToFloat")


def engine_model(model_path: str | Path, lora_inputs: Mapping[str, LoraInput]) -> onnx.ModelProto:
    """The graph the engine runs: for a model with LoRA inputs, the mixed-adapter graph of `model_path` with a
    rank-0, one-slot default for every pool input; the LM head on the positions `logits_rows` names where the head
    can be found (weights external)."""
    if not lora_inputs:
        proto = onnx.load(str(model_path), load_external_data=False)
        gather_logits_rows(proto)
        return proto
    proto = multi_lora.mixed_adapter_model(model_path, lora_inputs)
    gather_logits_rows(proto)
    graph = proto.graph
    pool = {li.name for li in lora_inputs.values()}
    # each module's rank keeps its own symbol, as in the exported graph (probe runs bind an adapter's own ranks, rank
    # 0 where it lacks a module; one shared symbol lets onnxruntime reuse a buffer sized for another)
    rank_axis = {li.name: (2, li.shape[1]) if is_lora_a(key) else (1, li.shape[0]) for key, li in lora_inputs.items()}
    for vi in graph.input:
        axis, symbol = rank_axis.get(vi.name, (None, None))
        if isinstance(symbol, str):
            vi.type.tensor_type.shape.dim[axis].dim_param = symbol
    have = {t.name for t in graph.initializer}
    dora = {li.name for key, li in lora_inputs.items() if is_dora_scale(key)}
    graph.initializer.extend(numpy_helper.from_array(_empty(vi, vi.name in dora), vi.name) for vi in graph.input
                             if vi.name in pool and vi.name not in have)
    return proto


def gather_logits_rows(proto: onnx.ModelProto) -> bool:
    """Feed the LM head only the positions named by a new input `logits_rows`; False (graph unchanged) when the head
    is not where an exported decoder puts it.

        x [B,S,H] ─Flatten(axis 2)─> [B·S,H] ─Gather(logits_rows [N])─> [N,H] ─Unsqueeze(1)─> [N,1,H] ─head─> logits

    Row n of the logits [N, 1, vocab] is position logits_rows[n] = b·S + s of the run. The Slice of the last
    `num_logits_to_keep` positions it replaces goes, with that input. An int8 head (MatMulIntegerToFloat) quantizes
    its input per row: the rows are picked before its quantization nodes, which then see only them."""
    graph = proto.graph
    producer = {o: n for n in graph.node for o in n.output}
    node = producer.get("logits")
    while node is not None and node.op_type in _CAP_OPS:
        node = producer.get(node.input[0])
    if node is None or node.op_type not in _HEAD_OPS or LOGITS_ROWS in {i.name for i in graph.input}:
        return False
    x = node.input[0]
    if node.op_type == "MatMulIntegerToFloat":  # int8: the row-quantized activation; its float rows are picked
        quantize = producer.get(x)
        if quantize is None or quantize.op_type != "QuantizeLinear":
            return False
        x = quantize.input[0]
    path = _ancestors(node, producer) | {id(node)}
    sliced = producer.get(x)
    if sliced is not None and sliced.op_type == "Slice":
        source = sliced.input[0]
    else:
        source = x
    readers = [n for n in graph.node if id(n) in path and x in n.input]
    flat, rows, picked = "logits_rows/flat", "logits_rows/rows", "logits_rows/picked"
    at = min(list(graph.node).index(n) for n in readers)
    graph.node.insert(at, helper.make_node("Unsqueeze", [rows, "logits_rows/axis"], [picked], name=picked))
    graph.node.insert(at, helper.make_node("Gather", [flat, LOGITS_ROWS], [rows], name=rows, axis=0))
    graph.node.insert(at, helper.make_node("Flatten", [source], [flat], name=flat, axis=2))
    for n in readers:
        n.input[:] = [picked if i == x else i for i in n.input]
    graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "logits_rows/axis"))
    graph.input.append(helper.make_tensor_value_info(LOGITS_ROWS, onnx.TensorProto.INT64, ["logits_rows"]))
    _drop_dead(graph)
    for out in graph.output:
        if out.name == "logits":
            dims = out.type.tensor_type.shape.dim
            dims[0].dim_param, dims[1].dim_value = "logits_rows", 1
    return True


def _ancestors(node: onnx.NodeProto, producer: dict) -> set[int]:
    """ids of the nodes `node` reads from, directly or not."""
    seen: set[int] = set()
    stack = [node]
    while stack:
        for i in stack.pop().input:
            dep = producer.get(i)
            if dep is not None and id(dep) not in seen:
                seen.add(id(dep))
                stack.append(dep)
    return seen


def _drop_dead(graph: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nothing reads, then inputs and initializers nothing reads."""
    outputs = {o.name for o in graph.output}
    while True:
        read = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in read for o in n.output if o)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    read = {i for n in graph.node for i in n.input} | outputs
    for field in (graph.input, graph.initializer):
        for item in [x for x in field if x.name not in read]:
            field.remove(item)


def _empty(vi: onnx.ValueInfoProto, dora: bool) -> np.ndarray:
    """[1, in, 0] for [slots, in, R], [1, 0, out] for [slots, R, out]; a DoRA factor [slots, out]: [1, out] of ones."""
    tt = vi.type.tensor_type
    shape = [1] + [d.dim_value if d.HasField("dim_value") else 0 for d in tt.shape.dim[1:]]
    return (np.ones if dora else np.zeros)(shape, helper.tensor_dtype_to_np_dtype(tt.elem_type))


def relocate_external_data(proto: onnx.ModelProto, folder: Path) -> Path:
    """Point `proto`'s external data at the files the folder's entries resolve to, relative to the directory that
    holds them all, and return that directory (onnxruntime refuses, for a model given as bytes, a data path that
    leaves the folder it is told, and a symlink's target does)."""
    tensors = [t for t in _tensors(proto.graph) if t.data_location == onnx.TensorProto.EXTERNAL]
    if not tensors:
        return folder.resolve()
    targets = {}
    for t in tensors:
        entry = next((e for e in t.external_data if e.key == "location"), None)
        if entry is None:
            raise ModelError(f"{folder}: weight {t.name} is external but names no file")
        if entry.value not in targets:
            path = (folder / entry.value).resolve()
            if not path.is_file():
                raise ModelError(f"{folder}: weight {t.name}'s data file {entry.value} is missing")
            targets[entry.value] = path
    root = Path(os.path.commonpath([p.parent for p in targets.values()]))
    for t in tensors:
        for e in t.external_data:
            if e.key == "location":
                e.value = targets[e.value].relative_to(root).as_posix()
    return root


def _tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            for sub in [attr.g, *attr.graphs] if attr.HasField("g") else attr.graphs:
                yield from _tensors(sub)
