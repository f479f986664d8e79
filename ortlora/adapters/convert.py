"""PEFT LoRA adapter folders -> `.onnx_adapter` files, optionally checked against an exported model first.

    from ortlora.adapters.convert import convert_adapter
    convert_adapter("peft_dir", "out/name.onnx_adapter", model="onnx_dir")

Every adapter is read and checked before anything is written, so a bad input leaves no output file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ortlora.adapters.onnx_adapter import SUFFIX, write_onnx_adapter
from ortlora.adapters.base_weights import BaseWeights
from ortlora.adapters.peft import peft_params
from ortlora.adapters.validate import check_adapter
from ortlora.errors import AdapterError, OrtloraError
from ortlora.model_folder import model_lora_inputs

DTYPES = ("float32", "float16")


def convert_adapter(adapter_path: str | Path, output_path: str | Path, dtype: str | None = None,
                    model: str | Path | None = None, *, adapter_version: int = 1, model_version: int = 1) -> Path:
    """Convert one PEFT adapter folder; returns the written file.

    `dtype` None means the model's LoRA input dtype when `model` is given, else float32. With `model`, the adapter
    must fit the model exactly (dtype included: a float16 file for a float32 model is refused here, because
    onnxruntime and onnxruntime-genai would reject it; the ortlora runtime alone casts on load). A DoRA adapter
    needs `model`: its dora_scale factors are computed against the model's base weights (int4 ones dequantized).
    """
    return convert_adapters([adapter_path], output_path, dtype=dtype, model=model, adapter_version=adapter_version,
                            model_version=model_version)[0]


def convert_adapters(adapter_path: Sequence[str | Path], output_path: str | Path, dtype: str | None = None,
                     model: str | Path | None = None, *, adapter_version: int = 1,
                     model_version: int = 1) -> list[Path]:
    """Convert PEFT adapter folders. With one adapter `output_path` is the file (or an existing folder to write
    `<adapter folder name>.onnx_adapter` into); with several it is a folder. Returns the written files."""
    paths = [Path(p) for p in adapter_path]
    if not paths:
        raise OrtloraError("no --adapter_path given")
    if dtype is not None and dtype not in DTYPES:
        raise OrtloraError(f"--dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    targets = _output_files(paths, Path(output_path))
    lora_inputs = model_lora_inputs(model) if model is not None else None
    if dtype is None:
        dtype = _model_dtype(lora_inputs) if lora_inputs else "float32"
    converted = []
    problems = []
    base = BaseWeights(model) if model is not None else None  # DoRA's norms are taken against the model's weights
    for path in paths:
        try:
            params = peft_params(path, dtype, base)
            if lora_inputs is not None:
                _check_dtype(path, dtype, lora_inputs)
                check_adapter(params, lora_inputs, str(path))
            converted.append(params)
        except AdapterError as exc:
            problems.append(str(exc))
    if problems:
        raise AdapterError("\n".join(problems))
    return [write_onnx_adapter(target, params, adapter_version=adapter_version, model_version=model_version)
            for target, params in zip(targets, converted)]


def _output_files(paths: list[Path], output: Path) -> list[Path]:
    if len(paths) == 1 and not output.is_dir():
        return [output]
    if output.exists() and not output.is_dir():
        raise OrtloraError(f"--output_path {output} is a file; with several adapters it must be a folder")
    names = [p.absolute().name + SUFFIX for p in paths]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise OrtloraError(f"several adapter folders share a name, so their outputs would collide: {', '.join(dupes)}")
    return [output / n for n in names]


def _model_dtype(lora_inputs) -> str:
    dtypes = {i.dtype.name for i in lora_inputs.values()}
    return dtypes.pop() if len(dtypes) == 1 else "float32"


def _check_dtype(path: Path, dtype: str, lora_inputs) -> None:
    wanted = sorted({i.dtype.name for i in lora_inputs.values()})
    if wanted and wanted != [dtype]:
        raise AdapterError(f"{path}: --dtype {dtype}, but the model's LoRA inputs are {', '.join(wanted)}: convert "
                           f"with --dtype {wanted[0]} (or leave --dtype out when --model is given)")
