"""THE naming contract between PEFT checkpoints, ONNX model inputs and `.onnx_adapter` parameters.

A LoRA-targeted linear layer is named by its Hugging Face module path without PEFT's prefix, e.g.
`model.layers.3.self_attn.q_proj`. For that module:

    PEFT key          base_model.model.<module>.lora_A.weight   torch layout [r, in]
                      base_model.model.<module>.lora_B.weight   torch layout [out, r]
    ONNX input  and   <module>.lora_A.weight                    float [in, lora_r]
    adapter param     <module>.lora_B.weight                    float [lora_r, out], LoRA scale folded in
                      <module>.dora_scale                       float [out], DoRA only (default ones)

DoRA's per-output factor `magnitude / ||W + s·B·A||` (row norms of the [out, in] weight, PEFT's definition) is
precomputed against the model's base weights and multiplies the module's output before its bias:
`y = (x·W + (x·A)·B) * dora_scale + bias`. A model has `dora_scale` inputs only when exported for a DoRA adapter.

These are the names `olive convert-adapters` writes, so its files load here unchanged. Every part of ortlora
(export, convert, runtime, server) goes through these functions.
"""

from __future__ import annotations

import re

PEFT_PREFIX = "base_model.model."
LORA_A, LORA_B, MAGNITUDE = "lora_A", "lora_B", "lora_magnitude_vector"
DORA_SCALE = "dora_scale"

_PEFT_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_magnitude_vector|lora_embedding_A|lora_embedding_B)"
    r"(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$"
)
_INPUT = re.compile(r"^(?P<module>.+)\.(?:(?P<kind>lora_A|lora_B)\.weight|(?P<dora>dora_scale))$")
# onnxruntime-genai's model builder names a LoRA MatMul's weight after its node,
# `/model/layers.{i}/attn/q_proj/lora_A/MatMul` -> `model.layers.{i}.attn.q_proj.lora_A.MatMul.weight` (mlp: `mlp`,
# as in HF); Olive's ExtractAdapters pass over such a model drops the `.MatMul`. Map both to Hugging Face paths.
_GENAI_SPELLING = [(re.compile(r"^((?:base_model\.model\.)?model\.layers\.\d+)\.attn\."), r"\1.self_attn."),
                   (re.compile(r"\.(lora_[AB])\.MatMul\.weight$"), r".\1.weight")]


def lora_input_names(module: str) -> tuple[str, str]:
    """The ONNX input (= adapter parameter) names of `module`'s A and B matrices."""
    return f"{module}.{LORA_A}.weight", f"{module}.{LORA_B}.weight"


def dora_scale_name(module: str) -> str:
    """The ONNX input (= adapter parameter) name of `module`'s DoRA factor [out]."""
    return f"{module}.{DORA_SCALE}"


def is_dora_scale(name: str) -> bool:
    """Is `name` a DoRA factor [out] (else a LoRA A or B matrix)?"""
    return name.endswith(f".{DORA_SCALE}")


def is_lora_a(name: str) -> bool:
    """Is `name` (an input or parameter name, HF spelling) a LoRA A matrix [in, r] (else B [r, out])?"""
    return name.endswith(f".{LORA_A}.weight")


def parse_peft_key(key: str) -> tuple[str, str]:
    """`base_model.model.<module>.lora_A[.default].weight` -> (`<module>`, `lora_A`). Raises ValueError otherwise."""
    m = _PEFT_KEY.match(key)
    if not m:
        raise ValueError(f"not a LoRA tensor name: {key!r}")
    return m.group("module"), m.group("kind")


def parse_input_name(name: str) -> tuple[str, str] | None:
    """`<module>.lora_A.weight` -> (`<module>`, `lora_A`), `<module>.dora_scale` -> (`<module>`, `dora_scale`);
    None for a name that is not an adapter input."""
    m = _INPUT.match(name)
    return (m.group("module"), m.group("kind") or m.group("dora")) if m else None


def from_genai_spelling(name: str) -> str:
    """Rewrite a parameter name in onnxruntime-genai builder spelling into the Hugging Face one (idempotent)."""
    if ".attn." not in name and ".MatMul." not in name:  # the common case, without the regexes
        return name
    for pattern, repl in _GENAI_SPELLING:
        name = pattern.sub(repl, name)
    return name


def target_name(module: str) -> str:
    """The last component of a module path (`q_proj`): what `--lora-targets` and PEFT `target_modules` list."""
    return module.rsplit(".", 1)[-1]
