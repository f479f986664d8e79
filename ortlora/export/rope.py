"""Rotary embedding caches for GroupQueryAttention (`cos_cache`/`sin_cache`, [context, rotary_dim / 2]).

Computed in float32 the way transformers computes them, so positions match its logits bit for bit where possible.
"""

from __future__ import annotations

import math

import numpy as np

from ortlora.config import ModelArgs
from ortlora.errors import ModelError

SUPPORTED = ("default", "linear", "llama3", "longrope", "dynamic")


def inv_freq(args: ModelArgs, context_length: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies [rotary_dim / 2] and the attention factor applied to cos/sin."""
    rope, dim = args.rope, args.rotary_dim
    base = rope.theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim))
    freq = (1.0 / base).astype(np.float32)
    if rope.rope_type in ("default", "dynamic"):  # dynamic NTK equals default within the trained context
        return freq, 1.0
    if rope.rope_type == "linear":
        return (freq / np.float32(rope.factor)).astype(np.float32), 1.0
    if rope.rope_type == "llama3":
        old = rope.original_max_position_embeddings or args.max_position_embeddings
        low_wl, high_wl = old / rope.low_freq_factor, old / rope.high_freq_factor
        wavelen = 2 * math.pi / freq
        scaled = np.where(wavelen > low_wl, freq / rope.factor, freq)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    if rope.rope_type == "longrope":
        old = rope.original_max_position_embeddings or args.max_position_embeddings
        factor = args.max_position_embeddings / old
        attn = rope.attention_factor or (1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(old)))
        ext = np.asarray(rope.long_factor if context_length > old else rope.short_factor, dtype=np.float32)
        return (1.0 / (ext * base)).astype(np.float32), attn
    raise ModelError(f"rope type {rope.rope_type!r} is not supported; supported: {', '.join(SUPPORTED)}")


def default_context_length(args: ModelArgs) -> int:
    """longrope switches factors past the original context; stopping there keeps one exact cache."""
    if args.rope.rope_type == "longrope" and args.rope.original_max_position_embeddings:
        return args.rope.original_max_position_embeddings
    return args.max_position_embeddings


def caches(args: ModelArgs, context_length: int, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    freq, attn = inv_freq(args, context_length)
    angles = np.arange(context_length, dtype=np.float32)[:, None] * freq[None, :]  # [context, rotary_dim / 2]
    cos = (np.cos(angles) * np.float32(attn)).astype(dtype)
    sin = (np.sin(angles) * np.float32(attn)).astype(dtype)
    return cos, sin
