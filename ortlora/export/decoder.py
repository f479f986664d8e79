"""The common decoder graph: every supported architecture is this graph with the knobs of its `Arch`.

Per layer (llama; gemma2 adds the norms marked *):

    h ─SkipSimplifiedLayerNorm(residual)─> x ─q,k,v─> [q/k norm] ─GroupQueryAttention(rotary, KV cache)─> o_proj
      ─[*post_attention_norm]─ SkipSimplifiedLayerNorm(residual) ─> gate,up ─act(gate)·up─> down ─[*post_ff_norm]─> h

Projections are MatMul (float), MatMulNBits (int4) or MatMulIntegerToFloat (int8: int8.py). Each linear layer
named in `lora_modules` also gets the float LoRA term `(x·A)·B` from two graph inputs whose defaults have rank 0,
so the model without adapter inputs is the base model; with `dora`, also DoRA's per-output factor `dora_scale`
(default ones) before the bias.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from onnx import TensorProto, helper

from ortlora import naming
from ortlora.checkpoint import Checkpoint
from ortlora.config import ModelArgs
from ortlora.export import int8, rope
from ortlora.export.arch.base import Arch, Linear
from ortlora.export.graph import MS_DOMAIN, ONNX_FLOAT, GraphBuilder
from ortlora.export.int4 import quantize_4bits, shared_embedding

INT64_MAX = np.iinfo(np.int64).max
_BLOCK_VALUES = 1 << 24  # values per streamed block of a weight (64 MiB as float32)


class DecoderBuilder:
    def __init__(self, g: GraphBuilder, args: ModelArgs, arch: Arch, ckpt: Checkpoint, *, io_dtype=np.float32,
                 int4_block_size: int | None = None, lora_modules: dict[str, tuple[int, int]] | None = None,
                 context_length: int, accuracy_level: int = 4, on_layer: Callable[[int], None] | None = None,
                 dora: bool = False, int8_weights: bool = False):
        self.g, self.args, self.arch, self.ckpt = g, args, arch, ckpt
        self.dtype = np.dtype(io_dtype)
        self.onnx_type = ONNX_FLOAT[self.dtype]
        self.block_size = int4_block_size
        self.int8 = int8_weights  # int8 weights per output channel, activations per row (int8.py)
        self._int8_inputs: dict[str, tuple[str, str]] = {}  # activation -> (its uint8 codes, its row scales)
        self.lora_modules = lora_modules or {}
        self.context_length = context_length
        self.accuracy_level = accuracy_level
        self.on_layer = on_layer or (lambda i: None)
        self.dora = dora

    # -- whole graph --------------------------------------------------------------------------------------
    def build(self) -> None:
        g, a = self.g, self.args
        ids = g.input("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
        mask = g.input("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])
        # transformers' meaning: logits for the last k positions, 0 = all. Defaults to 0 (what genai expects).
        keep = g.input("num_logits_to_keep", TensorProto.INT64, [], default=np.array(0, dtype=np.int64))
        self.seqlens_k, self.total_len = self.attention_lengths(mask)
        self.positions = None  # set: rotary outside GroupQueryAttention, at these positions of the caches
        if rope.switches_factors(a, self.context_length):
            cos, sin = rope.longrope_caches(a, self.context_length, self.dtype)
            self.positions = self.rotary_positions(ids, mask, a.rope.original_max_position_embeddings)
        else:
            cos, sin = rope.caches(a, self.context_length, self.dtype)
        self.cos, self.sin = g.weight("cos_cache", cos), g.weight("sin_cache", sin)

        h = self.embed(ids)
        residual = None
        self.presents: list = []
        for i in range(a.num_hidden_layers):
            h, residual = self.layer(i, h, residual)
            self.on_layer(i)
        x, _ = self.norm("model.norm", h, residual)
        self.lm_head(x, keep)
        g.outputs += self.presents  # logits first, then present.N.key/value

    def attention_lengths(self, mask: str) -> tuple[str, str]:
        """GroupQueryAttention's per-row `seqlens_k` (length - 1) and the scalar total length, from the mask.

            attention_mask ─ReduceSum(axis 1)─Sub(1)─Cast(int32)─> seqlens_k [batch]
                  └─Shape─Gather(1)─Cast(int32)─> total_sequence_length []
        """
        g = self.g
        summed = g.op("ReduceSum", [mask, g.const([1])], "attn_mask/sum", keepdims=0)
        seqlens = g.op("Cast", [g.op("Sub", [summed, g.const(1)], "attn_mask/sub")], "attn_mask/seqlens_k",
                       to=TensorProto.INT32)
        width = g.op("Gather", [g.op("Shape", [mask], "attn_mask/shape"), g.const(1)], "attn_mask/width", axis=0)
        total = g.op("Cast", [width], "attn_mask/total_len", to=TensorProto.INT32)
        return seqlens, total

    def rotary_positions(self, ids: str, mask: str, original: int) -> str:
        """Each token's row in the two-part longrope cache: its position, plus `context_length` (the long factors'
        half) when its row's sequence reaches past the original context, as transformers decides per forward pass.

            attention_mask ─ReduceSum(axis 1)─> T [batch, 1] ─Sub(S)─Max(0)─> first position ─Add(Range(S))─┐
                             T > original ─Cast─Mul(context) ──────────────────────────────────────Add─> [batch, S]
        (S = new tokens; a right-padded first prompt's rows start at 0)
        """
        g = self.g
        total = g.op("ReduceSum", [mask, g.const([1])], "rotary/total", keepdims=1)
        s = g.op("Gather", [g.op("Shape", [ids], "rotary/ids_shape"), g.const(1)], "rotary/new", axis=0)
        first = g.op("Max", [g.op("Sub", [total, s], "rotary/past"), g.const(0)], "rotary/first")
        pos = g.op("Add", [first, g.op("Range", [g.const(0), s, g.const(1)], "rotary/range")], "rotary/positions")
        long = g.op("Cast", [g.op("Greater", [total, g.const(original)], "rotary/past_original")], "rotary/is_long",
                    to=TensorProto.INT64)
        return g.op("Add", [pos, g.op("Mul", [long, g.const(self.context_length)], "rotary/offset")],
                    "rotary/cache_rows")

    def rotate(self, name: str, x: str, heads: int) -> str:
        """com.microsoft RotaryEmbedding of `x` [batch, S, heads * head_dim] at `self.positions`."""
        a = self.args
        return self.g.op("RotaryEmbedding", [x, self.positions, self.cos, self.sin], name, domain=MS_DOMAIN,
                         interleaved=0, num_heads=heads, rotary_embedding_dim=a.rotary_dim)

    def embed(self, ids: str) -> str:
        """ids ─Gather(model.embed_tokens.weight)─> [·√hidden]

        int4 with tied embeddings (as onnxruntime-genai's builder does): the LM head's int4 weight serves the lookup
        too, through GatherBlockQuantized (the packed rows viewed [vocab, blocks · block / 2]; the padding of the
        last block sliced off), so the vocabulary's weights are held once, in int4, instead of a float copy."""
        g, a = self.g, self.args
        name = "model.embed_tokens.weight"
        v, hidden = self.ckpt.shape(name)
        self.tied_head: list[str] | None = None  # the LM head's MatMulNBits initializers, when shared
        if self.block_size and self.tied:
            self.tied_head = self.quantized("lm_head", name)
            h = g.unique("model.embed_tokens/out")
            nodes, consts = shared_embedding(self.tied_head, ids, h, v, hidden, self.block_size)
            g.nodes += nodes
            g.initializers += consts
        elif self.int8 and self.tied:
            self.tied_head = list(self.quantized_int8("lm_head", name))
            h = g.unique("model.embed_tokens/out")
            nodes, consts = int8.shared_embedding("lm_head", ids, h, self.dtype)
            g.nodes += nodes
            g.initializers += consts
        else:
            rows = max(1, _BLOCK_VALUES // hidden)
            self.embed_weight = g.weight_from_blocks(name, (v, hidden), self.dtype, (
                self.ckpt.get_rows(name, r, min(v, r + rows)) for r in range(0, v, rows)))
            h = g.op("Gather", [self.embed_weight, ids], "model.embed_tokens", axis=0)
        if self.arch.scale_embeddings:
            h = g.op("Mul", [h, g.const(np.sqrt(a.hidden_size), self.dtype)], "model.embed_tokens/scale")
        return h

    @property
    def tied(self) -> bool:
        """Does the LM head reuse the embedding (config, or a checkpoint without lm_head.weight)?"""
        return self.args.tie_word_embeddings or "lm_head.weight" not in self.ckpt

    def layer(self, i: int, h: str, residual: str | None) -> tuple[str, str]:
        p = f"model.layers.{i}"
        x, residual = self.norm(f"{p}.input_layernorm", h, residual)
        attn = self.attention(i, x)
        if self.arch.sandwich_norm:
            attn, _ = self.norm(f"{p}.post_attention_layernorm", attn, None)
            x, residual = self.norm(f"{p}.pre_feedforward_layernorm", attn, residual)
        else:
            x, residual = self.norm(f"{p}.post_attention_layernorm", attn, residual)
        out = self.mlp(i, x)
        if self.arch.sandwich_norm:
            out, _ = self.norm(f"{p}.post_feedforward_layernorm", out, None)
        return out, residual

    # -- blocks ---------------------------------------------------------------------------------------------
    def norm(self, module: str, x: str, residual: str | None) -> tuple[str, str]:
        """RMSNorm of `x + residual`; returns (normed, the sum as the next residual).

            x ──┐
                SkipSimplifiedLayerNormalization(w) ──> normed
            residual ┘                          └────> x + residual
        """
        g = self.g
        w = g.weight(f"{module}.weight", self.norm_weight(module))
        eps = float(self.args.rms_norm_eps)
        if residual is None:
            return g.op("SimplifiedLayerNormalization", [x, w], module, axis=-1, epsilon=eps,
                        stash_type=1), x
        name = g.unique(module)
        out, total = f"{name}/out", f"{name}/sum"
        g.op("SkipSimplifiedLayerNormalization", [x, residual, w], name, outputs=[out, "", "", total],
             domain=MS_DOMAIN, epsilon=eps)
        return out, total

    def attention(self, i: int, x: str) -> str:
        """    x ─q,k,v linears─> [RMSNorm per head of q, k] ─GroupQueryAttention─> o_proj ─> out
                                  past_key_values.i.* ─┘        └─> present.i.*
        """
        g, a, arch = self.g, self.args, self.arch
        p = f"model.layers.{i}"
        parts = self.linears(p, x, arch.attention_linears(a), bias=arch.qkv_bias(a))
        q, k, v = parts["q"], parts["k"], parts["v"]
        if arch.qk_norm:
            q = self.head_norm(f"{p}.self_attn.q_norm", q)
            k = self.head_norm(f"{p}.self_attn.k_norm", k)
        kv_shape = ["batch_size", a.num_key_value_heads, "past_sequence_length", a.head_dim]
        past_k = g.input(f"past_key_values.{i}.key", self.onnx_type, kv_shape)
        past_v = g.input(f"past_key_values.{i}.value", self.onnx_type, kv_shape)
        present = [f"present.{i}.key", f"present.{i}.value"]
        rotary = [self.cos, self.sin]
        if self.positions is not None:  # two-part longrope cache: rotated here, at each row's cache rows
            q = self.rotate(f"{p}.self_attn/q_rotary", q, a.num_attention_heads)
            k = self.rotate(f"{p}.self_attn/k_rotary", k, a.num_key_value_heads)
            rotary = []
        out = g.op(
            "GroupQueryAttention", [q, k, v, past_k, past_v, self.seqlens_k, self.total_len, *rotary],
            f"{p}.self_attn", outputs=[g.unique(f"{p}.self_attn/out"), *present], domain=MS_DOMAIN,
            num_heads=a.num_attention_heads, kv_num_heads=a.num_key_value_heads, scale=arch.attention_scale(a),
            softcap=arch.attention_softcap(a), local_window_size=arch.local_window(a, i), do_rotary=int(bool(rotary)),
            rotary_interleaved=0,
        )[0]
        shape = ["batch_size", a.num_key_value_heads, "total_sequence_length", a.head_dim]
        self.presents += [helper.make_tensor_value_info(name, self.onnx_type, shape) for name in present]
        return self.linear(f"{p}.self_attn.o_proj", out, bias=arch.o_proj_bias(a))

    def head_norm(self, module: str, x: str) -> str:
        """RMSNorm over each head: [B, S, heads * D] ─Reshape─> [B, S, heads, D] ─RMSNorm─Reshape─> [B, S, heads * D]"""
        g = self.g
        w = g.weight(f"{module}.weight", self.norm_weight(module))
        heads = g.op("Reshape", [x, g.const([0, 0, -1, self.args.head_dim])], f"{module}/split_heads")
        normed = g.op("SimplifiedLayerNormalization", [heads, w], module, axis=-1,
                      epsilon=float(self.args.rms_norm_eps), stash_type=1)
        return g.op("Reshape", [normed, g.const([0, 0, -1])], f"{module}/merge_heads")

    def mlp(self, i: int, x: str) -> str:
        """x ─gate, up─> act(gate) · up ─down_proj─> out"""
        g, p = self.g, f"model.layers.{i}"
        parts = self.linears(p, x, self.arch.mlp_linears(self.args), bias=self.args.mlp_bias)
        gate, up = parts["gate"], parts["up"]
        if self.args.activation == "silu":
            act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{p}.mlp/sigmoid")], f"{p}.mlp/silu")
        else:  # gelu with tanh approximation
            act = g.op("FastGelu", [gate], f"{p}.mlp/gelu", domain=MS_DOMAIN)
        return self.linear(f"{p}.mlp.down_proj", g.op("Mul", [act, up], f"{p}.mlp/gated"), bias=self.args.mlp_bias)

    def linears(self, prefix: str, x: str, linears: list[Linear], bias: bool) -> dict[str, str]:
        """Run each projection and split fused outputs (phi3's qkv_proj, gate_up_proj) into named parts."""
        out: dict[str, str] = {}
        for lin in linears:
            module = f"{prefix}.{lin.module}"
            y = self.linear(module, x, bias=bias)
            if len(lin.splits) == 1:
                out[lin.splits[0]] = y
            else:
                sizes = [self.arch.split_size(self.args, s) for s in lin.splits]
                parts = self.g.op("Split", [y, self.g.const(sizes)], f"{module}/split", axis=-1,
                                  outputs=len(sizes))
                out.update(zip(lin.splits, parts))
        return out

    def linear(self, module: str, x: str, bias: bool) -> str:
        """y = x·W (+ b) (+ (x·A)·B when `module` is a LoRA target).

            x ─MatMul(W) or MatMulNBits(W int4)─ [Add(b)] ───────┐
            └─MatMul(<module>.lora_A.weight)─MatMul(<module>.lora_B.weight)─ Add ──> y

        With DoRA inputs (PEFT's DoRA: the factor scales the weight, not the bias):

            x ─MatMul(W)──────────────────────────────────┐
            └─MatMul(lora_A)─MatMul(lora_B)─ Add ─ Mul(<module>.dora_scale [out]) ─ [Add(b)] ──> y
        """
        g = self.g
        n, k = self.ckpt.shape(f"{module}.weight")
        y = self.matmul(module, x, f"{module}.weight")
        dora = self.dora and module in self.lora_modules
        if bias and not dora:
            y = g.op("Add", [y, g.weight(f"{module}.bias", self.tensor(f"{module}.bias"))], f"{module}/bias")
        if module in self.lora_modules:
            a_name, b_name = naming.lora_input_names(module)
            lora_type = self.onnx_type
            # One rank symbol per module: a shared `lora_r` tells onnxruntime's memory planner that all ranks are
            # equal, and a subset adapter (others at rank 0) or rank_pattern then fails with "re-use buffer".
            r = f"{module}.lora_r"
            g.input(a_name, lora_type, [k, r], default=np.zeros((k, 0), self.dtype))
            g.input(b_name, lora_type, [r, n], default=np.zeros((0, n), self.dtype))
            xa = g.op("MatMul", [x, a_name], f"{module}/lora_A")
            y = g.op("Add", [y, g.op("MatMul", [xa, b_name], f"{module}/lora_B")], f"{module}/lora_add")
        if dora:
            scale = naming.dora_scale_name(module)
            g.input(scale, self.onnx_type, [n], default=np.ones(n, self.dtype))
            y = g.op("Mul", [y, scale], f"{module}/dora_scale")
            if bias:
                y = g.op("Add", [y, g.weight(f"{module}.bias", self.tensor(f"{module}.bias"))], f"{module}/bias")
        return y

    def lm_head(self, x: str, keep: str) -> None:
        """    x ─Slice(last `num_logits_to_keep` positions; 0 = all)─> MatMul(lm_head) ─[tanh softcap]─> logits

        Tied embeddings (fp32/fp16) reuse `model.embed_tokens.weight` through FusedMatMul(transB=1).
        """
        g, a = self.g, self.args
        start = g.op("Unsqueeze", [g.op("Neg", [keep], "lm_head/neg_keep"), g.const([0])], "lm_head/start")
        x = g.op("Slice", [x, start, g.const([INT64_MAX]), g.const([1])], "lm_head/keep")
        if self.tied and not self.block_size and not self.int8:  # share the embedding [vocab, hidden]: no transpose
            logits = g.op("FusedMatMul", [x, self.embed_weight], "lm_head/FusedMatMul", domain=MS_DOMAIN, transB=1)
        elif self.tied_head and self.int8:  # int8, tied: the weights embed() quantized and shares
            logits = self.matmul_integer("lm_head", x, a.hidden_size)
        elif self.tied_head:  # int4, tied: the weights embed() quantized and shares
            n, k = self.ckpt.shape("model.embed_tokens.weight")
            logits = self.matmul_nbits("lm_head", x, self.tied_head, n, k)
        else:
            logits = self.matmul("lm_head", x, "model.embed_tokens.weight" if self.tied else "lm_head.weight")
        cap = self.arch.final_softcap(a)
        if cap:
            c = g.const(cap, self.dtype)
            scaled = g.op("Tanh", [g.op("Div", [logits, c], "lm_head/softcap_div")], "lm_head/softcap_tanh")
            logits = g.op("Mul", [scaled, c], "lm_head/softcap")
        g.output(logits, "logits", self.onnx_type, ["batch_size", "logits_length", a.vocab_size])

    def matmul(self, module: str, x: str, weight: str) -> str:
        """x·Wᵀ for the checkpoint's weight `weight` [out, in]: MatMul on [in, out], MatMulNBits when int4,
        MatMulIntegerToFloat when int8.

        Streamed: int4 and int8 read and quantize the weight a block of rows (outputs) at a time, so only the
        quantized result (1/8, 1/4 of float32) accumulates; float holds the weight once and writes its transpose
        by blocks."""
        g = self.g
        n, k = self.ckpt.shape(weight)
        rows = max(1, _BLOCK_VALUES // k)
        if self.int8:
            self.quantized_int8(module, weight)
            return self.matmul_integer(module, x, k)
        if not self.block_size:
            w = np.empty((n, k), self.dtype)
            for r in range(0, n, rows):
                w[r:r + rows] = self.ckpt.get_rows(weight, r, min(n, r + rows))
            name = g.weight_from_blocks(f"{module}.MatMul.weight", (k, n), self.dtype, _transposed_blocks(w))
            return g.op("MatMul", [x, name], f"{module}/MatMul")
        return self.matmul_nbits(module, x, self.quantized(module, weight), n, k)

    def quantized(self, module: str, weight: str) -> list[str]:
        """MatMulNBits' initializers (qweight [N, blocks, block / 2], scales [N, blocks][, qzeros]) for the
        checkpoint's weight [N, K], read and quantized a block of rows (outputs) at a time."""
        g = self.g
        n, k = self.ckpt.shape(weight)
        rows = max(1, _BLOCK_VALUES // k)
        parts = [quantize_4bits(_transpose(self.ckpt.get_rows(weight, r, min(n, r + rows))), self.block_size)
                 for r in range(0, n, rows)]
        packed, scales = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        names = [g.weight(f"{module}.MatMulNBits.qweight", packed),
                 g.weight(f"{module}.MatMulNBits.scales", scales.astype(self.dtype))]
        if parts[0][2] is not None:
            names.append(g.weight(f"{module}.MatMulNBits.qzeros", np.concatenate([p[2] for p in parts])))
        return names

    def quantized_int8(self, module: str, weight: str) -> tuple[str, str]:
        """The int8 initializers (codes [K, N], scales [N]) of the checkpoint's weight [N, K]: each block of rows
        (outputs) quantized as read; the codes, a quarter of float32, are written transposed."""
        g = self.g
        n, k = self.ckpt.shape(weight)
        rows = max(1, _BLOCK_VALUES // k)
        codes = np.empty((n, k), np.int8)
        scales = np.empty(n, np.float32)
        for r in range(0, n, rows):
            block_codes, scales[r:r + rows] = int8.quantize_8bits(self.ckpt.get_rows(weight, r, min(n, r + rows)).T)
            codes[r:r + rows] = block_codes.T
        w_name, s_name = int8.weight_names(module)
        return (g.weight_from_blocks(w_name, (k, n), np.int8, _transposed_blocks(codes)), g.weight(s_name, scales))

    def matmul_integer(self, module: str, x: str, k: int) -> str:
        """x [.., k] ─[per-row int8 quantization, once per x]─ MatMulIntegerToFloat(<module>'s int8 weights)."""
        g = self.g
        if x not in self._int8_inputs:
            nodes, xq, scale = int8.activation_nodes(x, k)
            g.nodes += nodes
            if not self._int8_inputs:
                g.initializers += int8.constants()
            self._int8_inputs[x] = (xq, scale)
        xq, scale = self._int8_inputs[x]
        out = g.unique(f"{module}/{int8.OP}/out")
        g.nodes.append(int8.matmul_node(module, xq, scale, out))
        return out

    def matmul_nbits(self, module: str, x: str, weights: list[str], n: int, k: int) -> str:
        return self.g.op("MatMulNBits", [x, *weights], f"{module}/MatMulNBits", domain=MS_DOMAIN, K=k, N=n, bits=4,
                         block_size=self.block_size, accuracy_level=self.accuracy_level)

    def norm_weight(self, module: str) -> np.ndarray:
        w = self.ckpt.get(f"{module}.weight").astype(np.float32) + np.float32(self.arch.norm_offset)
        return w.astype(self.dtype)

    def tensor(self, name: str) -> np.ndarray:
        return self.ckpt.get(name).astype(self.dtype, copy=False)


def _transposed_blocks(w: np.ndarray):
    """wᵀ as consecutive blocks of its rows (~_BLOCK_VALUES values each)."""
    n, k = w.shape
    cols = max(1, _BLOCK_VALUES // n)
    for c in range(0, k, cols):
        yield _transpose(w[:, c:c + cols])


def _transpose(w: np.ndarray, tile: int = 128) -> np.ndarray:
    """A contiguous wᵀ, copied tile by tile: a transposing copy that stays in cache is several times faster than
    numpy's copy of the whole transposed view."""
    n, k = w.shape
    out = np.empty((k, n), w.dtype)
    for i in range(0, n, tile):
        for j in range(0, k, tile):
            out[j:j + tile, i:i + tile] = w[i:i + tile, j:j + tile].T
    return out
