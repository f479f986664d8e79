"""Rotary embedding caches for GroupQueryAttention (`cos_cache`/`sin_cache`, [context, rotary_dim / 2]).

Computed in float32 the way transformers computes them, so positions match its logits bit for bit where possible.

longrope (Phi-3.5 / Phi-4-mini) past its original context: transformers rotates a forward pass's tokens with the
short factors while the sequence (cached + new) fits the original context and with the long factors once it does
not, keys already cached staying as they were. The export keeps both: one cache of 2 x context rows, short factors
first, long factors from row `context` on (`longrope_caches`), and each row's positions point into the half its
length selects (decoder.py, `rotary_positions`).
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
    return args.max_position_embeddings


def switches_factors(args: ModelArgs, context_length: int) -> bool:
    """Does a sequence of `context_length` tokens reach past longrope's original context (two caches needed)?"""
    old = args.rope.original_max_position_embeddings
    return args.rope.rope_type == "longrope" and bool(old) and context_length > old


def longrope_caches(args: ModelArgs, context_length: int, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """[2 x context, rotary_dim / 2]: the short factors' cache, then the long factors'."""
    old = args.rope.original_max_position_embeddings
    short, long = caches(args, old, dtype, context_length), caches(args, context_length, dtype)
    return tuple(np.concatenate([s, lo]) for s, lo in zip(short, long))


def caches(args: ModelArgs, context_length: int, dtype=np.float32,
           rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The caches for sequences of `context_length` tokens (longrope: its factors), `rows` positions (default all)."""
    freq, attn = inv_freq(args, context_length)
    angles = np.arange(rows or context_length, dtype=np.float32)[:, None] * freq[None, :]  # [rows, rotary_dim / 2]
    cos = (np.cos(angles) * np.float32(attn)).astype(dtype)
    sin = (np.sin(angles) * np.float32(attn)).astype(dtype)
    return cos, sin
