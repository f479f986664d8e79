"""Phi-3 / Phi-4-mini: fused `qkv_proj` and `gate_up_proj` (split after the matmul), partial rotary, longrope."""

from ortlora.config import ModelArgs
from ortlora.export.arch.base import Arch, Linear


class Phi3(Arch):
    genai_type = "phi3"

    def attention_linears(self, args: ModelArgs) -> list[Linear]:
        return [Linear("self_attn.qkv_proj", ("q", "k", "v"))]

    def mlp_linears(self, args: ModelArgs) -> list[Linear]:
        return [Linear("mlp.gate_up_proj", ("gate", "up"))]


ARCH = Phi3()
