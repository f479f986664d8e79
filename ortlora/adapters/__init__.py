"""Adapters: PEFT checkpoints in, `.onnx_adapter` files out, and the check that an adapter fits a model.

    read_params("peft_dir" or "a.onnx_adapter")          -> {input name: array}, A [in, r], B [r, out]
    adapter_feeds(path, model_lora_inputs(folder))       -> checked, cast, keyed for InferenceSession.run

One reader per format (`peft.py`, `onnx_adapter.py`); this module only dispatches on what the path is.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    import numpy as np

    from ortlora.model_folder import LoraInput


def adapter_kind(path: str | Path) -> str | None:
    """'peft' (a PEFT adapter folder), 'onnx_adapter' (a `.onnx_adapter` file) or None (neither)."""
    from ortlora.adapters.onnx_adapter import SUFFIX

    path = Path(path)
    if path.is_dir():
        return "peft"
    return "onnx_adapter" if path.is_file() and path.name.endswith(SUFFIX) else None


def read_params(path: str | Path, dtype="float32", model: str | Path | None = None) -> dict[str, "np.ndarray"]:
    """An adapter's parameters by ONNX input name: a PEFT folder (`dtype`; a DoRA one needs `model`, the exported
    folder whose base weights its factors are computed against) or an `.onnx_adapter` file (as stored,
    memory-mapped)."""
    from ortlora.adapters.base_weights import BaseWeights
    from ortlora.adapters.onnx_adapter import SUFFIX, read_onnx_adapter
    from ortlora.adapters.peft import peft_params
    from ortlora.errors import AdapterError

    kind = adapter_kind(path)
    if kind == "peft":
        return peft_params(path, dtype, BaseWeights(model) if model is not None else None)
    if kind == "onnx_adapter":
        return read_onnx_adapter(path)
    raise AdapterError(f"{path}: not a PEFT adapter folder or {SUFFIX} file")


def adapter_feeds(path: str | Path, lora_inputs: Mapping[str, "LoraInput"],
                  model: str | Path | None = None) -> dict[str, "np.ndarray"]:
    """The adapter at `path` checked against a model's LoRA inputs and keyed / cast for `InferenceSession.run`
    (`model`: the exported folder, for a DoRA PEFT folder's factors)."""
    from ortlora.adapters.validate import model_feeds

    return model_feeds(read_params(path, model=model), lora_inputs, str(path))



def __getattr__(name: str):
    # the commands' work functions, imported on first use (convert imports this package's modules)
    if name == "convert_adapters":
        from ortlora.adapters.convert import convert_adapters

        return convert_adapters
    if name == "merge_adapters":
        from ortlora.adapters.merge import merge_adapters

        return merge_adapters
    raise AttributeError(f"module 'ortlora.adapters' has no attribute {name!r}")
