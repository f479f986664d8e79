"""Realistic-size random checkpoints for benchmarks, built locally (no download)."""

from __future__ import annotations

from pathlib import Path

# Qwen2.5-0.5B's shape (tied embeddings, q/k/v bias, GQA 14/2).
QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                  tie_word_embeddings=True, initializer_range=0.02, rope_parameters={"rope_type": "default",
                                                                                       "rope_theta": 1000000.0})


def qwen25_05b(folder: str | Path, dtype: str = "bfloat16") -> Path:
    """A random Qwen2.5-0.5B-shaped checkpoint in `folder` (built once, reused)."""
    from ortlora.testing import build_model

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        build_model(folder, "qwen2", dtype=dtype, **QWEN25_05B)
    return folder
