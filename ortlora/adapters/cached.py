"""PEFT adapter folders served as they are: converted to `.onnx_adapter` on first use, checked against the model,
and cached by content, so a server pointed at a folder of PEFT adapters converts each once.

    path = convert_cached("adapters/acme", engine.lora_inputs, "adapters/.ortlora-cache")

The cache key is a hash of the adapter's files (config and weights) and of the model's LoRA inputs (names, dtypes,
shapes): a retrained adapter, or the same adapter for another model, gets a new file; an unchanged one is found
again without reading its weights into a conversion.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Mapping

from ortlora.adapters.convert import _model_dtype, peft_params
from ortlora.adapters.onnx_adapter import SUFFIX, write_onnx_adapter
from ortlora.adapters.validate import LoraInput, check_adapter
from ortlora.errors import AdapterError

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def is_peft_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "adapter_config.json").is_file()


def peft_folders(root: str | Path) -> list[Path]:
    """The PEFT adapter folders directly inside `root` (what a server given `--adapters root` can convert)."""
    root = Path(root)
    return sorted(p for p in root.iterdir() if is_peft_folder(p)) if root.is_dir() else []


def cache_key(peft_dir: str | Path, lora_inputs: Mapping[str, LoraInput]) -> str:
    """sha256 of the adapter's files and the model's LoRA input signature (hex)."""
    h = hashlib.sha256()
    for name in PEFT_FILES:
        f = Path(peft_dir) / name
        if f.is_file():
            h.update(name.encode() + b"\0")
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    signature = sorted((k, v.dtype.name, [str(d) for d in v.shape]) for k, v in lora_inputs.items())
    h.update(json.dumps(signature).encode())
    return h.hexdigest()


def convert_cached(peft_dir: str | Path, lora_inputs: Mapping[str, LoraInput], cache_dir: str | Path) -> Path:
    """The `.onnx_adapter` for PEFT folder `peft_dir` and a model with `lora_inputs`: from `cache_dir` when converted
    before, else converted now (in the model's LoRA dtype), checked against the model (AdapterError listing every
    misfit, nothing written) and written atomically. Old conversions of the same folder are removed."""
    peft_dir = Path(peft_dir)
    if not is_peft_folder(peft_dir):
        raise AdapterError(f"{peft_dir} has no adapter_config.json: not a PEFT adapter folder")
    cache_dir = Path(cache_dir)
    stem = peft_dir.absolute().name
    target = cache_dir / f"{stem}-{cache_key(peft_dir, lora_inputs)[:16]}{SUFFIX}"
    if target.is_file():
        return target
    params = peft_params(peft_dir, _model_dtype(lora_inputs) if lora_inputs else "float32")
    check_adapter(params, lora_inputs, str(peft_dir))
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_onnx_adapter(target, params)
    for old in cache_dir.glob(f"{stem}-*{SUFFIX}"):  # earlier versions of this folder
        if old != target and len(old.name) == len(target.name):
            old.unlink(missing_ok=True)
    return target
