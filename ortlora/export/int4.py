"""int4 block-wise weight-only quantization into MatMulNBits, using onnxruntime's own C++ packer."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ortlora.errors import OrtloraError


def check_block_size(block_size: int) -> None:
    """MatMulNBits' block size (int4 and int8): a power of two of at least 16. Export's and quantize's one check."""
    ok = isinstance(block_size, int) and not isinstance(block_size, bool) and block_size >= 16
    if not ok or block_size & (block_size - 1):
        raise OrtloraError(f"block size {block_size} is invalid: it must be a power of two of at least 16")


def quantize_4bits(weight_kn: np.ndarray, block_size: int, symmetric: bool = False):
    """Quantize a [K, N] MatMul weight. Returns (packed [N, k_blocks, block/2] uint8, scales [N, k_blocks],
    zero_points [N * ceil(k_blocks / 2)] uint8 or None when symmetric)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    k, n = weight_kn.shape
    k_blocks = -(-k // block_size)
    w = np.ascontiguousarray(weight_kn, dtype=np.float32)
    if k_blocks * block_size != k:
        w = np.pad(w, ((0, k_blocks * block_size - k), (0, 0)))
    packed = np.zeros((n, k_blocks, block_size // 2), dtype=np.uint8)
    scales = np.zeros(n * k_blocks, dtype=np.float32)
    zero_points = np.zeros(n * ((k_blocks + 1) // 2), dtype=np.uint8)
    quantize_matmul_4bits(packed, w, scales, zero_points, block_size, n, k, symmetric)
    return packed, scales.reshape(n, k_blocks), (None if symmetric else zero_points)


def shared_embedding(head: list[str], ids: str, output: str, vocab: int, hidden: int,
                     block_size: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The embedding lookup of a tied model read from its int4 LM head (as onnxruntime-genai's builder does):

        lm_head.MatMulNBits.qweight [V, blocks, block/2] ─Reshape [V, blocks·block/2]─┐
        ids ──────────────────────────────────────────────── GatherBlockQuantized(scales[, qzeros as [V, ⌈blocks/2⌉]])
                                                              ─[Slice: the last block's padding off]─> output

    `head`: the MatMulNBits initializers (qweight, scales[, qzeros]). Returns the nodes and their small constants
    (fixed names: export and quantize write the same graph). Export's and quantize's one spelling of it."""
    blocks = -(-hidden // block_size)
    p = "model.embed_tokens"
    consts = {f"{p}.rows_shape": [vocab, blocks * block_size // 2]}
    nodes = [helper.make_node("Reshape", [head[0], f"{p}.rows_shape"], [f"{p}/rows"], name=f"{p}/rows")]
    inputs = [f"{p}/rows", ids, head[1]]
    if len(head) > 2:
        consts[f"{p}.zero_point_rows_shape"] = [vocab, (blocks + 1) // 2]
        nodes.append(helper.make_node("Reshape", [head[2], f"{p}.zero_point_rows_shape"], [f"{p}/zero_point_rows"],
                                      name=f"{p}/zero_point_rows"))
        inputs.append(f"{p}/zero_point_rows")
    padded = blocks * block_size != hidden
    gathered = f"{p}/padded" if padded else output
    nodes.append(helper.make_node("GatherBlockQuantized", inputs, [gathered], name=f"{p}/GatherBlockQuantized",
                                  domain="com.microsoft", bits=4, block_size=block_size, gather_axis=0,
                                  quantize_axis=1))
    if padded:
        consts.update({f"{p}.unpad_starts": [0], f"{p}.unpad_ends": [hidden], f"{p}.unpad_axes": [-1]})
        nodes.append(helper.make_node("Slice", [gathered, f"{p}.unpad_starts", f"{p}.unpad_ends", f"{p}.unpad_axes"],
                                      [output], name=f"{p}/unpad"))
    return nodes, [numpy_helper.from_array(np.array(v, np.int64), name) for name, v in consts.items()]
