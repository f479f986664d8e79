"""Gemma 2: scaled embeddings, (1 + w) RMSNorm, norms around attention and MLP, tanh-GELU, soft-capped attention
and logits, sliding window on alternate layers, attention scaled by `query_pre_attn_scalar`."""

import math

from ortlora.config import ModelArgs
from ortlora.export.arch.base import Arch


class Gemma2(Arch):
    genai_type = "gemma2"
    norm_offset = 1.0
    sandwich_norm = True
    scale_embeddings = True

    def attention_scale(self, args: ModelArgs) -> float:
        return 1.0 / math.sqrt(args.query_pre_attn_scalar or args.head_dim)

    def attention_softcap(self, args: ModelArgs) -> float:
        return float(args.attn_logit_softcapping or 0.0)

    def final_softcap(self, args: ModelArgs) -> float | None:
        return args.final_logit_softcapping


ARCH = Gemma2()
