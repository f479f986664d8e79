"""`ortlora finetune`: the command line of `olive finetune` (plus transformers TrainingArguments names) on local data.

    ortlora finetune --method lora -m HF_MODEL_DIR -d data.jsonl --train_split "train[:4096]" \\
        --eval_split "train[4096:4224]" --text_template "### Question: {prompt}\\n### Answer: {response}" \\
        --per_device_train_batch_size 16 --per_device_eval_batch_size 16 --max_steps 150 --logging_steps 50 -o OUT

Only flags given on the command line override a `--config` file; the rest keep the file's value or the default.
"""

from __future__ import annotations

import argparse
import sys

from ortlora.finetune.data import unescape

S = argparse.SUPPRESS


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.argument_default = S  # an option absent from the command line leaves the config file's value in place
    p.add_argument("--config", help="YAML or JSON file of these options (keys as the long flag names, e.g. lora_r)")
    g = p.add_argument_group("model and output")
    g.add_argument("-m", "--model_name_or_path", "--model", help="Hugging Face causal LM folder (or hub name)")
    g.add_argument("-o", "--output_path", "--output", help="output folder: becomes the PEFT adapter folder")
    g.add_argument("--method", choices=["lora", "qlora", "dora"], help="lora (default), qlora (4-bit base, CUDA + "
                   "bitsandbytes) or dora (weight-decomposed LoRA)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto: cuda when available")
    g.add_argument("--torch_dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="base weights dtype (default auto: float32 on CPU, bfloat16 on CUDA)")
    g.add_argument("--trust_remote_code", action="store_true")
    g.add_argument("--resume", nargs="?", const=True, metavar="CHECKPOINT",
                   help="continue the run in the output folder from its last checkpoint (or CHECKPOINT)")
    g.add_argument("--overwrite", action="store_true", help="replace an earlier run's output folder")
    g.add_argument("--no-progress", "--no_progress", dest="no_progress", action="store_true",
                   help="no progress bar or messages")
    d = p.add_argument_group("data")
    d.add_argument("-d", "--data_name", "--data", help="JSONL/JSON/CSV/Parquet/text file or folder, a folder saved "
                   "with datasets' save_to_disk, a datasets builder name with --data_files, or a hub name")
    d.add_argument("--data_files", help="comma-separated data files (Olive: -d json --data_files a.jsonl)")
    d.add_argument("--train_split", help='split expression, e.g. "train", "train[:4096]", "train[10%%:]" (default train)')
    d.add_argument("--eval_split", help='split expression for the eval loss, e.g. "train[4096:4224]"')
    d.add_argument("--text_template", type=unescape,
                   help=r"row -> text, e.g. '### Question: {prompt}\n### Answer: {response}' (\n means a newline)")
    d.add_argument("--text_field", help="train on this column as it is (default: text, or chat rows in messages)")
    d.add_argument("--completion_only", "--train_on_completions_only", dest="completion_only", action="store_true",
                   help="mask the prompt from the loss: a template's last placeholder onward, or assistant turns")
    d.add_argument("--max_seq_len", type=int, help="truncate rows to this many tokens (default 1024)")
    lo = p.add_argument_group("LoRA")
    lo.add_argument("--lora_r", type=int, help="rank (default 64)")
    lo.add_argument("--lora_alpha", type=float, help="alpha (default 16)")
    lo.add_argument("--lora_dropout", type=float, help="dropout (default 0.05)")
    lo.add_argument("--target_modules", help="comma-separated module names, or all-linear (default: PEFT's for the "
                    "architecture, e.g. q_proj,v_proj for Llama)")
    t = p.add_argument_group("training (transformers TrainingArguments names)")
    for flag, typ, help_ in (
        ("--learning_rate", float, "default 2e-4"),
        ("--warmup_ratio", float, "default 0.03"), ("--warmup_steps", int, "overrides warmup_ratio when > 0"),
        ("--weight_decay", float, "AdamW weight decay (default 0)"), ("--max_grad_norm", float, "default 1.0"),
        ("--per_device_train_batch_size", int, "default 8"), ("--per_device_eval_batch_size", int, "default 8"),
        ("--gradient_accumulation_steps", int, "default 1"), ("--num_train_epochs", float, "default 3"),
        ("--max_steps", int, "overrides num_train_epochs when > 0"), ("--seed", int, "default 42"),
        ("--logging_steps", int, "default 10"), ("--eval_steps", int, "default: logging_steps"),
        ("--save_steps", int, "checkpoint every N steps (default 100)"),
        ("--save_total_limit", int, "keep the last N checkpoints (default 3)"),
    ):
        t.add_argument(flag, type=typ, help=help_)
    t.add_argument("--lr_scheduler_type", choices=["constant", "linear", "cosine"], help="default constant")
    t.add_argument("--gradient_checkpointing", action="store_true", help="trade compute for activation memory")
    # Olive flags without meaning here: accepted so Olive command lines run unchanged.
    for flag in ("--use_ort_genai", "--clean"):
        p.add_argument(flag, action="store_true", help=S)
    for flag in ("--precision", "--log_level", "--tempdir"):
        p.add_argument(flag, help=S)


IGNORED = ("use_ort_genai", "clean", "precision", "log_level", "tempdir", "no_progress", "config", "_module", "command")


def finetune_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of `finetune` for the flags given on the command line (and `config`, `progress`)."""
    given = vars(args)
    kwargs = {k: v for k, v in given.items() if k not in IGNORED}
    return {"config": given.get("config"), "progress": not given.get("no_progress", False), **kwargs}


def main(args: argparse.Namespace) -> None:
    from ortlora.finetune import finetune

    given = vars(args)
    result = finetune(**finetune_kwargs(args))
    m = result.metrics
    summary = f"adapter: {result.output_path}  steps: {m['global_step']}  train loss: {m['train_loss']:.4f}"
    if "eval_loss" in m:
        summary += f"  eval loss: {m['eval_loss_initial']:.4f} -> {m['eval_loss']:.4f}"
    print(summary)
    if given.get("use_ort_genai"):
        print(f"ONNX model: ortlora export -m {result.metrics.get('base_model', 'MODEL')} --adapter_path "
              f"{result.output_path} -o ONNX_DIR; adapter file: ortlora convert-adapters", file=sys.stderr)
