"""`ortlora quickstart`: the whole path on a built-in default, with no download.

    base model (tokenizer + Llama-style checkpoint, pre-trained to copy letter strings)
      -> finetune two LoRA adapters (`upper`, `shift`) on shipped task data
      -> export fp32, int4 and int8, convert the adapters to .onnx_adapter (checked against each model)
      -> generate on held-out prompts with the base and each adapter, in mixed-adapter batches
      -> exact-match table: each adapter should solve its own task, and neither the base nor the other adapter
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from ortlora.quickstart import tasks

MODELS = ("base", *tasks.ADAPTER_TASKS)
PRECISIONS = ("fp32", "int4", "int8")


def quickstart(workdir: str | Path = "ortlora-quickstart", *, pretrain_steps: int = 250, finetune_steps: int = 150,
               n_eval: int = 64, log: Callable[[str], None] = print) -> dict[str, dict[str, dict[str, float]]]:
    """Run every stage; returns accuracy[precision][model][task] (exact match on held-out prompts)."""
    check_options(workdir, pretrain_steps=pretrain_steps, finetune_steps=finetune_steps, n_eval=n_eval)
    work = Path(workdir)
    created = not work.exists()
    try:
        return _run(work, pretrain_steps, finetune_steps, n_eval, log)
    except BaseException:
        # each stage's output is written atomically (a finished stage is reused by the next run); a workdir this
        # run created and that is still empty goes too
        if created and work.is_dir() and not any(work.iterdir()):
            work.rmdir()
        raise


def serving_precision() -> str:
    """The fastest precision that meets the accuracy bar on this machine: int8 where the CPU has int8 units."""
    from ortlora.export.int8 import cpu_warning

    return "int8" if cpu_warning() is None else "fp32"


def _run(work: Path, pretrain_steps: int, finetune_steps: int, n_eval: int,
         log: Callable[[str], None]) -> dict[str, dict[str, dict[str, float]]]:
    import torch

    from ortlora.adapters.convert import convert_adapter
    from ortlora.adapters.onnx_adapter import SUFFIX
    from ortlora.export import export
    from ortlora.finetune import finetune
    from ortlora.quickstart.base import build_base

    torch.set_num_threads(1)  # tiny matrices: one thread beats two (and leaves a core for the OS)
    t0 = time.perf_counter()
    stage = lambda n, text: log(f"[{n}/5] {text} ({time.perf_counter() - t0:.0f}s)")  # noqa: E731

    stage(1, "base model: tokenizer trained on the shipped text, Llama-style checkpoint pre-trained to copy")
    base = build_base(work / "base", steps=pretrain_steps, log=log)

    stage(2, f"fine-tuning LoRA adapters {', '.join(tasks.ADAPTER_TASKS)}")
    peft_dirs = {}
    for task in tasks.ADAPTER_TASKS:
        peft_dirs[task] = work / "adapters" / task
        finetune(model_name_or_path=str(base), data_name=str(tasks.DATA / f"{task}_train.jsonl"),
                 output_path=str(peft_dirs[task]), text_template="{prompt}{response}", completion_only=True,
                 max_steps=finetune_steps, learning_rate=5e-3, lr_scheduler_type="cosine", warmup_steps=10,
                 lora_r=8, lora_alpha=16, lora_dropout=0.0, per_device_train_batch_size=32, max_seq_len=64,
                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                 logging_steps=50, save_steps=10_000, overwrite=True, progress=False)
        log(f"  adapter {task}: {peft_dirs[task]}")

    stage(3, f"export {', '.join(PRECISIONS)} (LoRA inputs from the adapters' target modules)")
    folders = {p: export(base, work / "onnx" / p, adapter_path=list(peft_dirs.values()), precision=p,
                         progress=False) for p in PRECISIONS}

    stage(4, "convert adapters to .onnx_adapter, checked against each model")
    files = {(p, t): convert_adapter(peft_dirs[t], work / "onnx" / p / f"{t}{SUFFIX}", model=folders[p])
             for p in PRECISIONS for t in tasks.ADAPTER_TASKS}

    stage(5, f"generating on {n_eval} held-out prompts per task, base and adapters in mixed batches")
    accuracy = {p: evaluate(folders[p], {t: files[p, t] for t in tasks.ADAPTER_TASKS}, n_eval, log) for p in PRECISIONS}
    log(table(accuracy))
    log(f"done in {time.perf_counter() - t0:.0f}s; everything is in {work}/")
    serving = serving_precision()
    log(f"next: serve it, then open the playground at http://127.0.0.1:8000/\n"
        f"  ortlora serve -m {work / 'onnx' / serving} --adapters {work / 'onnx' / serving} --model-name base")
    return accuracy


def check_options(workdir: str | Path, **counts: int) -> None:
    """Refuse, before anything is created, a `workdir` that cannot be a folder and counts below 1 (all at once)."""
    from ortlora.errors import OrtloraError
    from ortlora.fileutil import output_problem

    problems = [f"{name} must be an integer >= 1, got {value!r}" for name, value in counts.items()
                if isinstance(value, bool) or not isinstance(value, int) or value < 1]
    work = Path(workdir)
    if work.exists() and not work.is_dir():
        problems.append(f"workdir {work} is a file, not a folder")
    elif output_problem(work) is not None:
        problems.append(f"workdir {output_problem(work)}")
    if problems:
        raise OrtloraError("; ".join(problems))


def evaluate(folder: Path, adapter_files: dict[str, Path], n_eval: int, log) -> dict[str, dict[str, float]]:
    """Exact match of every model (base, each adapter) on every adapter task's held-out prompts."""
    from ortlora.runtime.model import Model

    model = Model(folder, slots=16, max_len=64)
    for name, path in adapter_files.items():
        model.adapters.load(path, name=name)
    result: dict[str, dict[str, float]] = {}
    for task in tasks.ADAPTER_TASKS:
        rows = tasks.load(f"{task}_test")[:n_eval]
        # one batch holds every model's rows: the base (no adapter) and each adapter decode side by side
        prompts = [r["prompt"] for r in rows] * len(MODELS)
        adapters = [None if m == "base" else m for m in MODELS for _ in rows]
        texts = model.generate(prompts, adapter=adapters, max_new_tokens=16)
        for i, m in enumerate(MODELS):
            outs = texts[i * len(rows):(i + 1) * len(rows)]
            result.setdefault(m, {})[task] = sum(o == r["response"] for o, r in zip(outs, rows)) / len(rows)
            if task == tasks.ADAPTER_TASKS[0]:
                log(f"  {folder.name} {m:>5}: {rows[0]['prompt']!r} -> {outs[0]!r}")
    return result


def table(accuracy: dict[str, dict[str, dict[str, float]]]) -> str:
    head = f"{'precision':9} {'model':6} " + " ".join(f"{t:>7}" for t in tasks.ADAPTER_TASKS)
    lines = ["exact match on held-out prompts:", head]
    for p, per_model in accuracy.items():
        for m in MODELS:
            lines.append(f"{p:9} {m:6} " + " ".join(f"{per_model[m][t]:7.0%}" for t in tasks.ADAPTER_TASKS))
    return "\n".join(lines)
