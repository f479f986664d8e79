"""Weighted combinations of LoRA adapters, exact: `sum_i w_i · B_i · A_i` as one adapter of rank `sum_i r_i`.

    combine([params_1, params_2], [0.7, 0.3])       -> params (A's side by side, each B times its weight, stacked)
    merge_adapters(["a1.onnx_adapter", "a2/"], "mix.onnx_adapter", weights=[0.7, 0.3])

What the combined adapter computes in every module, where adapter i has A_i [in, r_i] and B_i [r_i, out] (its LoRA
scale already folded into B_i):

    x @ [A_1 | A_2 | ...] @ [w_1·B_1 ; w_2·B_2 ; ...]  =  sum_i w_i · (x @ A_i) @ B_i

A module only some adapters target gets only theirs. One adapter with weight w is that adapter at scale w (w = 0: no
adapter at all). A DoRA adapter's output is not linear in its delta: its factor m / ||W + s·B·A|| depends on the
scale through the base weights W, so a DoRA adapter at scale c needs them (`base`) and gets, exactly as PEFT with
its scaling multiplied by c,

    B' = c·B,   dora_scale' = dora_scale · ||W + s·B·A|| / ||W + c·s·B·A||     (m = dora_scale · ||W + s·B·A||)

and is refused in combinations (a sum of DoRA adapters is not a DoRA adapter). `ortlora.runtime.adapters.Adapters`
builds the same combinations per request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ortlora import naming
from ortlora.errors import AdapterError, AdapterInvalid, OrtloraError

Params = Mapping[str, np.ndarray]

AdapterSpec = str | Mapping[str, float] | None  # a name, {name: weight}, or None (the base model)


@dataclass(frozen=True)
class Recipe:
    """A derived adapter: sum_i weight_i · adapter_i (names sorted; a single part is a scaled adapter)."""
    parts: tuple[tuple[str, float], ...]

    @classmethod
    def of(cls, spec: AdapterSpec, scale: float = 1.0) -> "Recipe | None":
        """The recipe `spec` at `scale`; None for the base model (no adapter, or every weight 0)."""
        try:
            return cls._of(spec, scale)
        except AdapterError as exc:
            raise (exc if isinstance(exc, AdapterInvalid) else AdapterInvalid(str(exc))) from None

    @classmethod
    def _of(cls, spec: AdapterSpec, scale: float) -> "Recipe | None":
        (scale,) = check_weights([scale])
        if spec is None:
            return None
        if isinstance(spec, str):
            items = [(spec, 1.0)]
        elif isinstance(spec, Mapping):
            if not spec:
                raise AdapterInvalid("an adapter combination needs at least one adapter")
            bad = [k for k in spec if not isinstance(k, str)]
            if bad:
                raise AdapterInvalid(f"adapter names must be strings, got {bad[0]!r}")
            items = sorted(zip(spec, check_weights(list(spec.values()))))
        else:
            raise AdapterInvalid(f"an adapter is a name or {{name: weight}}, got {type(spec).__name__}")
        parts = tuple((name, w * scale) for name, w in items if w * scale != 0.0)
        return cls(parts) if parts else None

    @property
    def plain(self) -> bool:
        return len(self.parts) == 1 and self.parts[0][1] == 1.0

    @property
    def label(self) -> str:
        return "+".join(f"{name}*{w:g}" for name, w in self.parts)




def check_weights(weights: Sequence[float]) -> list[float]:
    out = []
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise AdapterError(f"an adapter weight (scale) must be a finite number, got {w!r}")
        out.append(float(w))
    return out


def is_dora(params: Params) -> bool:
    return any(naming.is_dora_scale(k) for k in params)


def combine(params: Sequence[Params], weights: Sequence[float], labels: Sequence[str] | None = None,
            base: Callable[[str], np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The exact weighted sum of adapters `params` (input name -> array, A [in, r], B [r, out]); arrays keep their
    dtype (products are taken in float32). Unscaled A's of a single adapter are shared, not copied. `base`
    (module -> base weight [out, in]) lets a single DoRA adapter be scaled."""
    weights = check_weights(weights)
    labels = list(labels or [f"adapter {i + 1}" for i in range(len(params))])
    if len(params) != len(weights):
        raise AdapterError(f"{len(params)} adapters but {len(weights)} weights: give one weight per adapter")
    for p, w, label in zip(params, weights, labels):
        if is_dora(p) and len(params) > 1:
            raise AdapterError(f"{label} is a DoRA adapter: a sum of DoRA adapters is not one (each rescales the "
                               "weights by its own factor), so DoRA adapters are not combined")
        if is_dora(p) and w != 1.0 and base is None:
            raise AdapterError(f"{label} is a DoRA adapter: DoRA's factor magnitude / ||W + s·B·A|| changes with "
                               "the scale through the base weights, which are not at hand here (give the model)")
    if len(params) > 1:
        check_same_shapes(params, labels)
    if len(params) == 1 and weights[0] == 1.0:
        return dict(params[0])
    if len(params) == 1 and is_dora(params[0]) and weights[0] != 0.0:
        return _scaled_dora(params[0], weights[0], base)
    modules: dict[str, list[tuple[np.ndarray, np.ndarray, float]]] = {}
    for p, w in zip(params, weights):
        if w == 0.0:  # contributes nothing, exactly
            continue
        for name, a in p.items():
            if naming.is_lora_a(name):
                module = naming.parse_input_name(name)[0]
                _, b_name = naming.lora_input_names(module)
                if b_name not in p:
                    raise AdapterError(f"{name} has no {b_name}")
                modules.setdefault(module, []).append((a, p[b_name], w))
    out: dict[str, np.ndarray] = {}
    for module, parts in modules.items():
        a_name, b_name = naming.lora_input_names(module)
        dtype = parts[0][1].dtype
        out[a_name] = parts[0][0] if len(parts) == 1 else np.concatenate([a for a, _, _ in parts], axis=1)
        out[b_name] = np.concatenate([(b.astype(np.float32) * np.float32(w)).astype(dtype) for _, b, w in parts],
                                     axis=0)
    return out


def check_same_shapes(params: Sequence[Params], labels: Sequence[str]) -> None:
    """Raise one AdapterError listing every module whose input or output size differs between adapters (adapters
    of different base models: their A's [in, r] or B's [r, out] cannot be put side by side)."""
    seen: dict[str, tuple[int, str]] = {}  # "<module> in|out" -> (size, label of the first adapter with it)
    problems = []
    for p, label in zip(params, labels):
        for name, arr in p.items():
            parsed = naming.parse_input_name(name)
            if parsed is None or parsed[1] == naming.DORA_SCALE or np.ndim(arr) != 2:
                continue
            side, size = ("in", arr.shape[0]) if parsed[1] == naming.LORA_A else ("out", arr.shape[1])
            first = seen.setdefault(f"{parsed[0]} {side}", (size, label))
            if first[0] != size:
                problems.append(f"{parsed[0]}: {side}_features {first[0]} in {first[1]}, {size} in {label}")
    if problems:
        raise AdapterError(f"the adapters do not share a base model ({len(problems)} module"
                           f"{'s' if len(problems) != 1 else ''} differ in size):\n  "
                           + "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else ""))


def check_finite(params: Params, label: str, why: str = "") -> None:
    """Raise AdapterInvalid naming the tensors of `params` that hold NaN or infinities."""
    bad = sorted(k for k, v in params.items() if not np.isfinite(v).all())
    if bad:
        raise AdapterInvalid(f"{label}: {len(bad)} of {len(params)} tensors hold NaN or infinite values ("
                             f"{', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}){why}")


def _scaled_dora(params: Params, c: float, base: Callable[[str], np.ndarray]) -> dict[str, np.ndarray]:
    """A DoRA adapter at scale c: B' = c·B and each factor rescaled to m / ||W + c·ΔW|| (ΔW = (A·B)ᵀ [out, in])."""
    out = dict(params)
    for name, arr in params.items():
        if naming.is_lora_a(name) or naming.is_dora_scale(name):
            continue
        out[name] = (arr.astype(np.float32) * np.float32(c)).astype(arr.dtype)
    for name, factor in params.items():
        if not naming.is_dora_scale(name):
            continue
        module = naming.parse_input_name(name)[0]
        a_name, b_name = naming.lora_input_names(module)
        w = base(module).astype(np.float32)  # [out, in]
        delta = (params[a_name].astype(np.float32) @ params[b_name].astype(np.float32)).T
        ratio = np.linalg.norm(w + delta, axis=1) / np.linalg.norm(w + np.float32(c) * delta, axis=1)
        out[name] = (factor.astype(np.float32) * ratio).astype(factor.dtype)
    return out


def merge_adapters(adapter_path: Sequence[str | Path], output_path: str | Path, *,
                   weights: Sequence[float] | None = None, model: str | Path | None = None,
                   dtype: str = "float32") -> Path:
    """Write the weighted combination of adapters (PEFT folders or `.onnx_adapter` files) as one `.onnx_adapter`
    file; `weights` default to 1 each. With `model`, the result is checked against it (and PEFT DoRA folders get
    their factors from its weights)."""
    from ortlora.adapters import read_params
    from ortlora.adapters.onnx_adapter import write_onnx_adapter
    from ortlora.adapters.validate import check_adapter
    from ortlora.model_folder import model_lora_inputs

    paths = [Path(p) for p in adapter_path]
    if not paths:
        raise OrtloraError("merge-adapters needs at least one adapter")
    weights = check_weights([1.0] * len(paths) if weights is None else list(weights))
    if len(weights) != len(paths):
        raise OrtloraError(f"{len(paths)} adapters but {len(weights)} --weights: give one weight per adapter")
    params = [read_params(p, dtype, model=model) for p in paths]
    for p, path in zip(params, paths):
        check_finite(p, str(path))
    lora_inputs = model_lora_inputs(model) if model is not None else None
    if lora_inputs is not None:  # each input against the model first: its own misfits, named by its own file
        problems = []
        for p, path in zip(params, paths):
            try:
                check_adapter(p, lora_inputs, str(path), allow_cast=True)
            except AdapterError as exc:
                problems.append(str(exc))
        if problems:
            raise AdapterError("\n".join(problems))
    base = None
    if model is not None:
        from ortlora.adapters.base_weights import BaseWeights

        base = BaseWeights(model)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, as an error
        merged = combine(params, weights, [str(p) for p in paths], base)
        merged = {k: np.ascontiguousarray(v, dtype=np.dtype(dtype)) for k, v in merged.items()}
    if not merged:
        raise AdapterError("every weight is zero: the combination holds no LoRA weights")
    if lora_inputs is not None:
        check_adapter(merged, lora_inputs, str(output_path), allow_cast=True)
    check_finite(merged, f"the combination ({output_path})",
                 f": the weights {weights} overflow {dtype}; give smaller --weights"
                 + (" or --dtype float32" if dtype == "float16" else ""))
    return write_onnx_adapter(output_path, merged)
