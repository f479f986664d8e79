"""`generate_adapter`: one folder holding a model with LoRA inputs and one `.onnx_adapter` per PEFT adapter.

The work function of `ortlora generate-adapter` and `ortlora capture-onnx-graph -a`. Olive's generate-adapter takes
an ONNX model whose LoRA weights were captured as initializers and turns them into inputs plus an adapter file; an
ortlora export already has the LoRA inputs, so here the adapters are converted from their PEFT folders instead:

    OUT/model.onnx, model.onnx.data, genai_config.json, tokenizer...   (ortlora export: LoRA inputs, rank 0 default)
    OUT/adapters/<adapter folder name>.onnx_adapter                     (one per -a, checked against OUT/model.onnx)
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Sequence

from ortlora.errors import OrtloraError
from ortlora.fileutil import atomic_dir

ADAPTERS = "adapters"  # the folder of .onnx_adapter files inside an output folder
ADAPTER_TYPES = ("lora", "dora", "loha")
FORMATS = ("pt", "numpy", "safetensors", "onnx_adapter")


def generate_adapter(model: str | Path, output: str | Path, *, adapter_path: Sequence[str | Path] = (),
                     adapter_type: str = "lora", adapter_format: str = "onnx_adapter", dtype: str | None = None,
                     **export_kwargs) -> Path:
    """`model` is a Hugging Face folder (exported here with `export_kwargs`, LoRA inputs for the adapters' modules)
    or an exported ortlora folder (copied); each PEFT folder of `adapter_path` becomes OUT/adapters/NAME.onnx_adapter.
    Returns the output folder."""
    from ortlora.adapters import convert_adapters
    from ortlora.export import export

    if adapter_type not in ADAPTER_TYPES or adapter_format not in FORMATS:
        raise OrtloraError(f"--adapter_type {adapter_type} / --adapter_format {adapter_format}: choose from "
                           f"{', '.join(ADAPTER_TYPES)} / {', '.join(FORMATS)}")
    if adapter_type not in ("lora", "dora"):
        raise OrtloraError(f"--adapter_type {adapter_type}: ortlora models take LoRA and DoRA adapters only (LoHa is "
                           "a different product of matrices)")
    if adapter_format != "onnx_adapter":
        raise OrtloraError(f"--adapter_format {adapter_format}: ortlora writes .onnx_adapter files only (the format "
                           "onnxruntime and onnxruntime-genai load)")
    src = Path(model)
    exported = (src / "genai_config.json").is_file() or src.suffix == ".onnx"
    if exported and export_kwargs.get("lora_targets"):
        raise OrtloraError(f"{model} is already exported: its LoRA inputs are fixed (--lora-targets applies to a "
                           "Hugging Face folder)")
    with atomic_dir(output) as tmp:
        if exported:
            folder = src if src.is_dir() else src.parent
            shutil.copytree(folder, tmp, dirs_exist_ok=True)
        else:
            export(src, tmp, adapter_path=adapter_path, **{"dora": adapter_type == "dora", **export_kwargs})
        if adapter_path:
            (tmp / ADAPTERS).mkdir(exist_ok=True)
            convert_adapters(adapter_path, tmp / ADAPTERS, dtype=dtype, model=tmp)
        if not list(tmp.glob(f"{ADAPTERS}/*.onnx_adapter")):
            print("ortlora: note: no adapter given (-a PEFT_DIR): the folder has LoRA inputs and no adapter file",
                  file=sys.stderr)
    return Path(output)
