"""Read Hugging Face safetensors checkpoints tensor by tensor, without torch.

The safetensors format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte
offsets) and the raw tensor bytes. Files are memory-mapped, so reading one tensor touches only its pages: peak
memory stays near the largest tensor rather than the model. bf16 is widened to float32 (its high 16 bits).
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import numpy as np

from ortlora.errors import ModelError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsFile:
    """One `.safetensors` file, memory-mapped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot open {self.path}: {exc}") from None
        try:
            (n,) = struct.unpack("<Q", self._mmap[:8])
            header = json.loads(self._mmap[8 : 8 + n])
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
        """The tensor as numpy (bf16 widened to float32). A view into the map when no conversion is needed."""
        info = self.header[name]
        if info["dtype"] not in _DTYPES:
            raise ModelError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        if self._data_start + end > len(self._mmap):
            raise ModelError(f"{self.path} is truncated: tensor {name} lies past the end of the file")
        arr = np.frombuffer(self._mmap, dtype=_DTYPES[info["dtype"]], count=(end - begin) // np.dtype(_DTYPES[info["dtype"]]).itemsize,
                            offset=self._data_start + begin).reshape(info["shape"])
        if info["dtype"] == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return arr


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
                hint = " (only PyTorch .bin weights found: re-save it with save_pretrained(safe_serialization=True))" if bins else ""
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

    def _file(self, name: str) -> SafetensorsFile:
        try:
            return self._where[name]
        except KeyError:
            raise ModelError(f"{self.dir}: the checkpoint has no tensor {name!r}") from None
