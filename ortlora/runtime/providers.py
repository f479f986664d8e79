"""Which onnxruntime execution provider a model folder runs on: the one its genai_config.json names, or a refusal.

genai_config.json names the provider as onnxruntime-genai does, in the decoder's
`session_options.provider_options` (`[{"cuda": {...}}]`; none = the CPU). ortlora honours it as onnxruntime-genai
does: when the installed onnxruntime does not offer that provider the model does not load and the error names the
package that has it; nothing silently falls back to the CPU. An override (`--provider cpu` on generate/serve, or
`Engine(provider=...)`) replaces the folder's choice.

KV cache and adapters stay in host memory (numpy, bound through IOBinding); with CUDA onnxruntime copies them to the
device on each run. Keeping them in device memory needs OrtValues allocated on the device and was not done: no GPU
was available to test it.
"""

from __future__ import annotations

import json
from pathlib import Path

from ortlora.errors import ModelError

# genai_config / Olive spelling -> (onnxruntime provider, the pip package whose onnxruntime has it)
PROVIDERS: dict[str, tuple[str, str]] = {
    "cpu": ("CPUExecutionProvider", "onnxruntime"),
    "cuda": ("CUDAExecutionProvider", "onnxruntime-gpu"),
    "tensorrt": ("TensorrtExecutionProvider", "onnxruntime-gpu"),
    "nvtensorrtrtx": ("NvTensorRTRTXExecutionProvider", "onnxruntime-ep-nv-tensorrt-rtx"),
    "dml": ("DmlExecutionProvider", "onnxruntime-directml"),
    "rocm": ("ROCMExecutionProvider", "onnxruntime-rocm"),
    "migraphx": ("MIGraphXExecutionProvider", "onnxruntime-migraphx"),
    "openvino": ("OpenVINOExecutionProvider", "onnxruntime-openvino"),
    "qnn": ("QNNExecutionProvider", "onnxruntime-qnn"),
    "webgpu": ("WebGpuExecutionProvider", "onnxruntime-ep-webgpu"),
    "vitisai": ("VitisAIExecutionProvider", "onnxruntime-vitisai"),
    "coreml": ("CoreMLExecutionProvider", "onnxruntime (macOS build)"),
    "js": ("JsExecutionProvider", "onnxruntime-web (a browser build)"),
}
def canonical(name: str) -> str:
    """`CUDAExecutionProvider`, `cuda`, `gpu` -> `cuda`; an unknown name -> ModelError listing the known ones."""
    key = name.strip().lower().removesuffix("executionprovider").replace("_", "").replace("-", "")
    key = {"gpu": "cuda", "directml": "dml", "trt": "tensorrt"}.get(key, key)
    if key not in PROVIDERS:
        raise ModelError(f"unknown execution provider {name!r}; known: {', '.join(PROVIDERS)}")
    return key


def configured(folder: str | Path) -> str:
    """The provider genai_config.json's decoder asks for (`cpu` when it names none, or there is no such file)."""
    path = Path(folder) / "genai_config.json"
    if not path.is_file():
        return "cpu"
    try:
        session = json.loads(path.read_text())["model"]["decoder"].get("session_options", {})
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelError(f"{path}: cannot read model.decoder.session_options ({exc})") from None
    names = [k for entry in session.get("provider_options") or [] if isinstance(entry, dict) for k in entry]
    return canonical(names[0]) if names else "cpu"


def session_providers(folder: str | Path, override: str | None = None,
                      available: list[str] | None = None) -> list[str]:
    """The `providers=` list for onnxruntime.InferenceSession: [the provider, CPU] (CPU runs what the provider
    leaves, as onnxruntime-genai does), or [CPU]. Raises ModelError when the provider is not in this onnxruntime."""
    name = canonical(override) if override else configured(folder)
    ort_name, package = PROVIDERS[name]
    if name == "cpu":
        return ["CPUExecutionProvider"]
    if available is None:
        import onnxruntime

        available = onnxruntime.get_available_providers()
    if ort_name not in available:
        where = f"--provider {override}" if override else f"{Path(folder) / 'genai_config.json'} asks for {name!r}"
        raise ModelError(f"{where}, but the installed onnxruntime has no {ort_name} (it has "
                         f"{', '.join(available)}): install {package} in place of onnxruntime, or run on the CPU "
                         "with --provider cpu")
    return [ort_name, "CPUExecutionProvider"]
