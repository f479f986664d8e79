"""Rewrite an exported folder's `model.onnx` with quantized base weights, one weight at a time.

    x ─MatMul(<module>.MatMul.weight [K, N])─>          x ─MatMulNBits(<module>.MatMulNBits.qweight,
                                                 ==>                 .scales[, .qzeros], K, N, bits 4, block)─>
                                                 int8: x ─[per-row quantization, once per x]─MatMulIntegerToFloat(
                                                             <module>.MatMulInteger.weight, .scales)─> (export/int8.py)
    x ─FusedMatMul(model.embed_tokens.weight, transB)─>  ==>  the same, of lm_head.* (tied LM head)
    x ─MatMul(<module>.lora_A.weight)─MatMul(<module>.lora_B.weight)─>   unchanged (B is a graph input)
    ids ─Gather(model.embed_tokens.weight)─>     ==>  (with embeddings) GatherBlockQuantized, int4
                                                      (tied) a lookup of the LM head's int4 / int8 weights

Only MatMuls whose B is an initializer named `*.MatMul.weight` and not a graph input are rewritten, so the LoRA
inputs, their rank-0 default initializers and every other tensor are copied byte for byte. Source tensors are
read through memory maps and written straight into the new `model.onnx.data` (page aligned, like export), so
peak memory is about one weight, not the model.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ortlora.errors import ModelError
from ortlora.export import int8
from ortlora.export.int4 import shared_embedding
from ortlora.quantize.algorithms import quantize_weight, quiet_onnxruntime_quantizer

MS_DOMAIN = "com.microsoft"
QUANTIZED_OPS = ("MatMulNBits", "GatherBlockQuantized", "MatMulBnb4", "MatMulInteger", "DequantizeLinear",
                 "MatMulIntegerToFloat", "DynamicQuantizeMatMul")
EMBEDDING = "model.embed_tokens.weight"
_WEIGHT_SUFFIX = ".MatMul.weight"
_ALIGN = 4096
_INLINE_LIMIT = 1024


@dataclass(frozen=True)
class Settings:
    bits: int = 4
    block_size: int = 32
    algorithm: str = "rtn"
    symmetric: bool = False
    lm_head: bool = True
    embeddings: bool = False
    accuracy_level: int = 4

    @property
    def has_zeros(self) -> bool:
        return self.algorithm == "hqq" or not self.symmetric


@dataclass
class Target:
    node: int  # index of the node it replaces
    weight: str  # initializer name
    module: str  # `model.layers.0.self_attn.q_proj`, `lm_head`, `model.embed_tokens`
    kind: str  # "matmul", "gather", or "shared" (a tied model's lookup of the int4 LM head's weights)
    shape: tuple[int, int]  # matmul: (K, N); gather: (vocab, hidden)
    transposed: bool = False  # the weight is stored [N, K] (a tied LM head: FusedMatMul transB=1 on the embedding)
    activation: str | None = None  # what the MatMul multiplies (GPTQ's statistics)


class SourceModel:
    """An exported `model.onnx`, loaded without its external data; tensors read through memory maps on demand."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / "model.onnx"
        if not self.path.is_file():
            raise ModelError(f"{self.folder} has no model.onnx")
        try:
            self.proto = onnx.load(str(self.path), load_external_data=False)
        except Exception as exc:  # onnx raises DecodeError / OSError / ValueError
            raise ModelError(f"cannot read {self.path}: {exc}") from None
        self.graph = self.proto.graph
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.input_names = {i.name for i in self.graph.input}
        self._maps: dict[str, mmap.mmap] = {}

    def quantized_nodes(self) -> list[str]:
        return [f"{n.name or n.output[0]} ({n.op_type})" for n in self.graph.node if n.op_type in QUANTIZED_OPS]

    def raw(self, t: TensorProto):
        """The tensor's bytes: a memoryview into the mapped data file for external tensors."""
        if t.data_location != TensorProto.EXTERNAL:
            return t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
        info = {e.key: e.value for e in t.external_data}
        location = info["location"]
        if location not in self._maps:
            path = self.folder / location
            if not path.is_file():
                raise ModelError(f"{self.path}: external data file {location} is missing")
            with open(path, "rb") as f:
                self._maps[location] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else len(self._maps[location]) - offset
        return memoryview(self._maps[location])[offset:offset + length]

    def release(self, t: TensorProto) -> None:
        """Drop the mapped pages of an external tensor once it is written, so resident memory stays near one
        weight instead of growing to the whole data file (the pages are file-backed: they are re-read on use)."""
        info = {e.key: e.value for e in t.external_data}
        m = self._maps.get(info.get("location", ""))
        if m is None or not hasattr(m, "madvise"):
            return
        start = int(info.get("offset", 0)) // mmap.PAGESIZE * mmap.PAGESIZE
        end = min(len(m), int(info.get("offset", 0)) + int(info.get("length", len(m))))
        if end > start:
            m.madvise(mmap.MADV_DONTNEED, start, end - start)

    def array(self, name: str) -> np.ndarray:
        t = self.initializers[name]
        if t.data_location != TensorProto.EXTERNAL:
            return numpy_helper.to_array(t)
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        return np.frombuffer(self.raw(t), dtype=dtype).reshape(tuple(t.dims))

    def data_files(self) -> set[str]:
        """Names of the external data files the model references."""
        return {e.value for t in self.graph.initializer for e in t.external_data if e.key == "location"}

    def data_bytes(self) -> int:
        """model.onnx and the external data files it references, in bytes."""
        files = [self.path, *(self.folder / name for name in self.data_files())]
        return sum(f.stat().st_size for f in files if f.is_file())

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # arrays still view the map (e.g. a traceback holds them): the GC unmaps it
                pass
        self._maps.clear()


def find_targets(src: SourceModel, settings: Settings) -> list[Target]:
    """The nodes to rewrite, ordered like their weights among the initializers (the order they are written in)."""
    found: list[Target] = []
    inits, inputs = src.initializers, src.input_names
    for i, node in enumerate(src.graph.node):
        if node.op_type == "MatMul" and len(node.input) == 2:
            name = node.input[1]
            if not name.endswith(_WEIGHT_SUFFIX) or name in inputs or name not in inits or len(inits[name].dims) != 2:
                continue  # LoRA MatMuls: their B is a graph input (with a default initializer)
            module = name.removesuffix(_WEIGHT_SUFFIX)
            found.append(Target(i, name, module, "matmul", tuple(inits[name].dims), activation=node.input[0]))
        elif node.op_type == "FusedMatMul" and _is_plain_transposed_b(node) and node.input[1] in inits \
                and node.input[1] not in inputs:
            n, k = inits[node.input[1]].dims
            found.append(Target(i, node.input[1], node.name.rsplit("/", 1)[0], "matmul", (k, n), transposed=True,
                                activation=node.input[0]))
        elif settings.embeddings and node.op_type == "Gather" and node.input[0] == EMBEDDING \
                and EMBEDDING in inits and EMBEDDING not in inputs:
            found.append(Target(i, EMBEDDING, "model.embed_tokens", "gather", tuple(inits[EMBEDDING].dims)))
    if not settings.lm_head:
        found = [t for t in found if t.module != "lm_head"]
    if settings.algorithm != "hqq" and any(t.transposed for t in found):
        # a tied model: the lookup reads the LM head's int4 / int8 weights, as export writes it (hqq's float zero
        # points are MatMulNBits-only: its lookup stays float)
        found = [t for t in found if t.kind != "gather"]
        found += [Target(i, EMBEDDING, "model.embed_tokens", "shared", tuple(inits[EMBEDDING].dims))
                  for i, node in enumerate(src.graph.node) if node.op_type == "Gather" and node.input[0] == EMBEDDING]
    order = {t.name: i for i, t in enumerate(src.graph.initializer)}
    return sorted(found, key=lambda t: (order[t.weight], t.node))


def _is_plain_transposed_b(node: onnx.NodeProto) -> bool:
    """FusedMatMul computing exactly x·Bᵀ (what export writes for a tied LM head)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return (node.domain == MS_DOMAIN and len(node.input) == 2 and attrs.get("transB", 0) == 1
            and attrs.get("transA", 0) == 0 and attrs.get("alpha", 1.0) == 1.0
            and not attrs.get("transBatchA", 0) and not attrs.get("transBatchB", 0))


class TensorWriter:
    """Appends tensors to one external data file (page aligned so onnxruntime can map them)."""

    def __init__(self, data_path: Path):
        self.location = data_path.name
        self._f = open(data_path, "wb")

    def add(self, name: str, dims, data_type: int, raw) -> TensorProto:
        t = TensorProto(name=name, dims=list(dims), data_type=data_type)
        if len(raw) < _INLINE_LIMIT:
            t.raw_data = bytes(raw)
            return t
        offset = self._f.tell()
        pad = -offset % _ALIGN
        self._f.write(b"\0" * pad)
        self._f.write(raw)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(offset + pad)), ("length", str(len(raw)))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        return t

    def add_array(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array)
        return self.add(name, array.shape, helper.np_dtype_to_tensor_dtype(array.dtype),
                        memoryview(array.reshape(-1).view(np.uint8)))

    def close(self) -> None:
        self._f.close()


def _matmul_node(node: onnx.NodeProto, t: Target, settings: Settings) -> onnx.NodeProto:
    k, n = t.shape
    names = quantized_names(t)
    inputs = [node.input[0], names[0], names[1]] + ([names[2]] if settings.has_zeros else [])
    return helper.make_node("MatMulNBits", inputs, list(node.output), name=f"{t.module}/MatMulNBits",
                            domain=MS_DOMAIN, K=k, N=n, bits=settings.bits, block_size=settings.block_size,
                            accuracy_level=settings.accuracy_level)


def _gather_node(node: onnx.NodeProto, t: Target, settings: Settings) -> onnx.NodeProto:
    names = quantized_names(t)
    inputs = [names[0], node.input[1], names[1]] + ([names[2]] if not settings.symmetric else [])
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    return helper.make_node("GatherBlockQuantized", inputs, list(node.output), name=f"{t.module}/GatherBlockQuantized",
                            domain=MS_DOMAIN, gather_axis=axis, quantize_axis=1, block_size=settings.block_size)


def quantized_names(t: Target) -> tuple[str, str, str]:
    """Export's spelling: `<module>.MatMulNBits.qweight|scales|qzeros` (GatherBlockQuantized for embeddings)."""
    op = "MatMulNBits" if t.kind == "matmul" else "GatherBlockQuantized"
    return f"{t.module}.{op}.qweight", f"{t.module}.{op}.scales", f"{t.module}.{op}.qzeros"


def _quantize_embedding(w: np.ndarray, t: Target, settings: Settings, writer: TensorWriter) -> list[TensorProto]:
    """int4 GatherBlockQuantized tensors from onnxruntime's own Gather quantizer, renamed."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer)

    config = DefaultWeightOnlyQuantConfig(block_size=settings.block_size, is_symmetric=settings.symmetric, bits=4,
                                          op_types_to_quantize=("Gather",))
    graph = helper.make_graph([], "one_weight", [], [], [numpy_helper.from_array(np.ascontiguousarray(w), "w")])
    with quiet_onnxruntime_quantizer():
        (new,) = DefaultWeightOnlyQuantizer(config).quantize_gather(helper.make_node("Gather", ["w", "i"], ["y"]),
                                                                    [graph])
    made = {p.name: p for p in graph.initializer}
    sources = [new.input[0], new.input[2]] + ([new.input[3]] if len(new.input) > 3 else [])
    return [writer.add(name, made[s].dims, made[s].data_type, made[s].raw_data)
            for name, s in zip(quantized_names(t), sources)]


def _quantize_matmul(w: np.ndarray, t: Target, settings: Settings, writer: TensorWriter,
                     hessian: np.ndarray | None) -> list[TensorProto]:
    p = quantize_weight(w, algorithm=settings.algorithm, bits=settings.bits, block_size=settings.block_size,
                        symmetric=settings.symmetric, hessian=hessian, transposed=t.transposed)
    names = quantized_names(t)
    out = [writer.add_array(names[0], p.qweight), writer.add_array(names[1], p.scales.astype(w.dtype))]
    if p.zeros is not None:
        out.append(writer.add_array(names[2], p.zeros.astype(w.dtype) if p.zeros.dtype.kind == "f" else p.zeros))
    return out


def _int8_nodes(src: SourceModel, targets: list[Target]) -> tuple[dict[int, list[onnx.NodeProto]], list]:
    """int8: each target MatMul becomes MatMulIntegerToFloat, its activation quantized per row once, just before
    the first node that reads it (q, k and v share one); a tied model's lookup reads the LM head's int8 weights."""
    new_nodes: dict[int, list[onnx.NodeProto]] = {}
    quantized: set[str] = set()
    for t in sorted(targets, key=lambda t: t.node):
        node = src.graph.node[t.node]
        if t.kind == "shared":
            new_nodes[t.node] = int8.shared_embedding("lm_head", node.input[1], node.output[0])[0]
            continue
        x, k = node.input[0], t.shape[0]
        chain, xq, scale = int8.activation_nodes(x, k)
        new_nodes[t.node] = ([] if x in quantized else chain) + [int8.matmul_node(t.module, xq, scale, node.output[0])]
        quantized.add(x)
    consts = int8.constants()
    if any(t.kind == "shared" for t in targets):
        consts += int8.shared_embedding("lm_head", "ids", "out")[1]
    return new_nodes, consts


def _quantize_int8(w: np.ndarray, t: Target, writer: TensorWriter) -> list[TensorProto]:
    """Per-output-channel int8 of a [K, N] weight (or its [N, K] transpose), a slice of output channels at a time
    (each channel is quantized alone), so memory stays near the int8 result plus one float slice."""
    k, n = t.shape
    codes = np.empty((k, n), np.int8)
    scales = np.empty(n, np.float32)
    cols = max(1, _CHUNK_VALUES // k)
    for c in range(0, n, cols):
        chunk = w[c:c + cols].T if t.transposed else w[:, c:c + cols]
        codes[:, c:c + cols], scales[c:c + cols] = int8.quantize_8bits(chunk)
    names = int8.weight_names(t.module)
    return [writer.add_array(names[0], codes), writer.add_array(names[1], scales)]


_CHUNK_VALUES = 1 << 24


def rewrite(src: SourceModel, out_dir: Path, targets: list[Target], settings: Settings, *,
            hessian: Callable[[str], np.ndarray] | None = None,
            on_weight: Callable[[Target], None] | None = None) -> None:
    """Write `out_dir/model.onnx(.data)`: `src` with each target replaced. `hessian(activation)` gives GPTQ's H."""
    uses: dict[str, int] = {}
    for node in src.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    by_weight: dict[str, list[Target]] = {}
    for t in targets:
        by_weight.setdefault(t.weight, []).append(t)
    new_nodes: dict[int, list[onnx.NodeProto]] = {}
    initializers: list[TensorProto] = []
    if settings.bits == 8:
        new_nodes, initializers = _int8_nodes(src, targets)
    for t in targets:
        node = src.graph.node[t.node]
        if settings.bits == 8:
            continue
        if t.kind == "shared":
            head = next(h for h in targets if h.transposed)
            vocab, hidden = t.shape
            new_nodes[t.node], consts = shared_embedding(
                list(quantized_names(head)[:3 if settings.has_zeros else 2]), node.input[1], node.output[0], vocab,
                hidden, settings.block_size)
            initializers += consts
        else:
            new_nodes[t.node] = [(_matmul_node if t.kind == "matmul" else _gather_node)(node, t, settings)]

    writer = TensorWriter(out_dir / "model.onnx.data")
    try:
        for init in src.graph.initializer:
            mine = by_weight.get(init.name, [])
            for t in mine:
                if t.kind == "shared":  # reads the LM head's tensors
                    if on_weight:
                        on_weight(t)
                    continue
                w = src.array(t.weight)
                if t.kind == "gather":
                    initializers += _quantize_embedding(w, t, settings, writer)
                elif settings.bits == 8:
                    initializers += _quantize_int8(w, t, writer)
                else:
                    h = hessian(t.activation) if settings.algorithm == "gptq" else None
                    initializers += _quantize_matmul(w, t, settings, writer, h)
                del w
                if on_weight:
                    on_weight(t)
            if not (mine and len(mine) == uses.get(init.name, 0) and init.name not in src.input_names):
                initializers.append(_copy(src, init, writer))  # else every use was replaced: the float one goes
            if init.data_location == TensorProto.EXTERNAL:
                src.release(init)
    finally:
        writer.close()

    model = onnx.ModelProto()
    model.CopyFrom(src.proto)
    g = model.graph
    del g.node[:]
    g.node.extend(n for i, node in enumerate(src.graph.node) for n in new_nodes.get(i, [node]))
    del g.initializer[:]
    g.initializer.extend(initializers)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    if settings.embeddings:
        model.ir_version = max(model.ir_version, 10)  # int4 tensors
    (out_dir / "model.onnx").write_bytes(model.SerializeToString())


def _copy(src: SourceModel, t: TensorProto, writer: TensorWriter) -> TensorProto:
    if t.data_location != TensorProto.EXTERNAL:
        return t
    return writer.add(t.name, t.dims, t.data_type, src.raw(t))
