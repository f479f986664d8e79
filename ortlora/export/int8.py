"""int8 projections on the CPU's int8 units: weights int8 per output channel, activations quantized per row.

Each distinct activation x [.., K] is quantized once (q, k and v share theirs; so do gate and up), then every
projection reading it runs onnxruntime's integer GEMM (MLAS: AMX / AVX512-VNNI where the CPU has them):

    x ─Abs─ReduceMax(last axis)─Mul(1/127)─> s [.., 1] ─Shape─Expand(128)─> zero [.., 1] ─┐
    └──────────────────────────────────────────────────────── QuantizeLinear(s, zero, block K) ─> xq uint8 [.., K]
    xq ─MatMulIntegerToFloat(<module>.MatMulInteger.weight int8 [K, N], s, <module>.MatMulInteger.scales [N], 128)─> y

What each row r (one position of one batch row) reads and writes:

    s[r]  = max_k |x[r, k]| / 127                   xq[r] = round(x[r] / s[r]) + 128        (in 1..255)
    y[r]  = s[r] * scales ⊙ ((xq[r] - 128) @ W)     W = round(w / scales) in -127..127, scales = max_k |w[k, :]| / 127

so a row's output depends on its own activations only (mixed batches equal single runs), and the integer part is
exact. An all-zero row has s = 0 and gives y = 0. onnxruntime's MatMulIntegerToFloat takes a per-row A scale
([.., 1], applied to its output) but only a scalar A zero point: hence symmetric rows around the shared 128.

The LM head of a tied model is this int8 weight too; the embedding lookup reads its columns (`shared_embedding`),
so the vocabulary is stored once, in int8.

CPUs: MLAS runs u8·s8 products on AMX or AVX512-VNNI / AVX-VNNI with 32-bit sums. Without them (AVX2 only, e.g.
AMD Zen 2) it sums pairs of products in 16 bits with saturation (vpmaddubsw), so a pair of large codes can clip;
its speed there is unmeasured. `cpu_warning()` says so when exporting on such a machine.
"""

from __future__ import annotations

import sys

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"
OP = "MatMulIntegerToFloat"
_ZERO = 128  # every row's zero point (symmetric uint8)


def quantize_8bits(weight_kn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel of a [K, N] MatMul weight: (codes int8 [K, N], scales float32 [N]).
    Codes stay within -127..127 (the grid is symmetric); an all-zero column gets scale 1."""
    w = np.asarray(weight_kn, dtype=np.float32)
    peak = np.abs(w).max(axis=0)
    scales = np.where(peak > 0, peak / np.float32(127), np.float32(1)).astype(np.float32)
    codes = np.clip(np.rint(w / scales), -127, 127).astype(np.int8)
    return codes, scales


def weight_names(module: str) -> tuple[str, str]:
    """Export's and quantize's one spelling: `<module>.MatMulInteger.weight` [K, N] int8, `.scales` [N]."""
    return f"{module}.MatMulInteger.weight", f"{module}.MatMulInteger.scales"


def activation_nodes(x: str, k: int) -> tuple[list[onnx.NodeProto], str, str]:
    """The per-row quantization of `x` [.., k] (diagram above): (nodes, xq, s); their constants are `constants()`.
    Names derive from `x`, so a second call for the same x would repeat them: callers quantize each x once."""
    p = f"{x}/int8"
    c = _constants()
    return [
        helper.make_node("Abs", [x], [f"{p}/abs"], name=f"{p}/abs"),
        helper.make_node("ReduceMax", [f"{p}/abs", c["axis"].name], [f"{p}/peak"], name=f"{p}/peak", keepdims=1),
        helper.make_node("Mul", [f"{p}/peak", c["step"].name], [f"{p}/scale"], name=f"{p}/scale"),
        helper.make_node("Shape", [f"{p}/scale"], [f"{p}/scale_shape"], name=f"{p}/scale_shape"),
        helper.make_node("Expand", [c["zero"].name, f"{p}/scale_shape"], [f"{p}/zero"], name=f"{p}/zero"),
        helper.make_node("QuantizeLinear", [x, f"{p}/scale", f"{p}/zero"], [f"{p}/q"], name=f"{p}/quantize",
                         axis=-1, block_size=k),  # one block: the whole row
    ], f"{p}/q", f"{p}/scale"


def matmul_node(module: str, xq: str, scale: str, output: str) -> onnx.NodeProto:
    """y = MatMulIntegerToFloat(xq, W, s, scales, 128): no bias input (it would be scaled by the row scale too)."""
    w, scales = weight_names(module)
    return helper.make_node(OP, [xq, w, scale, scales, _constants()["zero"].name], [output], name=f"{module}/{OP}",
                            domain=MS_DOMAIN)


def shared_embedding(head: str, ids: str, output: str, dtype=np.float32) -> tuple[list[onnx.NodeProto], list]:
    """The embedding lookup of a tied model read from its int8 LM head (`head` = the module, `lm_head`):

        W int8 [hidden, vocab] ─Gather(ids, axis 1)─> [hidden, B, S] ─Transpose─> [B, S, hidden] ─Cast─┐
        scales [vocab] ─Gather(ids)─Unsqueeze(-1)─> [B, S, 1] ──────────────────────────────────── Mul ─> output

    An LM head's output channel is a vocabulary row, so per-channel int8 is per-row int8 of the embedding."""
    w, scales = weight_names(head)
    p = "model.embed_tokens"
    axes = numpy_helper.from_array(np.array([-1], np.int64), f"{p}.int8_axes")
    to = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [
        helper.make_node("Gather", [w, ids], [f"{p}/columns"], name=f"{p}/columns", axis=1),
        helper.make_node("Transpose", [f"{p}/columns"], [f"{p}/rows"], name=f"{p}/rows", perm=[1, 2, 0]),
        helper.make_node("Cast", [f"{p}/rows"], [f"{p}/codes"], name=f"{p}/codes", to=to),
        helper.make_node("Gather", [scales, ids], [f"{p}/row_scales"], name=f"{p}/row_scales", axis=0),
        helper.make_node("Unsqueeze", [f"{p}/row_scales", axes.name], [f"{p}/row_scale"], name=f"{p}/row_scale"),
        helper.make_node("Mul", [f"{p}/codes", f"{p}/row_scale"], [output], name=f"{p}/dequantize"),
    ]
    return nodes, [axes]


def _constants() -> dict[str, onnx.TensorProto]:
    """The small constants the int8 nodes share (fixed names: export and quantize write the same graph)."""
    return {
        "axis": numpy_helper.from_array(np.array([-1], np.int64), "int8.last_axis"),
        "step": numpy_helper.from_array(np.array(1 / 127, np.float32), "int8.inverse_127"),
        "zero": numpy_helper.from_array(np.array(_ZERO, np.uint8), "int8.zero_point"),
    }


def constants() -> list[onnx.TensorProto]:
    return list(_constants().values())


INT8_UNITS = ("amx_int8", "avx512_vnni", "avx_vnni")


def cpu_warning() -> str | None:
    """A one-line warning when this CPU (Linux: /proc/cpuinfo) has none of the int8 units; None when it has one
    or cannot tell."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    if flags is None or any(unit in flags for unit in INT8_UNITS):
        return None
    return ("this CPU has no AMX / AVX512-VNNI / AVX-VNNI: onnxruntime's int8 kernel here sums pairs of products "
            "in 16 bits and can saturate, and int8's speed was measured with those units only; serve this model "
            "on a CPU that has them, or export int4")


def warn_without_int8_units(command: str) -> None:
    message = cpu_warning()
    if message:
        print(f"ortlora {command}: warning: {message}", file=sys.stderr)
