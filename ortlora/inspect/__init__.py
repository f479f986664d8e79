"""`ortlora inspect PATH`: what an exported model folder, an `.onnx_adapter` file or a PEFT adapter folder holds.

Nothing heavy is loaded: a model's graph is read without its weights, an adapter file is memory-mapped.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from ortlora import naming
from ortlora.errors import AdapterInvalid, ModelError, OrtloraError


def inspect(path: str | Path, as_json: bool = False) -> str:
    """A text (or JSON) description of `path`."""
    info = describe(path)
    return json.dumps(info, indent=2) if as_json else _text(info)


def describe(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return _peft(path)
    if path.is_dir() or path.suffix == ".onnx":
        return _model(path)
    if path.is_file():
        return _adapter_file(path)
    raise OrtloraError(f"{path}: no such file or folder")


def _model(path: Path) -> dict:
    from ortlora.model_folder import load_model_proto, model_lora_inputs, read_genai_config, read_manifest

    folder = path if path.is_dir() else path.parent
    _raise_problems(path, _model_problems(path))
    proto = load_model_proto(path)
    manifest = read_manifest(folder)
    genai = read_genai_config(folder)
    lora = model_lora_inputs(proto)
    dora = [k for k in lora if naming.is_dora_scale(k)]
    modules = sorted({naming.parse_input_name(k)[0] for k in lora})
    params = 0
    for init in proto.graph.initializer:
        n = int(np.prod(init.dims, dtype=np.int64))
        if init.name.endswith((".scales", ".qzeros")):
            continue
        params += 2 * n if init.name.endswith(".qweight") else n  # int4: two weights per byte
    weights = [folder / "model.onnx", *folder.glob("*.data")]
    return {
        "kind": "model",
        "path": str(path),
        "architecture": manifest.get("architecture") or genai.get("model", {}).get("type"),
        "precision": manifest.get("precision"),
        "io_dtype": manifest.get("io_dtype") or next((str(i.dtype) for i in lora.values()), None),
        "context_length": manifest.get("context_length") or genai.get("model", {}).get("context_length"),
        "lora_targets": sorted({naming.target_name(m) for m in modules}),
        "lora_modules": len(modules),
        "dora_inputs": len(dora) or None,
        "lora_input_dtype": sorted({i.dtype.name for i in lora.values()}),
        "parameters": params,
        "size_bytes": sum(p.stat().st_size for p in set(weights) if p.is_file()),
        "onnxruntime_genai_config": bool(genai),
        "ortlora_version": manifest.get("ortlora_version"),
        "opset": {(o.domain or "ai.onnx"): o.version for o in proto.opset_import},
    }


def _model_problems(path: Path) -> list[str]:
    """What stops the runtime or onnxruntime-genai from loading the folder (or the model file) at `path`."""
    from ortlora.model_folder import GENAI_CONFIG, ModelInfo, folder_problems, model_file_problems

    if path.is_dir():
        return folder_problems(path)
    problems = model_file_problems(path)
    if (path.parent / GENAI_CONFIG).is_file():  # a bare .onnx file elsewhere has none, and needs none
        try:
            ModelInfo.read(path.parent)
        except ModelError as exc:
            problems.append(str(exc))
    return problems


def _raise_problems(path: Path, problems: list[str]) -> None:
    if len(problems) == 1:
        raise ModelError(problems[0])
    if problems:
        raise ModelError(f"{path}: {len(problems)} problems:\n  " + "\n  ".join(problems))


def _adapter_file(path: Path) -> dict:
    from ortlora.adapters.onnx_adapter import open_onnx_adapter

    f = open_onnx_adapter(path)
    bad = sorted(k for k, v in f.params.items() if not np.isfinite(v).all())
    if bad:  # the runtime refuses such an adapter on load
        raise AdapterInvalid(f"{path}: {len(bad)} of {len(f.params)} tensors hold NaN or infinite values "
                             f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
    return {
        "kind": "onnx_adapter",
        "path": str(path),
        "format_version": f.format_version,
        "adapter_version": f.adapter_version,
        "model_version": f.model_version,
        **_lora_summary({k: v.shape for k, v in f.params.items()}),
        "dtype": sorted({v.dtype.name for v in f.params.values()}),
        "parameters": int(sum(v.size for v in f.params.values())),
        "size_bytes": path.stat().st_size,
    }


def _peft(path: Path) -> dict:
    from ortlora.adapters.peft import read_peft

    adapter = read_peft(path)
    shapes = {}
    for m in adapter.modules.values():
        a, b = naming.lora_input_names(m.name)
        shapes[a], shapes[b] = (m.in_features, m.rank), (m.rank, m.out_features)
    cfg = adapter.config
    files = [p for p in path.iterdir() if p.name.startswith("adapter_model.")]
    return {
        "kind": "peft",
        "path": str(path),
        "base_model": cfg.get("base_model_name_or_path"),
        "peft_type": cfg.get("peft_type", "LORA"),
        "dora": adapter.is_dora,
        "rslora": bool(cfg.get("use_rslora")),
        "lora_alpha": cfg.get("lora_alpha"),
        **_lora_summary(shapes),
        "parameters": int(sum(np.prod(s) for s in shapes.values())),
        "size_bytes": sum(p.stat().st_size for p in files),
    }


def _lora_summary(shapes: dict[str, tuple]) -> dict:
    """Targets and ranks from parameter shapes (A [in, r], B [r, out])."""
    ranks: dict[str, set[int]] = defaultdict(set)
    modules = set()
    other = []
    dora = sorted(n for n in shapes if naming.is_dora_scale(n))
    for name, shape in shapes.items():
        if naming.is_dora_scale(name):
            continue
        parsed = naming.parse_input_name(name)
        if parsed is None or len(shape) != 2:
            other.append(name)
            continue
        module, kind = parsed
        modules.add(module)
        ranks[naming.target_name(module)].add(int(shape[1] if kind == naming.LORA_A else shape[0]))
    return {
        "lora_targets": sorted(ranks),
        "lora_modules": len(modules),
        "ranks": {t: sorted(r) for t, r in sorted(ranks.items())},
        **({"dora_factors": len(dora)} if dora else {}),
        **({"other_tensors": sorted(other)} if other else {}),
    }


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} K" if n >= 1e3 \
        else str(n)


def _text(info: dict) -> str:
    title = {"model": "model folder", "onnx_adapter": "adapter file (.onnx_adapter)", "peft": "PEFT adapter folder"}
    lines = [f"{title[info['kind']]}: {info['path']}"]
    for key, value in info.items():
        if key in ("kind", "path") or value in (None, [], {}):
            continue
        if key == "parameters":
            value = f"{_count(value)} ({value:,})"
        elif key == "size_bytes":
            key, value = "size", _size(value)
        elif key == "ranks":
            value = ", ".join(f"{t} r={'/'.join(map(str, r))}" for t, r in value.items())
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        elif isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        lines.append(f"  {key.replace('_', ' '):<24} {value}")
    return "\n".join(lines)
