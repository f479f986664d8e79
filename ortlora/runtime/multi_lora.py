"""A different adapter on every row of a batch: the mixed-adapter graph, derived from the model on disk at load time.

Every LoRA input pair of the exported graph (`<module>.lora_A.weight` [in, r], `<module>.lora_B.weight` [r, out])
becomes a stack of adapter slots, and one `adapter_ids` [batch] input picks each row's slot:

    x [B,S,in] ─MatMul(W)─────────────────────────────────────────────────────┐
       │                                                                       Add ─> y [B,S,out]
       └─MatMul(Gather(lora_A, ids)) ─ MatMul(Gather(lora_B, ids)) ───────────┘
                 [slots,in,r] -> [B,in,r]        [slots,r,out] -> [B,r,out]
          x·A: [B,S,in] @ [B,in,r] = [B,S,r]   (x·A)·B: [B,S,r] @ [B,r,out] = [B,S,out]

Slot 0 is the base model (zeros); ranks are padded with zeros to the largest in the stack and modules an adapter
does not target stay zero, so each row computes exactly its own adapter's term. The weights stay in the folder's
external data file: the derived graph is handed to onnxruntime as bytes with the folder as the external data path,
so the folder itself is unchanged (and still loads in onnxruntime-genai).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from ortlora.adapters.validate import LoraInput
from ortlora.errors import ModelError

ADAPTER_IDS = "adapter_ids"
SLOTS_DIM = "adapter_slots"


def mixed_adapter_model(model_path: str | Path, lora_inputs: Mapping[str, LoraInput]) -> onnx.ModelProto:
    """The mixed-adapter version of `model_path` (weights not loaded: they stay external)."""
    proto = onnx.load(str(model_path), load_external_data=False)
    graph = proto.graph
    names = {li.name for li in lora_inputs.values()}
    if not names:
        raise ModelError(f"{model_path} has no LoRA inputs: there is nothing to mix")
    if ADAPTER_IDS in {i.name for i in graph.input}:
        raise ModelError(f"{model_path} already has an {ADAPTER_IDS} input")
    # the rank-0 defaults go: every slot tensor is fed
    kept = [t for t in graph.initializer if t.name not in names]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    inputs = []
    for vi in graph.input:
        if vi.name in names:
            tt = vi.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim]
            vi = helper.make_tensor_value_info(vi.name, tt.elem_type, [SLOTS_DIM, *dims])
        inputs.append(vi)
    inputs.append(helper.make_tensor_value_info(ADAPTER_IDS, TensorProto.INT64, ["batch_size"]))
    del graph.input[:]
    graph.input.extend(inputs)

    gathers = []
    consumed = set()
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in names:
                rows = f"{name}/rows"
                if name not in consumed:
                    gathers.append(helper.make_node("Gather", [name, ADAPTER_IDS], [rows], name=f"{name}/gather",
                                                    axis=0))
                    consumed.add(name)
                node.input[i] = rows
    missing = names - consumed
    if missing:
        raise ModelError(f"{model_path}: LoRA inputs not used by any node: {', '.join(sorted(missing))}")
    nodes = gathers + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return proto


def stack_adapters(lora_inputs: Mapping[str, LoraInput], adapters: Sequence[Mapping[str, np.ndarray]]
                   ) -> dict[str, np.ndarray]:
    """The slot tensors for `adapters` (slot 0 = base, slot i = adapters[i - 1]), keyed by graph input name.

    A: [slots, in, r_max], B: [slots, r_max, out], r_max the largest rank of that module among the adapters.
    """
    out = {}
    for key, li in lora_inputs.items():
        is_a = key.endswith(".lora_A.weight")
        ranks = [p[li.name].shape[1 if is_a else 0] for p in adapters if li.name in p]
        r = max(ranks, default=0)
        inner = li.shape[0] if is_a else li.shape[1]
        shape = (1 + len(adapters), inner, r) if is_a else (1 + len(adapters), r, inner)
        stack = np.zeros(shape, li.dtype)
        for slot, params in enumerate(adapters, start=1):
            arr = params.get(li.name)
            if arr is None:
                continue
            if is_a:
                stack[slot, :, : arr.shape[1]] = arr
            else:
                stack[slot, : arr.shape[0], :] = arr
        out[li.name] = stack
    return out
