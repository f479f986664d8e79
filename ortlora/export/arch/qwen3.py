"""Qwen3: RMSNorm on each head of q and k before rotary; head_dim is its own setting, not hidden / heads."""

from ortlora.export.arch.base import Arch


class Qwen3(Arch):
    genai_type = "qwen3"
    qk_norm = True


ARCH = Qwen3()
