"""int4 block-wise weight-only quantization into MatMulNBits, using onnxruntime's own C++ packer."""

from __future__ import annotations

import numpy as np

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
