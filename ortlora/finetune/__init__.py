"""`finetune`: train a LoRA / QLoRA / DoRA adapter with PEFT on local data; the output folder is a PEFT adapter.

    from ortlora.finetune import finetune
    finetune(model_name_or_path="hf_dir", data_name="data.jsonl", output_path="out",
             text_template="### Question: {prompt}\\n### Answer: {response}", max_steps=150)

Keyword names are the command's flags (Olive's `olive finetune` and transformers' TrainingArguments spellings),
and the keys of a `config` YAML/JSON file, whose values the keyword arguments override.

Output folder:
    adapter_config.json, adapter_model.safetensors   the trained adapter (PeftModel.from_pretrained, read_peft)
    trainer_state.json, metrics.json, loss.png       log history, final figures, training/eval loss plot
    run_config.json                                  the arguments, checked again by `resume`
    checkpoints/checkpoint-N/                        adapter + optimizer + state.json, each written atomically
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ortlora.errors import OrtloraError

METHODS = ("lora", "qlora", "dora")
# ours (constant/linear/cosine after a linear warmup that starts at lr/warmup) and transformers' other schedules
# that need no lr_scheduler_kwargs (computed by transformers.get_scheduler)
SCHEDULERS = ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial", "constant_with_warmup",
              "inverse_sqrt")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "sgd", "adafactor")
STRATEGIES = ("no", "steps", "epoch")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class FinetuneArgs:
    model_name_or_path: str | None = None
    data_name: str | None = None
    output_path: str | None = None
    method: str = "lora"
    # data
    data_files: list[str] | None = None
    train_split: str = "train"
    eval_split: str | None = None
    train_subset: str | None = None  # a datasets configuration name (Olive's --train_subset)
    eval_subset: str | None = None  # default: train_subset
    text_template: str | None = None
    text_field: str | None = None
    use_chat_template: bool = False  # rows must be chat `messages` (without it they are chat when that column exists)
    completion_only: bool = False
    max_seq_len: int = 1024
    max_samples: int | None = None  # the first N rows of each split (Olive's --max_samples)
    add_special_tokens: bool | None = None  # the tokenizer's BOS etc.: None = yes for text rows, no for chat rows
    # LoRA
    lora_r: int = 64
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: list[str] | None = None
    # optimization (transformers TrainingArguments names)
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "constant"
    optim: str = "adamw_torch"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    warmup_ratio: float = 0.03
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 3.0
    max_steps: int = -1
    gradient_checkpointing: bool = False
    seed: int = 42
    # logging, evaluation, checkpoints
    logging_steps: int = 10
    eval_steps: int | None = None  # default: logging_steps
    save_steps: int = 100
    save_total_limit: int | None = 3
    save_strategy: str = "steps"  # no / steps (every save_steps) / epoch
    eval_strategy: str = "steps"  # no / steps (every eval_steps) / epoch
    resume: bool | str = False  # True: the last checkpoint in output_path; a path: that checkpoint
    overwrite: bool = False
    # model loading
    device: str = "auto"
    torch_dtype: str = "auto"
    trust_remote_code: bool = False

    # Arguments that may change between a run and its `resume` without changing the trained weights.
    RESUMABLE_CHANGES: typing.ClassVar[tuple[str, ...]] = (
        "resume", "overwrite", "logging_steps", "eval_steps", "save_steps", "save_total_limit",
        "per_device_eval_batch_size", "device", "save_strategy", "eval_strategy")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class FinetuneResult:
    output_path: Path
    metrics: dict[str, Any]
    log_history: list[dict[str, Any]] = field(default_factory=list)
    main_process: bool = True  # False in the other processes of a data-parallel run (process 0 wrote the folder)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or JSON file holding a mapping of argument names to values."""
    path = Path(path)
    if not path.is_file():
        raise OrtloraError(f"--config {path}: no such file")
    try:
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except ImportError:
        raise OrtloraError("YAML configs need pyyaml: pip install ortlora[train]") from None
    except Exception as exc:
        raise OrtloraError(f"--config {path}: cannot parse it: {exc}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise OrtloraError(f"--config {path}: expected a mapping of argument names to values")
    return values


def _coerce(name: str, value: Any, hint: Any, problems: list[str]) -> Any:
    """A config/flag value -> the field's type (YAML reads `2e-4` as a string; lists may be comma-separated)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if value is None:
        if type(None) not in typing.get_args(hint):
            problems.append(f"{name}: a value is required")
        return value
    if bool in args and str in args:  # resume: true/false or a path
        if isinstance(value, bool) or str(value).lower() in ("true", "false"):
            return value if isinstance(value, bool) else str(value).lower() == "true"
        return str(value)
    kind = typing.get_origin(args[0]) or args[0]
    try:
        if kind is list:
            items = value.split(",") if isinstance(value, str) else list(value)
            return [str(v).strip() for v in items if str(v).strip()]
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if not isinstance(value, (bool, int)):
                raise ValueError
            return bool(value)
        if kind is int:
            f = float(value)
            if f != int(f):
                raise ValueError
            return int(f)
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        problems.append(f"{name}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
        return value


def make_args(config: str | Path | None = None, **kwargs) -> FinetuneArgs:
    """Defaults < `config` file < keyword arguments; every unknown name or bad value is reported at once."""
    values = {**(load_config_file(config) if config else {}), **kwargs}
    hints = typing.get_type_hints(FinetuneArgs)
    names = [f.name for f in dataclasses.fields(FinetuneArgs)]
    problems = [f"unknown argument {k!r}" for k in values if k not in names]
    clean = {k: _coerce(k, v, hints[k], problems) for k, v in values.items() if k in names}
    if clean.get("eval_split") == "":
        clean["eval_split"] = None
    if problems:
        raise OrtloraError("bad finetune arguments:\n  " + "\n  ".join(problems))
    args = FinetuneArgs(**clean)
    _validate(args)
    return args


def _validate(a: FinetuneArgs) -> None:
    p = []
    for name, flag in (("model_name_or_path", "-m"), ("data_name", "-d"), ("output_path", "-o")):
        if not getattr(a, name):
            p.append(f"{name} ({flag}) is required")
    for name, value, choices in (("method", a.method, METHODS), ("lr_scheduler_type", a.lr_scheduler_type, SCHEDULERS),
                                 ("torch_dtype", a.torch_dtype, DTYPES), ("device", a.device, DEVICES),
                                 ("optim", a.optim, OPTIMIZERS), ("save_strategy", a.save_strategy, STRATEGIES),
                                 ("eval_strategy", a.eval_strategy, STRATEGIES)):
        if value not in choices:
            p.append(f"{name} {value!r}: choose one of {', '.join(choices)}")
    for name in ("lora_r", "per_device_train_batch_size", "per_device_eval_batch_size",
                 "gradient_accumulation_steps", "logging_steps", "save_steps"):
        if getattr(a, name) < 1:
            p.append(f"{name} must be at least 1, got {getattr(a, name)}")
    if a.max_seq_len < 2:
        p.append("max_seq_len must be at least 2 (one token to read, one to predict)")
    if a.eval_steps is not None and a.eval_steps < 1:
        p.append(f"eval_steps must be at least 1, got {a.eval_steps}")
    if a.save_total_limit is not None and a.save_total_limit < 1:
        p.append(f"save_total_limit must be at least 1, got {a.save_total_limit}")
    if not 0 <= a.lora_dropout < 1:
        p.append(f"lora_dropout must be in [0, 1), got {a.lora_dropout}")
    if a.learning_rate <= 0:
        p.append(f"learning_rate must be positive, got {a.learning_rate}")
    if not 0 <= a.warmup_ratio < 1 or a.warmup_steps < 0:
        p.append("warmup_ratio must be in [0, 1) and warmup_steps at least 0")
    if a.max_steps <= 0 and a.num_train_epochs <= 0:
        p.append("set max_steps or num_train_epochs to a positive number")
    if sum(x for x in (a.text_template is not None, a.text_field is not None, a.use_chat_template)) > 1:
        p.append("text_template, text_field and use_chat_template exclude each other: pass one")
    if a.max_samples is not None and a.max_samples < 1:
        p.append(f"max_samples must be at least 1, got {a.max_samples}")
    if a.resume and a.overwrite:
        p.append("resume and overwrite exclude each other")
    if p:
        raise OrtloraError("bad finetune arguments:\n  " + "\n  ".join(p))


def finetune(config: str | Path | None = None, *, progress: bool = True,
             callbacks: Sequence[Callable[[dict], None]] = (), **kwargs) -> FinetuneResult:
    """Train an adapter; see FinetuneArgs for the arguments. `callbacks` get each step's record (step, loss, lr,
    tokens) after the step's update; an exception there (KeyboardInterrupt too) stops the run like Ctrl-C does."""
    args = make_args(config, **kwargs)
    from ortlora.finetune.train import run

    return run(args, progress=progress, callbacks=callbacks)


__all__ = ["FinetuneArgs", "FinetuneResult", "finetune", "make_args", "load_config_file"]
