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


# Llama-3.2-3B's and Llama-3.1-8B's shapes (GQA 24/8 and 32/8, llama3 rope scaling, 128256 vocabulary).
_LLAMA3 = dict(vocab_size=128256, max_position_embeddings=131072, num_key_value_heads=8, head_dim=128,
               rms_norm_eps=1e-5, hidden_act="silu")
LLAMA_32_3B = dict(_LLAMA3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                   tie_word_embeddings=True, rope_scaling={"rope_type": "llama3", "factor": 32.0,
                                                            "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                            "original_max_position_embeddings": 8192},
                   rope_theta=500000.0)
LLAMA_31_8B = dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   tie_word_embeddings=False, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                             "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                             "original_max_position_embeddings": 8192},
                   rope_theta=500000.0)
SHAPES = {"llama-3.2-3b": LLAMA_32_3B, "llama-3.1-8b": LLAMA_31_8B}


def random_llama(folder: str | Path, shape: dict, *, shard_bytes: int = 5 * 2**30, seed: int = 0) -> Path:
    """A random bf16 Llama checkpoint of `shape` in `folder` (built once, reused), written tensor by tensor.

    Memory stays at one tensor: weights are N(0, 0.02) samples cut from a 256 Mi-value pool at random offsets
    (sampling 8 billion normals on 2 cores would take minutes; the pool keeps the values' distribution)."""
    import json

    import numpy as np

    from ortlora.testing import build_tokenizer

    folder = Path(folder)
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pool = _bf16(rng.standard_normal(2**28, dtype=np.float32) * np.float32(0.02))
    h, i, L = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    hd, nq, nkv = shape["head_dim"], shape["num_attention_heads"], shape["num_key_value_heads"]
    tensors: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape["vocab_size"], h))]
    for layer in range(L):
        p = f"model.layers.{layer}"
        tensors += [(f"{p}.input_layernorm.weight", (h,)), (f"{p}.post_attention_layernorm.weight", (h,)),
                    (f"{p}.self_attn.q_proj.weight", (nq * hd, h)), (f"{p}.self_attn.k_proj.weight", (nkv * hd, h)),
                    (f"{p}.self_attn.v_proj.weight", (nkv * hd, h)), (f"{p}.self_attn.o_proj.weight", (h, nq * hd)),
                    (f"{p}.mlp.gate_proj.weight", (i, h)), (f"{p}.mlp.up_proj.weight", (i, h)),
                    (f"{p}.mlp.down_proj.weight", (h, i))]
    tensors.append(("model.norm.weight", (h,)))
    if not shape["tie_word_embeddings"]:
        tensors.append(("lm_head.weight", (shape["vocab_size"], h)))
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in tensors:
        nbytes = 2 * int(np.prod(dims))
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += nbytes
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name, dims in shard:
            n = 2 * int(np.prod(dims))
            header[name] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = fname
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        tmp = folder / (fname + ".tmp")
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for name, dims in shard:
                count = int(np.prod(dims))
                if len(dims) == 1:  # norms: around one, spread so a mis-wired norm shows
                    f.write(_bf16(1 + 0.25 * rng.standard_normal(count, dtype=np.float32)).tobytes())
                    continue
                for start in range(0, count, 2**26):
                    n = min(2**26, count - start)
                    at = int(rng.integers(0, pool.size - n))
                    f.write(pool[at:at + n].tobytes())
        tmp.replace(folder / fname)
    build_tokenizer(folder)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
              "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02, "bos_token_id": 0,
              "eos_token_id": 0, "pad_token_id": 0, **shape}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    total = sum(2 * int(np.prod(d)) for _, d in tensors)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return folder


def _bf16(x):
    """float32 -> bf16 bits (round to nearest even), as uint16."""
    import numpy as np

    u = x.view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
