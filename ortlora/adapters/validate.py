"""Does an adapter fit a model? The LoRA inputs of an exported model, and one check that lists every misfit at once.

An adapter may target a subset of the model's LoRA modules (the others keep their rank-0 defaults, i.e. act as
zero), but every tensor it holds must be a LoRA input of the model with the model's dtype and inner dimensions:
A [in, r] and B [r, out] with `in`/`out` equal to the model's and the same r for A and B.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from ortlora import naming
from ortlora.errors import AdapterError, ModelError

Dim = int | str | None


@dataclass(frozen=True)
class LoraInput:
    name: str  # the graph input's own name (what to feed); dict keys are ortlora's spelling of it
    dtype: np.dtype
    shape: tuple[Dim, ...]  # e.g. (64, "<module>.lora_r") for A, ("<module>.lora_r", 128) for B


def load_model_proto(model):
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        raise ModelError(f"{model}: no model.onnx (an exported ortlora / onnxruntime-genai folder was expected)")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise ModelError(f"{path}: cannot read the ONNX model: {exc}") from None


def model_lora_inputs(model) -> dict[str, LoraInput]:
    """The LoRA inputs (`<module>.lora_A|B.weight`) of `model`: a folder, a model.onnx path or an onnx.ModelProto.

    Only the graph's input declarations are read; the weights (external data) are never loaded.
    """
    from onnx.helper import tensor_dtype_to_np_dtype

    proto = load_model_proto(model)
    out = {}
    for vi in proto.graph.input:
        key = naming.from_genai_spelling(vi.name)
        if naming.parse_input_name(key) is None:
            continue
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        out[key] = LoraInput(vi.name, np.dtype(tensor_dtype_to_np_dtype(tt.elem_type)), dims)
    return out


def check_adapter(params: Mapping[str, np.ndarray], lora_inputs: Mapping[str, LoraInput], source: str,
                  *, allow_cast: bool = False) -> None:
    """Raise one AdapterError naming `source` that lists every tensor of `params` that does not fit the model.

    With `allow_cast`, a float dtype other than the model's is accepted (the caller casts); otherwise it is an error.
    """
    problems: list[str] = []
    modules: dict[str, dict[str, np.ndarray]] = {}
    for name, arr in params.items():
        parsed = naming.parse_input_name(name)
        if parsed is None:
            problems.append(f"extra: {name} is not a LoRA parameter name (expected <module>.lora_A.weight or "
                            "<module>.lora_B.weight)")
            continue
        modules.setdefault(parsed[0], {})[parsed[1]] = arr
        if name not in lora_inputs:
            problems.append(f"extra: {name} is not an input of the model")
    if not lora_inputs:
        problems.insert(0, "the model has no LoRA inputs (export it with --adapter_path or --lora-targets)")
    for module, parts in sorted(modules.items()):
        a_name, b_name = naming.lora_input_names(module)
        for kind, name in ((naming.LORA_A, a_name), (naming.LORA_B, b_name)):
            if kind not in parts:
                other = naming.LORA_B if kind == naming.LORA_A else naming.LORA_A
                problems.append(f"missing: {name} ({module} has {other} but not {kind})")
        shapes = {k: np.shape(v) for k, v in parts.items()}
        for kind, name in ((naming.LORA_A, a_name), (naming.LORA_B, b_name)):
            if kind not in parts or name not in lora_inputs:
                continue
            arr, want = parts[kind], lora_inputs[name]
            shape = shapes[kind]
            inner = 0 if kind == naming.LORA_A else 1  # A: [in, r], B: [r, out]
            if len(shape) != 2 or len(want.shape) != 2:
                problems.append(f"mis-shaped: {name} is {list(shape)}, the model wants {_fmt(want.shape)}")
            elif isinstance(want.shape[inner], int) and shape[inner] != want.shape[inner]:
                problems.append(f"mis-shaped: {name} is {list(shape)}, the model wants {_fmt(want.shape)}")
            dtype = np.asarray(arr).dtype
            if dtype != want.dtype and not (allow_cast and dtype.kind == "f"):
                problems.append(f"mis-typed: {name} is {dtype}, the model's input is {want.dtype}")
        if len(shapes) == 2 and all(len(s) == 2 for s in shapes.values()):
            ra, rb = shapes[naming.LORA_A][1], shapes[naming.LORA_B][0]
            if ra != rb:
                problems.append(f"mis-shaped: {module} has rank {ra} in lora_A {list(shapes[naming.LORA_A])} but "
                                f"{rb} in lora_B {list(shapes[naming.LORA_B])}")
    if problems:
        hint = ""
        if any(p.startswith("extra:") for p in problems) and lora_inputs:
            targets = sorted({naming.target_name(naming.parse_input_name(k)[0]) for k in lora_inputs})
            hint = (f"\n(the model's LoRA targets are {', '.join(targets)}, e.g. input {next(iter(lora_inputs))}; an "
                    "adapter for another base model or other target modules needs a model exported with it: "
                    "`ortlora export --adapter_path ...`)")
        raise AdapterError(f"{source} does not fit the model ({len(problems)} problem"
                           f"{'s' if len(problems) != 1 else ''}):\n  " + "\n  ".join(problems) + hint)


def model_feeds(params: Mapping[str, np.ndarray], lora_inputs: Mapping[str, LoraInput], source: str,
                *, allow_cast: bool = True) -> dict[str, np.ndarray]:
    """`check_adapter`, then the arrays keyed by the model's own input names and cast to its input dtypes
    (zero-copy where the dtype already matches): ready for `InferenceSession.run`."""
    check_adapter(params, lora_inputs, source, allow_cast=allow_cast)
    out = {}
    for name, arr in params.items():
        want = lora_inputs[name]
        out[want.name] = arr if arr.dtype == want.dtype else arr.astype(want.dtype)
    return out


def _fmt(shape: tuple[Dim, ...]) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in shape) + "]"
