"""Block-wise weight-only quantization of one MatMul weight W [K, N] into MatMulNBits inputs.

MatMulNBits stores, per output column n and block b of `block_size` rows of K:
    qweight [N, k_blocks, block_size * bits / 8] uint8 (two 4-bit codes per byte, low nibble first)
    scales  [N, k_blocks] in the activation dtype
    zeros   uint8 codes packed like qweight, float (HQQ), or absent (symmetric: zero = 2^(bits-1))
and computes W[k, n] = scale * (code - zero).

- `rtn`: round to nearest, onnxruntime's C++ packer (the one `export --precision int4` uses).
- `hqq`: onnxruntime's HQQ quantizer (half-quadratic optimisation of the zero points; float zero points; int4).
- `gptq`: ours, because onnxruntime 1.32's `neural_compressor.weight_only.gptq` indexes the upper Cholesky
  factor by column (`Hinv1[i:, i]`, zeros below the diagonal), so no error is ever propagated and its result
  equals RTN on the GPTQ grid; it also loads the whole model and only packs 4 bits.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass

import numpy as np

ALGORITHMS = ("rtn", "hqq", "gptq")
BITS = {"int4": 4, "int8": 8}


@contextlib.contextmanager
def quiet_onnxruntime_quantizer():
    """onnxruntime's quantizer logs every weight at INFO and its numpy/torch code warns on benign cases."""
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@dataclass
class Packed:
    qweight: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None


def rtn(w: np.ndarray, bits: int, block_size: int, symmetric: bool) -> Packed:
    """Round to nearest with onnxruntime's `quantize_matmul_{4,8}bits` (min/max per block, zero included)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer)

    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, bits=bits)
    packed, scales, zeros = DefaultWeightOnlyQuantizer(config).qbits_block_quant(np.ascontiguousarray(w))
    return Packed(packed, scales, None if symmetric else zeros.reshape(-1))


def hqq(w: np.ndarray, bits: int, block_size: int) -> Packed:
    """onnxruntime's HQQ on a one-node graph (it needs torch, imported lazily by onnxruntime)."""
    from onnx import helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, HQQWeightOnlyQuantizer

    graph = helper.make_graph([], "one_weight", [], [], [numpy_helper.from_array(np.ascontiguousarray(w), "w")])
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="w")
    quantizer = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits))
    with quiet_onnxruntime_quantizer():
        (new,) = quantizer.quantize(node, [graph])
    made = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    qweight, scales, zeros = (made[name] for name in new.input[1:4])
    return Packed(qweight, scales, zeros)


@dataclass
class GptqFactor:
    u: np.ndarray  # [K_padded, K_padded] upper Cholesky factor of the damped H^-1: U^T U = H^-1
    dead: np.ndarray  # [K_padded] bool: inputs that were always zero in calibration


def gptq_factor(hessian: np.ndarray, block_size: int, damp: float = 0.01) -> GptqFactor:
    k = hessian.shape[0]
    kp = -(-k // block_size) * block_size
    h = np.eye(kp, dtype=np.float64)
    h[:k, :k] = hessian
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices(kp)] += damp * np.mean(np.diag(h))
    return GptqFactor(np.linalg.cholesky(np.linalg.inv(h)).T, dead)


def gptq(w: np.ndarray, hessian: np.ndarray | GptqFactor, bits: int, block_size: int, symmetric: bool) -> Packed:
    """GPTQ (Frantar et al. 2022): quantize the K rows in order, each rounding error spread over the rows not yet
    quantized through the upper Cholesky factor U of H^-1 (H = sum of x^T x over calibration tokens). The lazy
    batch is one quantization block, so each block's grid is taken from its already-updated rows. Columns are
    independent, so a weight may be done in column slices sharing one factor."""
    f = hessian if isinstance(hessian, GptqFactor) else gptq_factor(hessian, block_size)
    k, n = w.shape
    kp = f.u.shape[0]
    k_blocks = kp // block_size
    work = np.zeros((kp, n), np.float64)
    work[:k] = w
    work[f.dead] = 0.0
    u = f.u
    maxq = 2**bits - 1
    codes = np.zeros((kp, n), np.uint8)
    scales = np.zeros((k_blocks, n), np.float64)
    zeros = np.zeros((k_blocks, n), np.float64)
    for b in range(k_blocks):
        i1, i2 = b * block_size, (b + 1) * block_size
        block = work[i1:i2].copy()  # [block, N]
        scale, zero = _grid(block, maxq, symmetric)
        scales[b], zeros[b] = scale, zero
        err = np.zeros_like(block)
        for i in range(block_size):
            q = np.clip(np.round(block[i] / scale) + zero, 0, maxq)
            codes[i1 + i] = q
            e = (block[i] - scale * (q - zero)) / u[i1 + i, i1 + i]
            block[i:] -= np.outer(u[i1 + i, i1 + i:i2], e)
            err[i] = e
        work[i2:] -= u[i1:i2, i2:].T @ err
    return _pack(codes, scales, None if symmetric else zeros, bits, block_size, w.dtype)


def _grid(block: np.ndarray, maxq: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-column scale and zero point of one block, the rule of onnxruntime's packer: asymmetric over
    [min(w, 0), max(w, 0)]; symmetric maps the value of largest magnitude m to code 0 (scale = m / -2^(bits-1),
    negative when m > 0), so the whole [-2^(bits-1), 2^(bits-1) - 1] code range is used."""
    if symmetric:
        half = (maxq + 1) // 2
        m = block[np.abs(block).argmax(axis=0), np.arange(block.shape[1])]
        scale = np.where(m == 0, 1.0, m / -half)
        return scale, np.full_like(scale, half)
    lo = np.minimum(block.min(axis=0), 0.0)
    hi = np.maximum(block.max(axis=0), 0.0)
    scale = np.where(hi > lo, (hi - lo) / maxq, 1.0)
    return scale, np.round(-lo / scale)


def _pack(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, bits: int, block_size: int,
          dtype) -> Packed:
    """codes [K_padded, N] uint8, scales/zeros [k_blocks, N] -> MatMulNBits layout."""
    kp, n = codes.shape
    k_blocks = kp // block_size
    q = codes.T.reshape(n, k_blocks, block_size)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    packed_zeros = None
    if zeros is not None:
        z = zeros.T.astype(np.uint8)  # [N, k_blocks]
        if bits == 4:
            z = np.pad(z, ((0, 0), (0, k_blocks % 2)))
            z = z[:, 0::2] | (z[:, 1::2] << 4)
        packed_zeros = np.ascontiguousarray(z).reshape(-1)
    return Packed(np.ascontiguousarray(q, np.uint8), np.ascontiguousarray(scales.T.astype(dtype)), packed_zeros)


_CHUNK_BYTES = 64 << 20


def quantize_weight(w: np.ndarray, *, algorithm: str, bits: int, block_size: int, symmetric: bool,
                    hessian: np.ndarray | None = None, transposed: bool = False) -> Packed:
    """Quantize the [K, N] weight `w` (or `w.T` when `transposed`, i.e. `w` is stored [N, K]). RTN and GPTQ treat
    output columns independently, so they go a slice of columns at a time and memory stays near one slice; HQQ
    takes the whole weight (its early stop watches the error of the whole tensor)."""
    k, n = (w.shape[1], w.shape[0]) if transposed else w.shape
    cols = n if algorithm == "hqq" else max(1, _CHUNK_BYTES // (k * w.dtype.itemsize))
    if algorithm == "gptq":
        hessian = gptq_factor(hessian, block_size)
    parts = []
    for n0 in range(0, n, cols):
        chunk = np.ascontiguousarray(w[n0:n0 + cols].T if transposed else w[:, n0:n0 + cols])
        if algorithm == "rtn":
            parts.append(rtn(chunk, bits, block_size, symmetric))
        elif algorithm == "hqq":
            parts.append(hqq(chunk, bits, block_size))
        elif algorithm == "gptq":
            parts.append(gptq(chunk, hessian, bits, block_size, symmetric))
        else:
            raise ValueError(f"unknown algorithm {algorithm!r}")
    if len(parts) == 1:
        return parts[0]
    zeros = None if parts[0].zeros is None else np.concatenate([p.zeros for p in parts])
    return Packed(np.concatenate([p.qweight for p in parts]), np.concatenate([p.scales for p in parts]), zeros)
