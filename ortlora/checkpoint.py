"""Read Hugging Face safetensors checkpoints tensor by tensor, without torch.

The safetensors format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte
offsets) and the raw tensor bytes. Tensors (or ranges of their rows) are read with positional reads into fresh
arrays: no mapping of the file, so the process holds only what it asked for (a memory map would count every page
read so far in its RSS until the map is closed). bf16 is widened to float32 (its high 16 bits).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from ortlora.errors import ModelError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_READ_CHUNK = 1 << 26  # bytes per read call (Linux reads at most ~2 GiB at once); bf16's staging block


class SafetensorsFile:
    """One `.safetensors` file, read on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                self._size = os.fstat(f.fileno()).st_size
                if n > self._size:
                    raise ValueError(f"its header claims {n} bytes, the file has {self._size}")
                header = json.loads(f.read(n))
        except OSError as exc:
            raise ModelError(f"cannot open {self.path}: {exc}") from None
        except (struct.error, ValueError, UnicodeDecodeError) as exc:
            raise ModelError(f"{self.path} is not a safetensors file: {exc}") from None
        self._data_start = 8 + n
        header.pop("__metadata__", None)
        self.header: dict[str, dict] = header

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def dtype(self, name: str) -> str:
        return self.header[name]["dtype"]

    def get(self, name: str) -> np.ndarray:
        """The tensor as numpy (bf16 widened to float32)."""
        shape = self.shape(name)
        return self.get_rows(name, 0, shape[0] if shape else 1).reshape(shape)

    def get_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the tensor (its first axis), as `get` returns them: a slice of a large weight
        without reading the rest."""
        info = self.header[name]
        if info["dtype"] not in _DTYPES:
            raise ModelError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        dtype = np.dtype(_DTYPES[info["dtype"]])
        shape = tuple(info["shape"]) or (1,)
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        begin, end = info["data_offsets"]
        if self._data_start + end > self._size:
            raise ModelError(f"{self.path} is truncated: tensor {name} lies past the end of the file")
        if end - begin != shape[0] * row:
            raise ModelError(f"{self.path}: tensor {name} has {end - begin} bytes, its shape {list(shape)} needs "
                             f"{shape[0] * row}")
        if info["dtype"] == "BF16":  # float32 bits = bf16 bits << 16, a block of rows read at a time
            out = np.empty((stop - start, *shape[1:]), np.float32)
            bits = out.view(np.uint32).reshape(stop - start, -1)
            step = max(1, _READ_CHUNK // max(row, 1))
            for r in range(start, stop, step):
                raw = np.empty((min(step, stop - r), bits.shape[1]), np.uint16)
                self._read(raw, self._data_start + begin + r * row)
                np.left_shift(raw, 16, out=bits[r - start:r - start + len(raw)], dtype=np.uint32)
            return out
        out = np.empty((stop - start, *shape[1:]), dtype)
        self._read(out, self._data_start + begin + start * row)
        return out

    def _read(self, out: np.ndarray, offset: int) -> None:
        view = memoryview(out.reshape(-1).view(np.uint8))
        with open(self.path, "rb") as f:
            fd, done = f.fileno(), 0
            while done < len(view):
                n = os.preadv(fd, [view[done:done + _READ_CHUNK]], offset + done)
                if n <= 0:
                    raise ModelError(f"{self.path} is truncated: a read at byte {offset + done} returned nothing")
                done += n


class Checkpoint:
    """All safetensors shards of a Hugging Face model folder, addressed by tensor name."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (self.dir / s).is_file()]
            if missing:
                raise ModelError(f"{self.dir}: missing checkpoint shard(s) {', '.join(missing)} listed in {index.name}")
        else:
            shards = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not shards:
                bins = list(self.dir.glob("*.bin")) + list(self.dir.glob("*.pt"))
                hint = (" (only PyTorch .bin weights found: re-save it with save_pretrained(safe_serialization=True))"
                        if bins else "")
                raise ModelError(f"{self.dir} holds no .safetensors weights{hint}")
        self._files = {s: SafetensorsFile(self.dir / s) for s in shards}
        self._where = {k: f for f in self._files.values() for k in f.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def dtype(self, name: str) -> str:
        return self._file(name).dtype(name)

    def get(self, name: str) -> np.ndarray:
        return self._file(name).get(name)

    def get_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self._file(name).get_rows(name, start, stop)

    def _file(self, name: str) -> SafetensorsFile:
        try:
            return self._where[name]
        except KeyError:
            raise ModelError(f"{self.dir}: the checkpoint has no tensor {name!r}") from None
