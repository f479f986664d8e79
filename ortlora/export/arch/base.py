"""The common decoder's knobs. An architecture module subclasses `Arch` (llama is the plain default) and changes
only what differs; the graph itself is built once, in `ortlora.export.decoder`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ortlora.config import ModelArgs
from ortlora.errors import ModelError


@dataclass(frozen=True)
class Linear:
    """A projection of a layer: HF module name (relative to the layer) and the named outputs it is split into."""

    module: str
    splits: tuple[str, ...] = ()


class Arch:
    genai_type = "llama"  # the `model.type` onnxruntime-genai knows this architecture by
    qk_norm = False  # RMSNorm over each head of q and k before rotary (qwen3)
    norm_offset = 0.0  # gemma stores RMSNorm weights as w - 1
    sandwich_norm = False  # extra norms after attention and around the MLP (gemma2)
    scale_embeddings = False  # multiply embeddings by sqrt(hidden_size) (gemma)

    def check(self, args: ModelArgs) -> None:
        """Reject configs this architecture module cannot build exactly."""
        if args.activation not in ("silu", "gelu_pytorch_tanh", "gelu_tanh"):
            raise ModelError(f"activation {args.activation!r} is not supported (silu, gelu_pytorch_tanh)")

    def qkv_bias(self, args: ModelArgs) -> bool:
        return args.attention_bias

    def o_proj_bias(self, args: ModelArgs) -> bool:
        return args.attention_bias

    def attention_linears(self, args: ModelArgs) -> list[Linear]:
        return [Linear("self_attn.q_proj", ("q",)), Linear("self_attn.k_proj", ("k",)),
                Linear("self_attn.v_proj", ("v",))]

    def mlp_linears(self, args: ModelArgs) -> list[Linear]:
        return [Linear("mlp.gate_proj", ("gate",)), Linear("mlp.up_proj", ("up",))]

    def attention_scale(self, args: ModelArgs) -> float:
        return 1.0 / math.sqrt(args.head_dim)

    def attention_softcap(self, args: ModelArgs) -> float:
        return 0.0

    def final_softcap(self, args: ModelArgs) -> float | None:
        return None

    def local_window(self, args: ModelArgs, layer: int) -> int:
        """GroupQueryAttention's `local_window_size` (-1: none). Measured against transformers' logits (tests):
        onnxruntime's value is the model's `sliding_window` as is."""
        window = args.window(layer)
        return -1 if window is None else window

    def split_size(self, args: ModelArgs, part: str) -> int:
        """The width of a named projection output (q, k, v, gate, up): how fused weights are split."""
        kv = args.num_key_value_heads * args.head_dim
        return {"q": args.num_attention_heads * args.head_dim, "k": kv, "v": kv, "gate": args.intermediate_size,
                "up": args.intermediate_size}[part]

    def tensor_shapes(self, args: ModelArgs) -> dict[str, tuple[int, ...]]:
        """Every checkpoint tensor the decoder reads (the LM head aside: tied or not) -> the shape `args` implies.

        Linear weights are Hugging Face [out, in]; biases where the architecture has them (`qkv_bias`,
        `o_proj_bias`, `mlp_bias`)."""
        h, d = args.hidden_size, args.head_dim
        norms = ["input_layernorm", "post_attention_layernorm"]
        if self.sandwich_norm:
            norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (args.vocab_size, h),
                                              "model.norm.weight": (h,)}
        for i in range(args.num_hidden_layers):
            p = f"model.layers.{i}"
            shapes.update({f"{p}.{n}.weight": (h,) for n in norms})
            for lin in self.attention_linears(args):
                out = sum(self.split_size(args, s) for s in lin.splits)
                shapes[f"{p}.{lin.module}.weight"] = (out, h)
                if self.qkv_bias(args):
                    shapes[f"{p}.{lin.module}.bias"] = (out,)
            if self.qk_norm:
                shapes[f"{p}.self_attn.q_norm.weight"] = shapes[f"{p}.self_attn.k_norm.weight"] = (d,)
            shapes[f"{p}.self_attn.o_proj.weight"] = (h, args.num_attention_heads * d)
            if self.o_proj_bias(args):
                shapes[f"{p}.self_attn.o_proj.bias"] = (h,)
            for lin in self.mlp_linears(args):
                out = sum(self.split_size(args, s) for s in lin.splits)
                shapes[f"{p}.{lin.module}.weight"] = (out, h)
                if args.mlp_bias:
                    shapes[f"{p}.{lin.module}.bias"] = (out,)
            shapes[f"{p}.mlp.down_proj.weight"] = (h, args.intermediate_size)
            if args.mlp_bias:
                shapes[f"{p}.mlp.down_proj.bias"] = (h,)
        return shapes

    def linear_modules(self, args: ModelArgs) -> list[str]:
        """Every linear module of a layer, relative to the layer: the possible LoRA targets."""
        return [lin.module for lin in self.attention_linears(args)] + ["self_attn.o_proj"] + [
            lin.module for lin in self.mlp_linears(args)
        ] + ["mlp.down_proj"]


ARCH = Arch()
