"""Read a PEFT LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`) without torch.

`read_peft` reads any LoRA folder (for `inspect`); `read_lora` and `peft_params` are for what is fed to an exported
model. The parameters are in ONNX layout, ready to feed or to write: A as [in, r] and B as [r, out] with the LoRA
scale (alpha / r, or alpha / sqrt(r) for rsLoRA, per module through `rank_pattern` / `alpha_pattern`) folded into a
copy, and for DoRA `<module>.dora_scale` [out] = magnitude / ||W + s·B·A|| (row norms; needs the base weights).

This module is the one place that decides which `LoraConfig` fields ortlora honours and which it refuses
(`CONFIG_FIELDS`): nothing an adapter's config says is silently ignored.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ortlora import naming
from ortlora.checkpoint import SafetensorsFile
from ortlora.errors import AdapterError, ModelError


@dataclass
class LoraModule:
    name: str  # Hugging Face module path, e.g. model.layers.0.self_attn.q_proj
    a: np.ndarray  # torch layout [r, in]
    b: np.ndarray  # torch layout [out, r]
    scale: float
    magnitude: np.ndarray | None = None  # DoRA

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def in_features(self) -> int:
        return self.a.shape[1]

    @property
    def out_features(self) -> int:
        return self.b.shape[0]


WeightsOf = Callable[[str], np.ndarray]  # module -> its base weight [out, in] float32 (DoRA's norms)


@dataclass
class PeftAdapter:
    path: Path
    config: dict
    modules: dict[str, LoraModule] = field(default_factory=dict)

    @property
    def is_dora(self) -> bool:
        return bool(self.config.get("use_dora"))

    def onnx_tensors(self, dtype=np.float32, base: WeightsOf | None = None) -> dict[str, np.ndarray]:
        """The model inputs / adapter parameters: `<module>.lora_A.weight` [in, r], `<module>.lora_B.weight` [r, out]
        and for DoRA `<module>.dora_scale` [out], computed from `base(module)`, the base weight [out, in]."""
        if self.is_dora and base is None:
            raise AdapterError(f"{self.path}: a DoRA adapter's factor magnitude / ||W + s·B·A|| needs the base model's "
                               "weights: give the exported model (--model)")
        out = {}
        for m in self.modules.values():
            a_name, b_name = naming.lora_input_names(m.name)
            out[a_name] = np.ascontiguousarray(m.a.T, dtype=dtype)
            out[b_name] = np.ascontiguousarray((m.b.astype(np.float32) * np.float32(m.scale)).T, dtype=dtype)
            if self.is_dora:
                out[naming.dora_scale_name(m.name)] = dora_scale(m, base(m.name)).astype(dtype)
        return out


def dora_scale(m: LoraModule, w: np.ndarray) -> np.ndarray:
    """PEFT's DoRA factor of one module [out]: magnitude / ||W + scale·B·A|| over each output row of W [out, in]."""
    if w.shape != (m.out_features, m.in_features):
        raise AdapterError(f"{m.name}: the base weight is {list(w.shape)}, the adapter is "
                           f"{m.out_features}x{m.in_features} (an adapter for another base model?)")
    norm = np.linalg.norm(w.astype(np.float32) + np.float32(m.scale) * (m.b @ m.a), axis=1)
    return m.magnitude / norm


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: a pattern key matches a module path that equals it or ends with `.<key>` (regex allowed)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def read_config(path: Path) -> dict:
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        raise AdapterError(f"{path} has no adapter_config.json: not a PEFT adapter folder")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{cfg_path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{cfg_path} does not hold a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"{path}: PEFT type {peft_type} is not supported; only LoRA adapters (peft_type LORA) are")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key, 8), (int, float)):
            raise AdapterError(f"{cfg_path}: {key} must be a number, got {config.get(key)!r}")
    refused = [f"{key}={config[key]!r}: {why}" for key, why in _refusals(config)]
    if refused:
        raise AdapterError(f"{path}: adapter_config.json asks for what ortlora cannot run exactly:\n  "
                           + "\n  ".join(refused))
    return config


# Every LoraConfig field (PEFT 0.21) and what ortlora does with it. EXACT: honoured, or no effect on inference.
# REFUSED: refused by name when set to anything but its default (`_DEFAULTS`). A field not listed (a newer PEFT's) is
# refused when set, so that nothing is silently ignored.
EXACT = {
    "task_type": "metadata", "peft_type": "LORA only (checked)", "auto_mapping": "metadata",
    "peft_version": "metadata", "base_model_name_or_path": "metadata", "revision": "metadata",
    "inference_mode": "metadata", "runtime_config": "runtime placement only",
    "r": "the scale alpha / r", "lora_alpha": "the scale", "use_rslora": "the scale alpha / sqrt(r)",
    "rank_pattern": "per-module rank, checked against the weights", "alpha_pattern": "per-module scale",
    "target_modules": "the weights say which modules", "exclude_modules": "the weights say which modules",
    "layers_to_transform": "the weights say which layers", "layers_pattern": "the weights say which layers",
    "lora_dropout": "training only", "use_dora": "DoRA: the dora_scale inputs",
    "init_lora_weights": "initialization only, except the variants in _BASE_CHANGING_INIT (refused)",
    "eva_config": "EVA initializes A only", "ensure_weight_tying": "only with modules_to_save (refused)",
}
REFUSED = {
    "fan_in_fan_out": "GPT-2 style Conv1D layers are not supported",
    "bias": "the adapter trained the base model's biases, which an exported model keeps frozen",
    "modules_to_save": "whole trained modules replace the base model's, which an exported model keeps frozen "
                       "(merge them with PEFT's merge_and_unload() and export the merged model)",
    "lora_bias": "lora_B carries a bias that ortlora's LoRA inputs do not hold; it would be dropped",
    "target_parameters": "LoRA on raw parameters (e.g. MoE experts) is not supported",
    "trainable_token_indices": "trained embedding rows are not supported",
    "layer_replication": "it changes the base model's layers",
    "megatron_config": "Megatron parallel layers are not supported", "megatron_core": "see megatron_config",
    "loftq_config": "LoftQ changes the base weights", "corda_config": "CorDA changes the base weights",
    "lora_ga_config": "LoRA-GA changes the base weights",
    "velora_config": "VeLoRA is not supported", "alora_invocation_tokens": "activated LoRA (aLoRA) applies the "
    "adapter only after its invocation tokens, which ortlora does not do",
    "use_qalora": "QA-LoRA pools the input, which ortlora's LoRA term does not do",
    "qalora_group_size": "see use_qalora", "monteclora_config": "MonteCLoRA is not supported",
    "use_bdlora": "BD-LoRA is not supported", "arrow_config": "Arrow routing is not supported",
    "kasa_config": "KaSA is not supported",
}
_DEFAULTS = {"bias": "none", "megatron_core": "megatron.core", "qalora_group_size": 16}
# init_lora_weights variants after which the adapter expects a changed base model (W minus its principal part)
_BASE_CHANGING_INIT = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _refusals(config: dict):
    """(field, why) for every field of `config` that ortlora cannot honour exactly."""
    for key, value in config.items():
        if key in EXACT:
            continue
        if value in (None, False, [], {}, "", _DEFAULTS.get(key)):
            continue
        yield key, REFUSED.get(key, "a LoraConfig field ortlora does not know (a newer PEFT?)")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INIT):
        yield "init_lora_weights", (f"{init} initialization changes the base weights, which an exported model "
                                    "keeps: save the adapter with PEFT's path_initial_model_for_weight_conversion "
                                    "(a plain LoRA of the original base) and convert that")


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    st = path / "adapter_model.safetensors"
    if st.is_file():
        try:
            f = SafetensorsFile(st)
            return {k: f.get(k) for k in f.keys()}
        except ModelError as exc:
            raise AdapterError(str(exc)) from None
    binf = path / "adapter_model.bin"
    if binf.is_file():
        try:
            import torch
        except ImportError:
            raise AdapterError(f"{binf} is a PyTorch file: install ortlora[train] to read it, or save the adapter "
                               "with safe_serialization=True") from None
        state = torch.load(binf, map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in state.items()}
    raise AdapterError(f"{path} has no adapter_model.safetensors (or adapter_model.bin)")


def read_peft(path: str | Path) -> PeftAdapter:
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path} is not a folder (a PEFT adapter folder was expected)")
    config = read_config(path)
    tensors = _read_tensors(path)
    r0, alpha0 = config.get("r", 8), config.get("lora_alpha", 8)
    parts: dict[str, dict[str, np.ndarray]] = {}
    problems = []
    for key, value in tensors.items():
        try:
            module, kind = naming.parse_peft_key(key)
        except ValueError:
            problems.append(f"unexpected tensor {key}")
            continue
        parts.setdefault(module, {})[kind] = value
    adapter = PeftAdapter(path, config)
    for module, p in sorted(parts.items()):
        if "lora_embedding_A" in p or "lora_embedding_B" in p:
            problems.append(f"{module}: LoRA on embeddings is not supported")
            continue
        if naming.LORA_A not in p or naming.LORA_B not in p:
            problems.append(f"{module}: has {'lora_A' if naming.LORA_A in p else 'lora_B'} but not the other")
            continue
        a, b = p[naming.LORA_A], p[naming.LORA_B]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            problems.append(f"{module}: lora_A {a.shape} and lora_B {b.shape} do not form a rank-r pair")
            continue
        r = a.shape[0]
        alpha = _pattern_value(config.get("alpha_pattern"), module, alpha0)
        declared_r = _pattern_value(config.get("rank_pattern"), module, r0)
        if declared_r != r:
            problems.append(f"{module}: rank {r} in the weights but {declared_r} in adapter_config.json")
            continue
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        mag = p.get(naming.MAGNITUDE)
        adapter.modules[module] = LoraModule(module, a.astype(np.float32), b.astype(np.float32), float(scale),
                                             None if mag is None else mag.astype(np.float32))
    if problems:
        raise AdapterError(f"{path}: " + "; ".join(problems))
    if not adapter.modules:
        raise AdapterError(f"{path}: the adapter holds no LoRA weights")
    return adapter


def read_lora(path: str | Path) -> PeftAdapter:
    """`read_peft`, checking that every module of a DoRA adapter has its magnitude (and no other has one)."""
    adapter = read_peft(path)
    with_mag = [m.name for m in adapter.modules.values() if m.magnitude is not None]
    if adapter.is_dora and len(with_mag) != len(adapter.modules):
        missing = sorted(set(adapter.modules) - set(with_mag))
        raise AdapterError(f"{path}: use_dora is set but {len(missing)} module(s) have no lora_magnitude_vector, "
                           f"e.g. {missing[0]}")
    if not adapter.is_dora and with_mag:
        raise AdapterError(f"{path}: lora_magnitude_vector tensors (DoRA) but use_dora is not set in "
                           "adapter_config.json")
    for m in adapter.modules.values():
        if m.magnitude is not None and m.magnitude.shape != (m.out_features,):
            raise AdapterError(f"{path}: {m.name}'s lora_magnitude_vector is {list(m.magnitude.shape)}, "
                               f"expected [{m.out_features}]")
    return adapter


def peft_params(path: str | Path, dtype="float32", base: WeightsOf | None = None) -> dict[str, np.ndarray]:
    """The `.onnx_adapter` parameters / model inputs of a PEFT LoRA folder: A [in, r], B [r, out], scale folded in;
    for DoRA also the dora_scale factors, from `base` (module -> base weight [out, in])."""
    return read_lora(path).onnx_tensors(np.dtype(dtype), base)
