"""A small ONNX graph builder that streams weights into one external data file as they are added.

Weights never accumulate in memory: each `weight()` call appends the tensor's bytes to `<model>.data` (page
aligned, so onnxruntime can memory-map them) and keeps only a TensorProto that points at them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS_DOMAIN = "com.microsoft"
OPSET = 21
_ALIGN = 4096  # page-aligned offsets let onnxruntime mmap external initializers instead of copying them
_INLINE_LIMIT = 1024  # bytes; smaller tensors stay inside model.onnx

Shape = Sequence["int | str"]


class GraphBuilder:
    def __init__(self, model_path: str | Path):
        self.model_path = Path(model_path)
        self.data_name = self.model_path.name + ".data"
        self._data = open(self.model_path.with_name(self.data_name), "wb")
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[TensorProto] = []
        self._names: dict[str, int] = {}
        self._consts: dict[tuple, str] = {}

    # -- names and values ------------------------------------------------------------------------------------
    def unique(self, base: str) -> str:
        n = self._names.get(base, 0)
        self._names[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    def op(self, op_type: str, inputs: Sequence[str], name: str, *, outputs: int | Sequence[str] = 1,
           domain: str = "", **attrs) -> str | list[str]:
        """Add one node; returns its output name (or names when `outputs` > 1 or a list)."""
        name = self.unique(name)
        outs = [f"{name}/out{i}" for i in range(outputs)] if isinstance(outputs, int) else list(outputs)
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, domain=domain, **attrs))
        return outs[0] if isinstance(outputs, int) and outputs == 1 else outs

    def const(self, value, dtype=np.int64) -> str:
        """A small constant (shapes, axes, scalars), shared by value."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self.unique(f"const/{arr.dtype.name}")
            self.initializers.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def weight(self, name: str, array: np.ndarray) -> str:
        """A named initializer; large ones go to the external data file."""
        array = np.ascontiguousarray(array)
        if array.nbytes < _INLINE_LIMIT:
            self.initializers.append(numpy_helper.from_array(array, name))
            return name
        return self.weight_from_blocks(name, array.shape, array.dtype, [array])

    def weight_from_blocks(self, name: str, shape: Sequence[int], dtype, blocks: Iterable[np.ndarray]) -> str:
        """A named external initializer of `shape` written block by block: `blocks` are consecutive slices along
        its first axis (only one of them is held at a time)."""
        dtype = np.dtype(dtype)
        tensor = TensorProto(name=name, dims=list(shape), data_type=helper.np_dtype_to_tensor_dtype(dtype))
        offset = self._data.tell()
        pad = -offset % _ALIGN
        self._data.write(b"\0" * pad)
        offset += pad
        length = 0
        for block in blocks:
            block = np.ascontiguousarray(block, dtype=dtype)
            self._data.write(memoryview(block.reshape(-1).view(np.uint8)))
            length += block.nbytes
        if length != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise ValueError(f"{name}: blocks of {length} bytes for a {list(shape)} {dtype} tensor")
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data_name), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.initializers.append(tensor)
        return name

    def input(self, name: str, elem_type: int, shape: Shape, default: np.ndarray | None = None) -> str:
        """A graph input; with `default`, also an initializer of the same name (used when the input is not fed)."""
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        if default is not None:
            self.initializers.append(numpy_helper.from_array(default, name))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: Shape) -> None:
        if value != name:
            self.op("Identity", [value], f"{name}/identity", outputs=[name])
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))

    # -- finish --------------------------------------------------------------------------------------------
    def save(self, graph_name: str = "ortlora") -> None:
        self._data.close()
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
            producer_name="ortlora",
        )
        model.ir_version = 10
        self.model_path.write_bytes(model.SerializeToString())

    def close(self) -> None:
        if not self._data.closed:
            self._data.close()


ONNX_FLOAT = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}
