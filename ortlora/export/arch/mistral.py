"""Mistral: llama with a sliding attention window (from `sliding_window` / `layer_types`)."""

from ortlora.export.arch.base import Arch


class Mistral(Arch):
    genai_type = "mistral"


ARCH = Mistral()
