"""The training loop: PEFT LoRA / QLoRA / DoRA on a transformers causal LM, our own small loop (not Trainer).

Why our own: `resume` must reach the same weights as an uninterrupted run. Here every source of randomness is a
function of (seed, step): the data order of epoch e is a permutation drawn from `seed + e`, and the dropout RNG is
reseeded from (seed, step) before each step. A checkpoint therefore needs only the step, the adapter weights and the
optimizer state to continue bit for bit. (benchmarks/NOTES.md has the measurements behind keeping it.)

Data-parallel: started by `accelerate launch` (or torchrun), N processes share each step. Every process draws the
same global micro-batch of N x per_device_train_batch_size rows and runs its own slice of it; the loss is normalized
by the global batch's trained tokens, and the LoRA gradients are summed across processes (one all_reduce), so the
update equals one process running the whole global batch. Process 0 alone writes the output folder.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from ortlora.errors import ModelError, OrtloraError
from ortlora.finetune import FinetuneArgs, FinetuneResult
from ortlora.finetune import state as files
from ortlora.finetune.data import IGNORE, Example, collate, load_examples
from ortlora.fileutil import remove_stale_temps, write_json
from ortlora.finetune.parallel import Processes

CAUSAL_SUFFIXES = ("ForCausalLM",)


def _torch():
    try:
        import datasets  # noqa: F401
        import peft  # noqa: F401
        import torch
        import transformers  # noqa: F401
    except ImportError as exc:
        raise OrtloraError(f"finetune needs the train extra ({exc.name} is missing): "
                           "pip install ortlora[train]") from None
    return torch


def resolve_device(args: FinetuneArgs, procs: Processes | None = None):
    torch = _torch()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise OrtloraError("--device cuda: no CUDA GPU is available to torch on this machine")
    name = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    if name == "cuda" and procs is not None and procs.world > 1:
        return torch.device("cuda", procs.local_rank), _dtype(args, torch, name)
    return torch.device(name), _dtype(args, torch, name)


def _dtype(args: FinetuneArgs, torch, name: str):
    if args.torch_dtype != "auto":
        dtype = getattr(torch, args.torch_dtype)
    elif name == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.float32
    return dtype


def check_qlora(device) -> None:
    """QLoRA = a 4-bit (bitsandbytes NF4) frozen base + LoRA; it needs bitsandbytes and a CUDA GPU."""
    problems = []
    if device.type != "cuda":
        problems.append("no CUDA GPU is in use (torch.cuda.is_available() is False, or --device cpu)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        problems.append("bitsandbytes is not installed (pip install bitsandbytes)")
    if problems:
        raise OrtloraError("--method qlora needs bitsandbytes 4-bit weights on a CUDA GPU, but "
                           + " and ".join(problems) + ". Use --method lora to train in full precision on this machine.")


def check_causal_lm(name: str, trust_remote_code: bool):
    """The model's config, if it is a causal (decoder-only) LM; a ModelError naming what it is otherwise."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = Path(name)
    if path.is_dir() and not (path / "config.json").is_file():
        what = ("a PEFT adapter folder" if (path / "adapter_config.json").is_file() else "not a Hugging Face model")
        raise ModelError(f"{name} has no config.json: {what}; pass the base model folder")
    if not path.exists() and name.startswith((".", "/", "~")):
        raise ModelError(f"{name}: no such folder")
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as exc:  # OSError (not found / no network), ValueError (unknown model_type)
        raise ModelError(f"cannot read the model config of {name}: {exc}") from None
    causal = {v for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() if isinstance(v, str)}
    archs = list(getattr(config, "architectures", None) or [])
    if archs:
        ok = any(a in causal or a.endswith(CAUSAL_SUFFIXES) for a in archs)
    else:
        ok = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    ok = ok or (trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}))
    if not ok:
        raise ModelError(f"{name} is not a causal language model (model_type {config.model_type}, architectures "
                         f"{', '.join(archs) or 'none'}): finetune trains decoder-only LMs (…ForCausalLM)")
    return config


def load_tokenizer(name: str, trust_remote_code: bool, need_offsets: bool):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelError(f"cannot load the tokenizer of {name}: {exc}") from None
    if need_offsets and not getattr(tok, "is_fast", False):
        raise ModelError(f"{name}: completion-only training needs a fast tokenizer (tokenizer.json) for offsets")
    return tok


def default_targets(model_type: str) -> list[str] | str:
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping

    return list(mapping.get(model_type) or []) or "all-linear"


def load_model(args: FinetuneArgs, config, device, dtype):
    """The base model (4-bit for QLoRA) wrapped by PEFT with a fresh, seeded LoRA/DoRA adapter."""
    torch = _torch()
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype, "trust_remote_code": args.trust_remote_code}
    if args.method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": device.index or 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, **kwargs)
    except Exception as exc:
        raise ModelError(f"cannot load {args.model_name_or_path}: {exc}") from None
    if args.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    else:
        model.to(device)
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    targets = args.target_modules
    if targets == ["all-linear"] or targets is None:
        targets = "all-linear" if targets else default_targets(config.model_type)
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=targets, use_dora=args.method == "dora", task_type="CAUSAL_LM", bias="none")
    torch.manual_seed(args.seed)  # LoRA A init
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise ModelError(f"--target_modules {targets}: {exc}") from None


def lr_factor(step: int, max_steps: int, warmup: int, kind: str) -> float:
    """Multiplier of the learning rate for update `step` (0-based): linear warmup, then constant/linear/cosine."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def lr_schedule(args: FinetuneArgs, max_steps: int, warmup: int) -> Callable[[int], float]:
    """Update step -> learning-rate multiplier: ours for constant/linear/cosine, transformers' for its other names."""
    if args.lr_scheduler_type in ("constant", "linear", "cosine"):
        return lambda step: lr_factor(step, max_steps, warmup, args.lr_scheduler_type)
    import torch
    from transformers import get_scheduler

    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = get_scheduler(args.lr_scheduler_type, dummy, num_warmup_steps=warmup, num_training_steps=max_steps)
    return sched.lr_lambdas[0]


def make_optimizer(args: FinetuneArgs, params, device):
    """transformers' `optim` names: adamw_torch(_fused), sgd, adafactor (a fixed learning rate, as Trainer's)."""
    import torch

    if args.optim.startswith("adamw"):
        fused = args.optim == "adamw_torch_fused" and device.type == "cuda"
        return torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay,
                                 betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, fused=fused or None)
    if args.optim == "sgd":
        return torch.optim.SGD(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=args.learning_rate, weight_decay=args.weight_decay, scale_parameter=False,
                     relative_step=False)


class Batches:
    """Micro-batch i of the run, as a pure function of (seed, i): epoch e visits the data in the permutation
    drawn from seed + e, in slices of `batch_size` (the last one may be short)."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.per_epoch = math.ceil(len(examples) / batch_size)
        self._perm: dict[int, list[int]] = {}

    def __getitem__(self, i: int) -> list[Example]:
        import torch

        epoch, pos = divmod(i, self.per_epoch)
        if epoch not in self._perm:
            self._perm = {epoch: torch.randperm(len(self.examples),
                                                generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()}
        idx = self._perm[epoch][pos * self.batch_size:(pos + 1) * self.batch_size]
        return [self.examples[j] for j in idx]


def token_loss_sum(model, batch, pad_id: int, device):
    """(summed cross-entropy over trained tokens, trained tokens, input tokens) of one micro-batch."""
    import torch.nn.functional as F

    ids, mask, labels = (t.to(device) for t in collate(batch, pad_id))
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # [B, S-1, V] predicts labels[:, 1:]
    target = labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, int((target != IGNORE).sum()), int(mask.sum())


def accumulate_gradients(model, micro_batches: list[list[Example]], scaler, pad_id: int, device, dtype,
                         procs: Processes | None = None):
    """Backward over one step's micro-batches, the loss normalized by the step's trained-token count (so gradient
    accumulation equals one big batch). With several processes each takes its slice of every (global) micro-batch
    and the count is the global one. Returns (this process's summed loss / trained tokens, its input tokens)."""
    import torch

    n_trained = max(1, sum(sum(1 for t in e.labels[1:] if t != IGNORE) for b in micro_batches for e in b))
    total, n_in = 0.0, 0
    for batch in micro_batches:
        if procs is not None and procs.world > 1:
            size = math.ceil(len(batch) / procs.world)
            batch = batch[procs.rank * size:(procs.rank + 1) * size]
            if not batch:  # a short last micro-batch of an epoch may leave this process nothing
                continue
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda" and dtype != torch.float32):
            loss, _, tokens = token_loss_sum(model, batch, pad_id, device)
        scaler.scale(loss / n_trained).backward()
        total, n_in = total + float(loss.detach()), n_in + tokens
    return total / n_trained, n_in


def apply_update(optimizer, scaler, params, lr: float, max_grad_norm: float) -> None:
    import torch

    for g in optimizer.param_groups:
        g["lr"] = lr
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def evaluate(model, examples: list[Example], batch_size: int, pad_id: int, device,
             procs: Processes | None = None) -> float:
    """Mean loss per trained token; with several processes each evaluates every N-th row and the sums are added."""
    import torch

    if procs is not None and procs.world > 1:
        examples = examples[procs.rank::procs.world]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            loss, n, _ = token_loss_sum(model, examples[i:i + batch_size], pad_id, device)
            total, count = total + float(loss), count + n
    model.train(was_training)
    if procs is not None:
        total, count = procs.sum(total, count)
    return total / max(count, 1)


def run(args: FinetuneArgs, progress: bool = True, callbacks: Sequence[Callable[[dict], None]] = ()) -> FinetuneResult:
    _torch()
    with _library_bars(progress):
        return _run(args, progress, callbacks)


@contextlib.contextmanager
def _library_bars(enabled: bool):
    """Silence datasets' and transformers' own progress bars for a quiet run (restored afterwards)."""
    import datasets
    import transformers

    ds_off = datasets.utils.logging.is_progress_bar_enabled() is False
    tf_on = transformers.utils.logging.is_progress_bar_enabled()
    if not enabled:
        datasets.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if not enabled and not ds_off:
            datasets.utils.logging.enable_progress_bar()
        if not enabled and tf_on:
            transformers.utils.logging.enable_progress_bar()


def _run(args: FinetuneArgs, progress: bool, callbacks: Sequence[Callable[[dict], None]]) -> FinetuneResult:
    """Every check first (arguments, output folder, QLoRA support, model, tokenizer, data), then training."""
    import torch

    procs = Processes(cpu=args.device == "cpu" or not torch.cuda.is_available())
    progress = progress and procs.main
    say = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    out = Path(args.output_path)
    record = _normalized(args)
    if procs.world > 1:  # the global batch, hence the weights, depend on the number of processes
        record["processes"] = procs.world
    resume_from = files.check_output(out, record, FinetuneArgs.RESUMABLE_CHANGES, args.resume, args.overwrite)
    device, dtype = resolve_device(args, procs)
    if args.method == "qlora":
        check_qlora(device)
    config = check_causal_lm(args.model_name_or_path, args.trust_remote_code)
    tokenizer = load_tokenizer(args.model_name_or_path, args.trust_remote_code, args.completion_only)
    data_kw = dict(data_files=args.data_files, text_template=args.text_template, text_field=args.text_field,
                   completion_only=args.completion_only, max_seq_len=args.max_seq_len,
                   use_chat_template=args.use_chat_template, max_samples=args.max_samples,
                   add_special_tokens=args.add_special_tokens)
    train_ex, train_stats, splits = load_examples(args.data_name, args.train_split, tokenizer,
                                                  subset=args.train_subset, **data_kw)
    eval_ex, eval_stats = [], None
    if args.eval_split:
        eval_subset = args.eval_subset or args.train_subset
        eval_ex, eval_stats, _ = load_examples(args.data_name, args.eval_split, tokenizer, subset=eval_subset,
                                               splits=splits if eval_subset == args.train_subset else None, **data_kw)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    model = load_model(args, config, device, dtype)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(args, params, device)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and dtype == torch.float16)
    batches = Batches(train_ex, args.per_device_train_batch_size * procs.world, args.seed)
    ga = args.gradient_accumulation_steps
    steps_per_epoch = max(1, batches.per_epoch // ga)
    max_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    warmup = args.warmup_steps or math.ceil(args.warmup_ratio * max_steps)
    schedule = lr_schedule(args, max_steps, warmup)
    every = {"no": None, "steps": None, "epoch": steps_per_epoch}
    eval_steps = every[args.eval_strategy] or (args.eval_steps or args.logging_steps)
    save_steps = every[args.save_strategy] or args.save_steps
    eval_ex = eval_ex if args.eval_strategy != "no" else []

    step, history, tokens_seen, train_loss_sum = 0, [], 0, 0.0
    if resume_from is not None:
        saved = files.load_checkpoint(resume_from, model, optimizer, scaler)
        step, history = saved["step"], saved["log_history"]
        tokens_seen, train_loss_sum = saved["tokens_seen"], saved["train_loss_sum"]
        say(f"resuming from {resume_from} (step {step} of {max_steps})")
    if procs.main:
        files.start_output(out, record, args.overwrite, resume_from is not None)
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in model.parameters())
    say(f"finetune {args.method}: {len(train_ex)} train rows ({train_stats['truncated']} truncated, "
        f"{train_stats['dropped']} dropped), {len(eval_ex)} eval rows; {trainable:,} trainable parameters of "
        f"{total:,}; {max_steps} steps on {device.type} ({str(dtype).removeprefix('torch.')})"
        + (f", {procs.world} processes" if procs.world > 1 else ""))

    def snapshot() -> dict:
        return {"step": step, "max_steps": max_steps, "epoch": step * ga / batches.per_epoch,
                "log_history": history, "tokens_seen": tokens_seen, "train_loss_sum": train_loss_sum}

    saved_steps = {s for s, _ in files.checkpoints(out)}
    if eval_ex and step == 0:
        history.append({"step": 0, "epoch": 0.0, "eval_loss": evaluate(model, eval_ex, args.per_device_eval_batch_size,
                                                                       pad_id, device, procs)})
    from tqdm import tqdm

    bar = tqdm(total=max_steps, initial=step, desc="finetune", unit="step", disable=not progress, dynamic_ncols=True)
    window = {"loss": 0.0, "tokens": 0, "steps": 0, "seconds": 0.0}
    start_time = time.perf_counter()
    try:
        while step < max_steps:
            t0 = time.perf_counter()
            torch.manual_seed(args.seed * 1_000_003 + step)  # dropout of this step, whatever came before
            loss, n_in = accumulate_gradients(model, [batches[step * ga + j] for j in range(ga)], scaler, pad_id,
                                              device, dtype, procs)
            procs.sum_gradients(params)
            loss, n_in = procs.sum(loss, n_in)
            n_in = int(n_in)
            with files.defer_interrupt():  # the update, the step counter and the records change together
                lr = args.learning_rate * schedule(step)
                apply_update(optimizer, scaler, params, lr, args.max_grad_norm)
                step += 1
                tokens_seen += n_in
                train_loss_sum += loss
            for key, value in (("loss", loss), ("tokens", n_in), ("steps", 1), ("seconds", time.perf_counter() - t0)):
                window[key] += value
            rate = window["tokens"] / max(window["seconds"], 1e-9)  # training tokens/s, evaluation not counted
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}")
            event = {"step": step, "loss": loss, "learning_rate": lr, "tokens": n_in}
            epoch = round(step * ga / batches.per_epoch, 4)
            if step % args.logging_steps == 0 or step == max_steps:
                history.append({"step": step, "epoch": epoch, "loss": window["loss"] / window["steps"],
                                "learning_rate": lr, "tokens_per_second": round(rate, 1)})
                window = dict.fromkeys(window, 0)
            if eval_ex and (step % eval_steps == 0 or step == max_steps):
                event["eval_loss"] = evaluate(model, eval_ex, args.per_device_eval_batch_size, pad_id, device, procs)
                history.append({"step": step, "epoch": epoch, "eval_loss": event["eval_loss"]})
                if progress:
                    bar.write(f"step {step}: eval loss {event['eval_loss']:.4f}")
            if args.save_strategy != "no" and step % save_steps == 0 and step < max_steps:
                if procs.main:
                    files.save_checkpoint(out, step, model, optimizer, scaler, snapshot(), args.save_total_limit)
                saved_steps.add(step)
            for cb in callbacks:
                cb(event)
    except KeyboardInterrupt:
        bar.close()
        if not procs.main:
            raise
        last = None
        if step > 0 and step not in saved_steps:
            last = files.save_checkpoint(out, step, model, optimizer, scaler, snapshot(), args.save_total_limit)
        # a save the signal cut short removes its temporary, unless the signal came between the temporary's
        # creation and the cleanup's start: this process was the only writer here, so none of these is live
        remove_stale_temps(out / files.CHECKPOINTS, grace=0)
        write_json(out / files.TRAINER_STATE, {**snapshot(), "interrupted": True})
        last = last or (files.checkpoints(out)[-1][1] if files.checkpoints(out) else None)
        print(f"interrupted at step {step}; " + (f"checkpoint {last}; continue with --resume" if last else
                                                 "no checkpoint yet"), file=sys.stderr)
        raise
    bar.close()
    runtime = time.perf_counter() - start_time
    if not procs.main:  # process 0 writes the folder; the others end once it has
        procs.barrier()
        return FinetuneResult(out, {"global_step": step, "train_loss": train_loss_sum / max(step, 1)}, history,
                              main_process=False)
    files.write_adapter(out, model)
    files.write_olive_layout(out, args.model_name_or_path)
    evals = [r["eval_loss"] for r in history if "eval_loss" in r]
    metrics = {"train_loss": train_loss_sum / max(step, 1), "global_step": step, "train_runtime_s": round(runtime, 3),
               "train_tokens": tokens_seen, "train_rows": len(train_ex), "train_truncated": train_stats["truncated"],
               "train_dropped": train_stats["dropped"], "method": args.method, "base_model": args.model_name_or_path,
               "device": device.type,
               "trainable_parameters": trainable}
    if evals:
        metrics.update(eval_loss=evals[-1], eval_loss_initial=evals[0], eval_rows=len(eval_ex),
                       eval_truncated=eval_stats["truncated"])
    write_json(out / files.TRAINER_STATE, {**snapshot(), "interrupted": False})
    write_json(out / files.METRICS, metrics)
    files.plot_loss(out / files.PLOT, history)
    say(f"adapter written to {out}" + (f"; eval loss {evals[0]:.4f} -> {evals[-1]:.4f}" if evals else ""))
    procs.barrier()
    return FinetuneResult(out, metrics, history)


def _normalized(args: FinetuneArgs) -> dict:
    """The run's arguments as recorded in run_config.json, local paths made absolute."""
    record = args.to_json()
    for key in ("model_name_or_path", "data_name"):
        if record[key] and Path(record[key]).expanduser().exists():
            record[key] = str(Path(record[key]).expanduser().resolve())
    if record["data_files"]:
        record["data_files"] = [str(Path(f).expanduser().resolve()) for f in record["data_files"]]
    return record
