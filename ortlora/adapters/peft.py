"""Read a PEFT LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`) without torch.

`read_peft` reads any LoRA folder (DoRA too, for `inspect`); `read_lora` and `peft_params` are for what is fed to
an exported model, and refuse DoRA. The parameters are in ONNX layout, ready to feed or to write: A as [in, r] and
B as [r, out] with the LoRA scale (alpha / r, or alpha / sqrt(r) for rsLoRA, per module through `rank_pattern` /
`alpha_pattern`) folded into a copy.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

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


@dataclass
class PeftAdapter:
    path: Path
    config: dict
    modules: dict[str, LoraModule] = field(default_factory=dict)

    @property
    def is_dora(self) -> bool:
        return bool(self.config.get("use_dora"))

    def onnx_tensors(self, dtype=np.float32) -> dict[str, np.ndarray]:
        """The model inputs / adapter parameters: `<module>.lora_A.weight` [in, r], `<module>.lora_B.weight` [r, out]."""
        out = {}
        for m in self.modules.values():
            a_name, b_name = naming.lora_input_names(m.name)
            out[a_name] = np.ascontiguousarray(m.a.T, dtype=dtype)
            out[b_name] = np.ascontiguousarray((m.b.astype(np.float32) * np.float32(m.scale)).T, dtype=dtype)
        return out


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
    if config.get("fan_in_fan_out"):
        raise AdapterError(f"{path}: fan_in_fan_out adapters (GPT-2 Conv1D layers) are not supported")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key, 8), (int, float)):
            raise AdapterError(f"{cfg_path}: {key} must be a number, got {config.get(key)!r}")
    return config


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
    """`read_peft`, refusing an adapter an exported model cannot run (DoRA): the one place that decides it."""
    adapter = read_peft(path)
    if adapter.is_dora:
        raise AdapterError(
            f"{path}: DoRA adapters (use_dora) are not supported: DoRA rescales each output column by "
            "magnitude / ||W + BA||, which needs the base weights' column norms inside the graph. Train a plain LoRA "
            "adapter (`ortlora finetune --method lora`), or merge this one into the base weights with PEFT's "
            "merge_and_unload() and export the merged model")
    return adapter


def peft_params(path: str | Path, dtype="float32") -> dict[str, np.ndarray]:
    """The `.onnx_adapter` parameters / model inputs of a PEFT LoRA folder: A [in, r], B [r, out], scale folded in."""
    return read_lora(path).onnx_tensors(np.dtype(dtype))
