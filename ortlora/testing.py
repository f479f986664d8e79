"""Tiny random Hugging Face checkpoints, tokenizers and PEFT adapters, built locally (never downloaded).

Used by the tests and benchmarks; needs the `train` extra (torch, transformers, peft), imported lazily.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CORPUS = (
    "The quick brown fox jumps over the lazy dog. A tiny model learns to write tiny sentences. "
    "LoRA adapters share one base model; many adapters, one ONNX Runtime session. "
    "def add(a, b):\n    return a + b\n# Question: what is two plus two? Answer: four.\n"
    "Ünïcödé text, emoji 🙂 and CJK 中文 keep the byte-level tokenizer honest. 0123456789 "
)

# Small configs per architecture: 2 layers, GQA (4 query heads over 2 KV heads).
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1)
ARCH_OVERRIDES: dict[str, dict[str, Any]] = {
    "llama": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}),
    "mistral": dict(sliding_window=5),
    "qwen2": dict(),
    "qwen3": dict(head_dim=32),  # head_dim != hidden / heads on purpose
    "phi3": dict(partial_rotary_factor=0.5, hidden_size=128, pad_token_id=0, eos_token_id=1, bos_token_id=1),
    "gemma2": dict(head_dim=16, sliding_window=5, query_pre_attn_scalar=16, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0),
}
ARCHITECTURES = tuple(ARCH_OVERRIDES)


def build_tokenizer(out_dir: str | Path, vocab_size: int = 320, chat_template: str | None = None) -> int:
    """Train a byte-level BPE tokenizer on CORPUS into `out_dir`; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS] * 4, trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    template = chat_template or (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "chat_template": template,
        "model_max_length": 256, "add_bos_token": False,
    }, indent=2))
    return tok.get_vocab_size()


def build_model(out_dir: str | Path, arch: str = "llama", seed: int = 0, dtype: str = "float32",
                tie_word_embeddings: bool = False, **overrides) -> Path:
    """A random `arch` checkpoint with a locally trained tokenizer in `out_dir` (safetensors)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out_dir = Path(out_dir)
    vocab = build_tokenizer(out_dir)
    kwargs = {**TINY, **ARCH_OVERRIDES[arch], "vocab_size": vocab, "tie_word_embeddings": tie_word_embeddings,
              **overrides}
    kwargs.setdefault("eos_token_id", 0)
    kwargs.setdefault("pad_token_id", 0)
    kwargs.setdefault("bos_token_id", 0)
    config = AutoConfig.for_model(arch, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _spread_norms(model, seed)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def _spread_norms(model, seed: int) -> None:
    """Random RMSNorm weights: all-ones (or gemma's zeros) would hide a norm wired to the wrong tensor."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.add_(torch.rand(p.shape, generator=g) * 0.5 - 0.25)


def build_adapter(model_dir: str | Path, out_dir: str | Path, *, r: int = 4, alpha: float = 8.0,
                  target_modules=("q_proj", "v_proj"), seed: int = 1, std: float = 0.3, **lora_kwargs) -> Path:
    """A PEFT LoRA adapter for `model_dir` with random A and B (init_lora_weights=False) so it changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=False,
                     lora_dropout=0.0, **lora_kwargs)
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, std)
    model.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


# -- a little training, so quantization tests and benchmarks see a confident model, not flat random logits -----
_WORDS = dict(
    adj=["quick", "lazy", "small", "old", "red", "quiet", "bright", "tiny"],
    noun=["fox", "dog", "model", "adapter", "river", "session", "cat", "tokenizer"],
    verb=["jumps over", "reads", "follows", "shares", "writes to", "watches"],
)


def synthetic_text(sentences: int = 400, seed: int = 0) -> str:
    """Sentences from a tiny grammar ("the quick fox reads the old river."): learnable, yet not one fixed string."""
    import random

    rng = random.Random(seed)
    pick = lambda k: rng.choice(_WORDS[k])  # noqa: E731
    return " ".join(f"the {pick('adj')} {pick('noun')} {pick('verb')} the {pick('adj')} {pick('noun')}."
                    for _ in range(sentences))


class _one_thread:
    """Tiny models train fastest on one thread; on a shared, busy machine several threads are many times slower."""

    def __enter__(self):
        import torch

        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.n)


def _token_batches(model_dir: Path, text: str, seq_len: int, batch: int, steps: int, seed: int):
    import torch
    from tokenizers import Tokenizer

    ids = torch.tensor(Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json")).encode(text).ids)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=g)
        yield torch.stack([ids[s:s + seq_len] for s in starts])


def train_model(model_dir: str | Path, text: str, *, steps: int = 300, lr: float = 3e-3, seq_len: int = 64,
                batch: int = 16, seed: int = 0) -> float:
    """Train the checkpoint in `model_dir` in place on `text` (AdamW, next-token loss); returns the last loss."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    loss = _train(model, Path(model_dir), text, lr=lr, seq_len=seq_len, batch=batch, steps=steps, seed=seed)
    model.save_pretrained(model_dir, safe_serialization=True)
    return loss


def train_adapter(model_dir: str | Path, out_dir: str | Path, text: str, *, steps: int = 100, r: int = 8,
                  alpha: float = 16.0, target_modules=("q_proj", "v_proj", "down_proj"), lr: float = 1e-2,
                  seq_len: int = 64, batch: int = 16, seed: int = 1) -> Path:
    """A PEFT LoRA adapter for `model_dir` trained on `text`, saved in `out_dir`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules),
                                            lora_dropout=0.0))
    _train(model, Path(model_dir), text, lr=lr, seq_len=seq_len, batch=batch, steps=steps, seed=seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def _train(model, model_dir: Path, text: str, *, lr: float, seq_len: int, batch: int, steps: int, seed: int) -> float:
    """AdamW on next-token loss over the trainable parameters; returns the last loss."""
    import torch

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss = None
    with _one_thread():
        for x in _token_batches(model_dir, text, seq_len, batch, steps, seed):
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    return float(loss.detach())
