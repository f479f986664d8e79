"""Does an adapter fit a model? One check that lists every misfit at once, and the feeds of an adapter that fits.

An adapter may target a subset of the model's LoRA modules (the others keep their rank-0 defaults, i.e. act as
zero), but every tensor it holds must be a LoRA input of the model with the model's dtype and inner dimensions:
A [in, r] and B [r, out] with `in`/`out` equal to the model's and the same r for A and B; a DoRA adapter's
`dora_scale` [out] needs a model exported with those inputs.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ortlora import naming
from ortlora.errors import AdapterError
# the model folder's format lives in model_folder; these names stay importable from here for the runtime's callers
from ortlora.model_folder import Dim, LoraInput, load_model_proto, model_lora_inputs  # noqa: F401


def check_adapter(params: Mapping[str, np.ndarray], lora_inputs: Mapping[str, LoraInput], source: str,
                  *, allow_cast: bool = False) -> None:
    """Raise one AdapterError naming `source` that lists every tensor of `params` that does not fit the model.

    With `allow_cast`, a float dtype other than the model's is accepted (the caller casts); otherwise it is an error.
    """
    problems: list[str] = []
    modules: dict[str, dict[str, np.ndarray]] = {}
    model_dora = any(naming.is_dora_scale(k) for k in lora_inputs)
    dora = [k for k in params if naming.is_dora_scale(k)]
    if dora and not model_dora:
        raise AdapterError(f"{source} is a DoRA adapter, but the model was exported without DoRA inputs "
                           f"(<module>.dora_scale, e.g. {dora[0]}): export the model again with a DoRA adapter among "
                           "--adapter_path so that it takes them")
    for name, arr in params.items():
        parsed = naming.parse_input_name(name)
        if parsed is None:
            problems.append(f"extra: {name} is not a LoRA parameter name (expected <module>.lora_A.weight, "
                            "<module>.lora_B.weight or <module>.dora_scale)")
            continue
        modules.setdefault(parsed[0], {})[parsed[1]] = arr
        if name not in lora_inputs:
            problems.append(f"extra: {name} is not an input of the model")
        elif naming.is_dora_scale(name):
            want = lora_inputs[name]
            if np.shape(arr) != tuple(want.shape):
                problems.append(f"mis-shaped: {name} is {list(np.shape(arr))}, the model wants {_fmt(want.shape)}")
            if np.asarray(arr).dtype != want.dtype and not (allow_cast and np.asarray(arr).dtype.kind == "f"):
                problems.append(f"mis-typed: {name} is {np.asarray(arr).dtype}, the model's input is {want.dtype}")
    if not lora_inputs:
        problems.insert(0, "the model has no LoRA inputs (export it with --adapter_path or --lora-targets)")
    for module, parts in sorted(modules.items()):
        a_name, b_name = naming.lora_input_names(module)
        parts = {k: v for k, v in parts.items() if k != naming.DORA_SCALE}
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
