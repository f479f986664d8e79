"""`.onnx_adapter` files (ONNX Runtime's LoRA adapter format): write through `onnxruntime.AdapterFormat`, read
memory-mapped and zero-copy (or into one private copy) with our own bounds-checked flatbuffer parser.

Why our own reader: the runtime may hold thousands of adapters, so tensors must be views of a read-only mapping
(onnxruntime's `AdapterFormat.read_adapter` copies the file into memory), and every malformed file must end in one
`AdapterError`, whatever the bytes. The layout (onnxruntime/lora/adapter_format/adapter_schema.fbs):

    file      = u32 root offset | "TORT" | ...
    Adapter   = table { 0 format_version:int, 1 adapter_version:int, 2 model_version:int, 3 parameters:[Parameter] }
    Parameter = table { 0 name:string, 1 dims:[int64], 2 data_type:int32 (ONNX enum), 3 raw_data:[uint8] (align 8) }
    table     = i32 soffset to its vtable | fields...;  vtable = u16 size | u16 table size | u16 field offsets...
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from ortlora import naming
from ortlora.errors import AdapterError
from ortlora.fileutil import atomic_file

SUFFIX = ".onnx_adapter"
FORMAT_VERSION = 1  # the only version onnxruntime writes and reads
_IDENTIFIER = b"TORT"
# ONNX TensorProto data types that can back a LoRA parameter, and back.
_DTYPES = {1: np.dtype(np.float32), 10: np.dtype(np.float16), 11: np.dtype(np.float64)}
_ONNX_NAMES = {0: "UNDEFINED", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64", 8: "STRING",
               9: "BOOL", 12: "UINT32", 13: "UINT64", 14: "COMPLEX64", 15: "COMPLEX128", 16: "BFLOAT16"}
_MAX_DIMS = 8
_MAX_BUFFER = 2**31 - 1  # flatbuffers' FLATBUFFERS_MAX_BUFFER_SIZE
_MAX_TABLES = 1_000_000  # flatbuffers' Verifier default
_STRUCTS = {fmt: struct.Struct(fmt) for fmt in ("<I", "<i", "<H")}


@dataclass(frozen=True)
class AdapterFile:
    """What a `.onnx_adapter` holds; `params` are read-only views of the file's mapping (or of a private copy)."""
    path: Path
    format_version: int
    adapter_version: int
    model_version: int
    params: dict[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.params.values())


def write_onnx_adapter(path: str | Path, params: Mapping[str, np.ndarray], *, adapter_version: int = 1,
                       model_version: int = 1) -> Path:
    """Write `params` (name -> float32/float16 array) as an `.onnx_adapter`, atomically; returns the path."""
    import onnxruntime as ort

    path = Path(path)
    problems = []
    for name, value in params.items():
        arr = np.asarray(value)
        if arr.dtype not in (np.float32, np.float16):
            problems.append(f"{name}: dtype {arr.dtype} (float32 or float16 expected)")
    if not params:
        problems.append("no parameters")
    if problems:
        raise AdapterError(f"cannot write {path}: " + "; ".join(problems))
    for label, v in (("adapter_version", adapter_version), ("model_version", model_version)):
        if not isinstance(v, int) or not -2**31 <= v < 2**31:
            raise AdapterError(f"cannot write {path}: {label} must be a 32-bit integer, got {v!r}")
    values = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value)) for name, value in params.items()}
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(adapter_version)
    fmt.set_model_version(model_version)
    fmt.set_parameters(values)
    with atomic_file(path) as tmp:
        fmt.export_adapter(str(tmp))
    return path


def read_onnx_adapter(path: str | Path) -> dict[str, np.ndarray]:
    """The parameters of an `.onnx_adapter` (names in ortlora's spelling), as zero-copy read-only arrays."""
    return open_onnx_adapter(path).params


def open_onnx_adapter(path: str | Path, private: bool = False) -> AdapterFile:
    """Parse `path`; any malformed file raises AdapterError naming it and the first problem found. The params are
    views of the file's read-only mapping, or with `private` of one private copy of the file, read in one call
    (what a server that holds the weights wants: a rewrite of the file cannot reach them, and one large read into
    one allocation costs a fraction of mapping the file and copying its tensors one by one)."""
    path = Path(path)
    try:
        with open(path, "rb", buffering=0) as f:
            size = f.seek(0, 2)
            if size == 0:
                raise AdapterError(f"{path} is empty: not an .onnx_adapter file")
            if private and size < _MAX_BUFFER:  # (a larger file is mapped: the parser refuses it unread)
                buf = _read_whole(f, size, path)
            else:
                buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise AdapterError(f"{path}: no such adapter file") from None
    except IsADirectoryError:
        raise AdapterError(f"{path} is a folder, not an .onnx_adapter file (convert a PEFT folder with "
                           "`ortlora convert-adapters`)") from None
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{path}: cannot read: {exc}") from None
    try:
        return _parse(path, buf)
    except _Malformed as exc:
        raise AdapterError(f"{path} is not a valid .onnx_adapter file: {exc}") from None


def _read_whole(f, size: int, path: Path) -> memoryview:
    """The file's bytes in one private, read-only allocation."""
    data = np.empty(size, np.uint8)
    f.seek(0)
    view, got = memoryview(data), 0
    while got < size:
        n = f.readinto(view[got:])
        if not n:
            raise AdapterError(f"{path} changed while it was read (it ended after {got} of {size} bytes)")
        got += n
    data.flags.writeable = False
    return memoryview(data)


class _Malformed(Exception):
    pass


class _Reader:
    """Bounds- and alignment-checked little-endian flatbuffer access. At least as strict as flatbuffers' Verifier
    (which onnxruntime runs before it trusts a file), so whatever we accept onnxruntime accepts too."""

    def __init__(self, buf):
        self.buf = buf
        self.size = len(buf)
        if self.size >= _MAX_BUFFER:
            raise _Malformed(f"it is {self.size} bytes; onnxruntime's adapter format holds under 2 GiB")

    def check(self, pos: int, n: int, what: str, align: int = 1) -> None:
        if pos < 0 or n >= self.size or pos > self.size - n:
            raise _Malformed(f"{what} at byte {pos} lies outside the {self.size}-byte file")
        if pos % align:
            raise _Malformed(f"{what} at byte {pos} is not {align}-byte aligned")

    def scalar(self, pos: int | None, fmt: str, what: str, default=0):
        if pos is None:
            return default
        st = _STRUCTS[fmt]
        n = st.size
        if pos < 0 or n >= self.size or pos > self.size - n or pos % n:
            self.check(pos, n, what, align=n)  # raises, naming the problem
        return st.unpack_from(self.buf, pos)[0]

    def offset(self, pos: int, what: str) -> int:
        """Follow the uoffset at `pos` (non-zero, positive as a signed 32-bit value, landing inside the file)."""
        o = self.scalar(pos, "<I", what)
        if o == 0 or o >= 2**31:
            raise _Malformed(f"{what} at byte {pos} holds a bad offset {o}")
        if pos + o >= self.size - 1:
            self.check(pos + o, 1, what)
        return pos + o

    def table(self, pos: int, nfields: int, what: str) -> list[int | None]:
        """Absolute positions of a table's fields (None where absent)."""
        vtable = pos - self.scalar(pos, "<i", what)
        vsize = self.scalar(vtable, "<H", what + " vtable")
        if vsize < 4 or vsize % 2:
            raise _Malformed(f"{what} vtable has a bad size {vsize}")
        self.check(vtable, vsize, what + " vtable")
        tsize, *offsets = struct.unpack_from(f"<{vsize // 2 - 1}H", self.buf, vtable + 2)
        if tsize < 4:
            raise _Malformed(f"{what} at byte {pos} has a bad size {tsize}")
        self.check(pos, tsize, what)
        fields: list[int | None] = []
        for i in range(nfields):
            off = offsets[i] if i < len(offsets) else 0
            if off and off >= tsize:
                raise _Malformed(f"{what} field {i} lies outside its table")
            fields.append(pos + off if off else None)
        return fields

    def vector(self, pos: int, elem_size: int, what: str) -> tuple[int, int]:
        """(start of elements, count) of the vector referenced at `pos`, checked to fit the file."""
        start = self.offset(pos, what)
        count = self.scalar(start, "<I", what)
        if count >= _MAX_BUFFER // elem_size:
            raise _Malformed(f"{what} claims {count} elements")
        self.check(start, 4 + count * elem_size, f"{what} ({count} elements)", align=4)
        return start + 4, count

    def string(self, pos: int, what: str) -> bytes:
        start, n = self.vector(pos, 1, what)
        self.check(start + n, 1, what)
        if self.buf[start + n] != 0:
            raise _Malformed(f"{what} is not NUL-terminated")
        return bytes(self.buf[start:start + n])


def _parse(path: Path, buf) -> AdapterFile:
    r = _Reader(buf)
    if r.size < 8 or bytes(buf[4:8]) != _IDENTIFIER:
        raise _Malformed("the file does not start with an onnxruntime adapter header (identifier TORT)")
    root = r.offset(0, "root table offset")
    f_format, f_adapter, f_model, f_params = r.table(root, 4, "adapter table")
    fmt_version = r.scalar(f_format, "<i", "format_version")
    if fmt_version != FORMAT_VERSION:
        raise _Malformed(f"format version {fmt_version} is not supported (onnxruntime writes {FORMAT_VERSION})")
    adapter_version = r.scalar(f_adapter, "<i", "adapter_version")
    model_version = r.scalar(f_model, "<i", "model_version")
    if f_params is None:
        raise _Malformed("it holds no parameter list")
    start, count = r.vector(f_params, 4, "parameter list")
    if count >= _MAX_TABLES:
        raise _Malformed(f"it claims {count} parameters")
    params: dict[str, np.ndarray] = {}
    for k in range(count):
        name, arr = _parameter(r, r.offset(start + 4 * k, f"parameter {k}"), k)
        key = naming.from_genai_spelling(name)
        if key in params:
            raise _Malformed(f"parameter {name!r} appears twice" + (f" (as {key!r})" if key != name else ""))
        params[key] = arr
    if not params:
        raise _Malformed("it holds no parameters")
    return AdapterFile(path, fmt_version, adapter_version, model_version, params)


def _parameter(r: _Reader, pos: int, k: int) -> tuple[str, np.ndarray]:
    f_name, f_dims, f_type, f_data = r.table(pos, 4, f"parameter {k}")
    if f_name is None:
        raise _Malformed(f"parameter {k} has no name")
    try:
        name = r.string(f_name, f"name of parameter {k}").decode("utf-8")
    except UnicodeDecodeError:
        raise _Malformed(f"the name of parameter {k} is not UTF-8") from None
    if not name:
        raise _Malformed(f"parameter {k} has an empty name")
    if f_dims is None:
        raise _Malformed(f"parameter {name!r} has no shape")
    dstart, ndims = r.vector(f_dims, 8, f"shape of {name!r}")
    if ndims > _MAX_DIMS:
        raise _Malformed(f"parameter {name!r} has {ndims} dimensions")
    shape = tuple(struct.unpack_from(f"<{ndims}q", r.buf, dstart))
    if any(d < 0 or d >= 2**31 for d in shape):
        raise _Malformed(f"parameter {name!r} has an impossible shape {list(shape)}")
    code = r.scalar(f_type, "<i", f"data type of {name!r}")
    dtype = _DTYPES.get(code)
    if dtype is None:
        hint = (" (an int4-quantized adapter, e.g. from `olive convert-adapters --quantize_int4`, is not supported: "
                "convert it without quantization)") if ".quant." in name else ""
        raise _Malformed(f"parameter {name!r} has data type {_ONNX_NAMES.get(code, code)}; LoRA parameters must be "
                         f"float32 or float16{hint}")
    if f_data is None:  # onnxruntime would dereference the missing vector
        raise _Malformed(f"parameter {name!r} has no data")
    bstart, nbytes = r.vector(f_data, 1, f"data of {name!r}")
    expected = math.prod(shape) * dtype.itemsize
    if nbytes != expected:
        raise _Malformed(f"parameter {name!r} of shape {list(shape)} {dtype} needs {expected} bytes, "
                         f"the file holds {nbytes}")
    if nbytes == 0:
        empty = np.zeros(shape, dtype)
        empty.flags.writeable = False
        return name, empty
    arr = np.frombuffer(r.buf, dtype=dtype.newbyteorder("<"), count=nbytes // dtype.itemsize, offset=bstart)
    return name, arr.reshape(shape)
