"""ortlora's training loop vs transformers' Trainer on the same tiny LoRA run: resume exactness and step time.

    python benchmarks/finetune_engines.py [--steps 8] [--dropout 0.1]

For each engine: an uninterrupted run of N steps, and a run stopped after the checkpoint at N/2 then resumed to N;
prints the largest difference between the two final adapters (0 = bit-identical) and the median step time.
The data-parallel check (2 processes vs 1) is tests/test_finetune.py::test_two_processes_give_the_one_process_adapter.
Figures: benchmarks/NOTES.md.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class Stop(Exception):
    pass


def data(root: Path) -> Path:
    rng = random.Random(0)
    path = root / "add.jsonl"
    with open(path, "w") as f:
        for _ in range(96):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            f.write(json.dumps({"prompt": f"add {a} {b}", "response": str(a + b)}) + "\n")
    return path


def adapter(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def ortlora_runs(model: Path, rows: Path, root: Path, steps: int, dropout: float):
    from ortlora.finetune import finetune

    kw = dict(model_name_or_path=str(model), data_name=str(rows), text_template="{prompt}={response}", max_steps=steps,
              save_steps=steps // 2, lora_r=8, lora_dropout=dropout, target_modules=["all-linear"],
              learning_rate=5e-3, per_device_train_batch_size=8, max_seq_len=32, progress=False)
    stamps: list[float] = []
    finetune(output_path=str(root / "a"), callbacks=[lambda event: stamps.append(time.perf_counter())], **kw)
    step_s = float(np.median(np.diff(stamps)))

    def stop(event):
        if event["step"] == steps // 2:
            raise KeyboardInterrupt

    try:
        finetune(output_path=str(root / "b"), callbacks=[stop], **kw)
    except KeyboardInterrupt:
        pass
    finetune(output_path=str(root / "b"), resume=True, **kw)
    return adapter(root / "a"), adapter(root / "b"), step_s


def trainer_runs(model: Path, rows: Path, root: Path, steps: int, dropout: float):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from ortlora.finetune.data import collate, load_examples

    tok = AutoTokenizer.from_pretrained(model)
    examples, _, _ = load_examples(rows, "train", tok, text_template="{prompt}={response}", max_seq_len=32)
    pad = tok.pad_token_id or 0

    def collator(batch):
        ids, mask, labels = collate(batch, pad)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def build():
        torch.manual_seed(42)
        base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear",
                                               task_type="CAUSAL_LM"))

    class StopAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            raise Stop

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    def run(out: Path, resume: bool = False, stop: bool = False, stamp: bool = False):
        args = TrainingArguments(output_dir=str(out), max_steps=steps, save_steps=steps // 2, learning_rate=5e-3,
                                 per_device_train_batch_size=8, lr_scheduler_type="constant", report_to="none",
                                 use_cpu=True, seed=42, logging_steps=steps, save_strategy="steps",
                                 remove_unused_columns=False, disable_tqdm=True)
        trainer = Trainer(model=build(), args=args, train_dataset=examples, data_collator=collator,
                          callbacks=[StopAfterSave()] if stop else [Stamp()] if stamp else [])
        try:
            trainer.train(resume_from_checkpoint=resume or None)
        except Stop:
            return
        trainer.model.save_pretrained(out / "final")

    run(root / "ta", stamp=True)
    step_s = float(np.median(np.diff(stamps)))
    run(root / "tb", stop=True)
    run(root / "tb", resume=True)
    return adapter(root / "ta" / "final"), adapter(root / "tb" / "final"), step_s


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--dropout", type=float, default=0.1)
    a = p.parse_args()
    import torch

    from ortlora.testing import build_model

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_model(root / "model", "llama")
        rows = data(root)
        for name, runs in (("ortlora loop", ortlora_runs), ("transformers Trainer", trainer_runs)):
            straight, resumed, step_s = runs(model, rows, root / name.split()[0], a.steps, a.dropout)
            diff = max(float(np.abs(straight[k] - resumed[k]).max()) for k in straight)
            scale = max(float(np.abs(v).max()) for v in straight.values())
            print(f"{name:22s} resume max |diff| {diff:.3g} (weights up to {scale:.3g}); {1000 * step_s:.0f} ms/step (median)")


if __name__ == "__main__":
    main()
