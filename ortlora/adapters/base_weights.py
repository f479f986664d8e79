"""The base weights of an exported model's LoRA modules, as Hugging Face [out, in] float32 (what DoRA's norms need).

    weights = BaseWeights("onnx_dir")
    w = weights("model.layers.0.self_attn.q_proj")     # [out, in]; int4 weights dequantized by onnxruntime itself

A float weight is export's `<module>.MatMul.weight` [in, out]; an int4 one is the `<module>/MatMulNBits` node's
inputs, dequantized by running that node on an identity matrix, so the values are exactly the ones the model
multiplies by (whatever packing or zero points the quantizer chose); an int8 one (`<module>/MatMulIntegerToFloat`)
is its codes times its per-column scales.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ortlora.errors import AdapterError
from ortlora.model_folder import MODEL_FILE, load_model_proto


class BaseWeights:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.proto = load_model_proto(self.folder)
        self.nodes = {n.name: n for n in self.proto.graph.node}
        self.tensors = {t.name: t for t in self.proto.graph.initializer}

    def __call__(self, module: str) -> np.ndarray:
        node = self.nodes.get(f"{module}/MatMul")
        if node is not None and node.input[1] in self.tensors:
            return np.ascontiguousarray(self._array(node.input[1]).astype(np.float32).T)  # [in, out] -> [out, in]
        node = self.nodes.get(f"{module}/MatMulNBits")
        if node is not None:
            return self._dequantize(node)
        node = self.nodes.get(f"{module}/MatMulIntegerToFloat")
        if node is not None:  # inputs: x codes, W codes [in, out], x scale, W scales [out], x zero point
            codes, scales = self._array(node.input[1]), self._array(node.input[3])
            return np.ascontiguousarray((codes.astype(np.float32) * scales.astype(np.float32)).T)
        raise AdapterError(f"{self.folder / MODEL_FILE}: no base weight of {module} (a MatMul, MatMulNBits or "
                           f"MatMulIntegerToFloat node named {module}/<op>, as ortlora's export and quantize write, "
                           "was expected)")

    def _array(self, name: str) -> np.ndarray:
        from onnx import numpy_helper
        from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

        t = self.tensors[name]
        if uses_external_data(t):
            load_external_data_for_tensor(t, str(self.folder))
        return numpy_helper.to_array(t)

    def _dequantize(self, node) -> np.ndarray:
        """W [out, in] = MatMulNBits(I_K) transposed: onnxruntime's own dequantization."""
        import onnxruntime as ort
        from onnx import TensorProto, helper

        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        k, n = int(attrs["K"]), int(attrs["N"])
        consts = [self._array(name) for name in node.input[1:] if name]
        elem = helper.np_dtype_to_tensor_dtype(consts[1].dtype)  # the scales' dtype is the node's float type
        inputs = [helper.make_tensor_value_info("x", elem, [k, k])]
        names = ["x"] + [f"c{i}" for i in range(len(consts))]
        inits = [helper.make_tensor(f"c{i}", helper.np_dtype_to_tensor_dtype(c.dtype), c.shape, c.tobytes(), raw=True)
                 for i, c in enumerate(consts)]
        attrs["accuracy_level"] = 0  # float arithmetic: an identity input returns the dequantized values exactly
        graph = helper.make_graph(
            [helper.make_node("MatMulNBits", names, ["y"], domain="com.microsoft", **attrs)], "dequantize", inputs,
            [helper.make_tensor_value_info("y", elem, [k, n])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = min(model.ir_version, 10)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        eye = np.eye(k, dtype=consts[1].dtype)
        if elem == TensorProto.FLOAT16:
            eye = eye.astype(np.float16)
        return np.ascontiguousarray(session.run(None, {"x": eye})[0].astype(np.float32).T)
