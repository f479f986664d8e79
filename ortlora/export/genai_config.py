"""The files around `model.onnx`: `genai_config.json` (onnxruntime-genai's layout), tokenizer files, manifest."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ortlora import __version__
from ortlora.config import ModelArgs

MANIFEST = "ortlora.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)
_PROVIDERS = {"cpu": None, "cuda": "cuda", "gpu": "cuda", "dml": "dml", "webgpu": "webgpu"}


def provider_name(provider: str | None, device: str) -> str | None:
    """Olive spells providers as `CUDAExecutionProvider`; genai_config as `cuda`."""
    name = (provider or device).lower().removesuffix("executionprovider")
    return _PROVIDERS.get(name, name)


def eos_ids(model_dir: Path, args: ModelArgs) -> list[int]:
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
    return args.eos_token_ids


def genai_config(args: ModelArgs, genai_type: str, *, eos: list[int], context_length: int, provider: str | None,
                 threads: int | None) -> dict:
    session = {"log_id": "onnxruntime-genai", "provider_options": [{provider: {}}] if provider else []}
    if threads:
        session["intra_op_num_threads"] = threads
    pad = args.pad_token_id if args.pad_token_id is not None else (eos[0] if eos else 0)
    return {
        "model": {
            "bos_token_id": args.bos_token_id if args.bos_token_id is not None else (eos[0] if eos else 0),
            "context_length": context_length,
            "decoder": {
                "session_options": session,
                "filename": "model.onnx",
                "head_size": args.head_dim,
                "hidden_size": args.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": args.num_attention_heads,
                "num_hidden_layers": args.num_hidden_layers,
                "num_key_value_heads": args.num_key_value_heads,
            },
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": pad,
            "type": genai_type,
            "vocab_size": args.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context_length, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def default_threads() -> int:
    """onnxruntime-genai runs on one core without `intra_op_num_threads`; use this machine's cores."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def manifest(args: ModelArgs, *, precision: str, io_dtype: str, lora: dict[str, tuple[int, int]],
             context_length: int, block_size: int | None, source: str) -> dict:
    return {
        "ortlora_version": __version__,
        "architecture": args.model_type,
        "precision": precision,
        "io_dtype": io_dtype,
        "context_length": context_length,
        "int4_block_size": block_size,
        "lora_targets": sorted({m.rsplit(".", 1)[-1] for m in lora}),
        "lora_modules": {m: {"in": i, "out": o} for m, (i, o) in sorted(lora.items())},
        "source": source,
    }
