"""Mutated `.onnx_adapter` bytes: `read_onnx_adapter` either returns consistent arrays or raises AdapterError, and
whatever it accepts, onnxruntime's own reader accepts with the same tensors (so the runtime can hand it on)."""

from __future__ import annotations

import itertools
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ortlora.adapters.onnx_adapter import read_onnx_adapter, write_onnx_adapter
from ortlora.errors import AdapterError

_DIR = Path(tempfile.mkdtemp(prefix="ortlora-fuzz-"))
_COUNTER = itertools.count()


def _valid() -> bytes:
    params = {"model.layers.0.self_attn.q_proj.lora_A.weight": np.arange(16, dtype=np.float32).reshape(8, 2),
              "model.layers.0.self_attn.q_proj.lora_B.weight": np.arange(8, dtype=np.float16).reshape(2, 4),
              "m.lora_A.weight": np.zeros((8, 0), np.float32)}
    return write_onnx_adapter(_DIR / "valid.onnx_adapter", params, adapter_version=2, model_version=3).read_bytes()


VALID = _valid()
INTERESTING = [0, 1, 2, 3, 4, 7, 8, 0x7F, 0xFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, len(VALID),
               len(VALID) - 4, 2**40, 2**63 - 1]


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "int32", "int64", "truncate", "insert", "delete", "duplicate"]))
        n = len(data)
        if n == 0:
            break
        pos = draw(st.integers(0, n - 1))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind in ("int32", "int64"):
            size = 4 if kind == "int32" else 8
            value = draw(st.sampled_from(INTERESTING) | st.integers(0, 2 ** (8 * size) - 1))
            pos -= pos % 4  # flatbuffer fields sit on 4-byte boundaries
            data[pos:pos + size] = struct.pack("<Q" if size == 8 else "<I", value % 2 ** (8 * size))[: n - pos]
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
        else:
            end = min(n, pos + draw(st.integers(1, 32)))
            data[pos:pos] = data[pos:end]
    return bytes(data)


def _write(content: bytes) -> Path:
    # A new file each time: a file mapped by an earlier example must never be rewritten in place.
    path = _DIR / f"case{next(_COUNTER)}.onnx_adapter"
    path.write_bytes(content)
    return path


def test_the_valid_file_reads():
    params = read_onnx_adapter(_write(VALID))
    assert sorted(params) == ["m.lora_A.weight", "model.layers.0.self_attn.q_proj.lora_A.weight",
                              "model.layers.0.self_attn.q_proj.lora_B.weight"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_files_raise_adapter_error_or_read_consistently(content):
    path = _write(content)
    try:
        params = read_onnx_adapter(path)
    except AdapterError as exc:
        assert str(path) in str(exc)
        return
    size = os.path.getsize(path)
    assert params and all(isinstance(k, str) and k for k in params)
    for name, arr in params.items():
        assert isinstance(arr, np.ndarray) and arr.dtype in (np.float32, np.float16)
        assert arr.nbytes <= size
        arr.tobytes()  # every byte of the view is readable (a bad offset would fault here)
    # What we accept, onnxruntime accepts, with the same tensors.
    theirs = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    assert sorted(theirs) == sorted(params) or _renamed(theirs, params)
    for name, value in theirs.items():
        from ortlora.naming import from_genai_spelling

        got = params[from_genai_spelling(name)]
        np.testing.assert_array_equal(value.numpy().view(np.uint8), got.view(np.uint8))


def _renamed(theirs, ours) -> bool:
    from ortlora.naming import from_genai_spelling

    return sorted(from_genai_spelling(n) for n in theirs) == sorted(ours)


# The file ends in the last name's NUL terminator and two bytes of padding: cutting the padding is harmless
# (onnxruntime agrees), cutting the terminator is not.
@pytest.mark.parametrize("cut", [0, 1, 4, 7, 8, 12, 40, len(VALID) // 2, len(VALID) - 3])
def test_truncations(cut):
    with pytest.raises(AdapterError):
        read_onnx_adapter(_write(VALID[:cut]))
