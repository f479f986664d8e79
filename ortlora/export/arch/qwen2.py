"""Qwen2 / Qwen2.5: llama with biases on the q, k and v projections and none on o_proj, whatever the config says."""

from ortlora.config import ModelArgs
from ortlora.export.arch.base import Arch


class Qwen2(Arch):
    genai_type = "qwen2"

    def qkv_bias(self, args: ModelArgs) -> bool:
        return True

    def o_proj_bias(self, args: ModelArgs) -> bool:
        return False


ARCH = Qwen2()
