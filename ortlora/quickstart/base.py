"""The quickstart's base model: a Llama-style checkpoint with a tokenizer trained on the shipped task text, briefly
pre-trained to copy letter strings (so adapters only have to learn a rewrite, not the format)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

from ortlora.fileutil import atomic_dir
from ortlora.quickstart import tasks

CONFIG = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
              bos_token_id=0, eos_token_id=0, pad_token_id=0)
EOS = "<|endoftext|>"


def train_tokenizer(out: Path, vocab_size: int = 300) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = [r["prompt"] + r["response"] for t in tasks.TASKS for r in tasks.load(f"{t}_train")[:500]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "pad_token": EOS, "bos_token": None,
        "model_max_length": CONFIG["max_position_embeddings"],
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }, indent=2))


def build_base(out: Path, steps: int = 400, batch: int = 32, lr: float = 3e-3, seed: int = 0,
               log: Callable[[str], None] = print) -> Path:
    """Create and pre-train the base checkpoint in `out` (skipped when it already exists)."""
    if (out / "model.safetensors").is_file():
        return out
    with atomic_dir(out) as tmp:  # an interrupted or failed run leaves no half-built base to be reused next time
        _build(tmp, steps, batch, lr, seed, log)
    return out


def _build(out: Path, steps: int, batch: int, lr: float, seed: int, log: Callable[[str], None]) -> None:
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    train_tokenizer(out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tok.get_vocab_size(), **CONFIG))
    rows = [(tok.encode(r["prompt"]).ids, tok.encode(r["response"]).ids + [0]) for r in tasks.load("copy_train")]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed)
    model.train()
    for step in range(steps):
        ids, mask, labels = _batch(rng.sample(rows, batch))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"  pre-training step {step + 1}/{steps}: loss {loss.item():.3f}")
    model.save_pretrained(out, safe_serialization=True)


def _batch(rows):
    import torch

    seqs = [p + c for p, c in rows]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    labels = torch.tensor([[-100] * len(p) + c + [-100] * (width - len(p) - len(c)) for p, c in rows])
    return ids, mask, labels
