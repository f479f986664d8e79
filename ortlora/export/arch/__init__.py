"""Architecture registry: Hugging Face `model_type` -> the small module that says how it differs from llama."""

from __future__ import annotations

import importlib

from ortlora.config import ModelArgs
from ortlora.errors import ModelError
from ortlora.export.arch.base import Arch

_MODULES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "gemma2": "gemma2",
}
ALIASES: dict[str, str] = {}  # other model_type spellings of a supported architecture


def supported() -> list[str]:
    return sorted(_MODULES)


def get_arch(args: ModelArgs) -> Arch:
    name = ALIASES.get(args.model_type, args.model_type)
    if name not in _MODULES:
        raise ModelError(
            f"model_type {args.model_type!r} is not supported; supported: {', '.join(supported())}"
        )
    module = importlib.import_module(f"ortlora.export.arch.{_MODULES[name]}")
    arch: Arch = module.ARCH
    arch.check(args)
    return arch
