"""`ortlora finetune`: the command line of `olive finetune` (plus transformers TrainingArguments names) on local data.

    ortlora finetune --method lora -m HF_MODEL_DIR -d data.jsonl --train_split "train[:4096]" \\
        --eval_split "train[4096:4224]" --text_template "### Question: {prompt}\\n### Answer: {response}" \\
        --per_device_train_batch_size 16 --per_device_eval_batch_size 16 --max_steps 150 --logging_steps 50 -o OUT

Only flags given on the command line override a `--config` file; the rest keep the file's value or the default.
Every flag of Olive 0.13's `olive finetune` is accepted (docs/olive.md), and so is every transformers
TrainingArguments flag, as Olive passes them through to its Trainer: those the loop has are applied, the others
print that they have no effect. Data-parallel: `accelerate launch --num_processes N -m ortlora.cli finetune ...`.
"""

from __future__ import annotations

import argparse
import os
import sys

from ortlora import olive
from ortlora.finetune import SCHEDULERS
from ortlora.finetune.data import unescape

S = argparse.SUPPRESS
PASSTHROUGH = True  # flags this parser does not know arrive in args._extra: transformers TrainingArguments


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
    d.add_argument("--train_split",
                   help='split expression, e.g. "train", "train[:4096]", "train[10%%:]" (default train)')
    d.add_argument("--eval_split", help='split expression for the eval loss, e.g. "train[4096:4224]"')
    d.add_argument("--train_subset", help="dataset configuration (subset) name, for builders and hub datasets")
    d.add_argument("--eval_subset", help="configuration of the eval split (default: --train_subset)")
    d.add_argument("--use_chat_template", action="store_true",
                   help="rows are chat `messages` rendered with the tokenizer's chat template")
    d.add_argument("--max_samples", type=int, help="use the first N rows of each split (default: all; Olive: 256)")
    d.add_argument("--add_special_tokens", type=olive.parse_bool,
                   help="true/false: the tokenizer adds its special tokens (BOS) to each row (default: yes for "
                        "text rows, no for chat rows, whose template has them)")
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
    t.add_argument("--lr_scheduler_type", choices=SCHEDULERS, help="default constant (after warmup_ratio); the "
                   "others as transformers defines them")
    t.add_argument("--gradient_checkpointing", action="store_true", help="trade compute for activation memory")
    # Olive flags without meaning here: accepted so Olive command lines run unchanged.
    for flag in ("--use_ort_genai", "--clean"):
        p.add_argument(flag, action="store_true", help=S)
    for flag in ("--precision", "--tempdir"):
        p.add_argument(flag, help=S)
    olive.add_input_model(p, script=False)
    olive.no_effect(p, "--batch_size", type=int, reason="it is the batch size of Olive's data loader, which its "
                    "finetune does not use; the trainer's is --per_device_train_batch_size")
    olive.no_effect(p, "--input_cols", nargs="+", reason="Olive's text-generation preprocessing ignores it too; "
                    "--text_field / --text_template choose the text")
    olive.add_common(p)


IGNORED = ("use_ort_genai", "clean", "precision", "tempdir", "no_progress", "config", "command", "dry_run")
# Where ortlora's defaults deliberately differ from `olive finetune`'s: flag -> (ours, Olive's)
DIFFERENT_DEFAULTS = {
    "learning_rate": ("2e-4", "5e-5, transformers' default"),
    "lr_scheduler_type": ("constant after a 3% warmup", "linear, no warmup"),
    "torch_dtype": ("float32 on CPU, bfloat16 on CUDA", "bfloat16"),
    "gradient_checkpointing": ("off", "on"),
    "max_samples": ("every row, one row per sequence", "256 sequences of rows joined up to max_seq_len"),
}


def finetune_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of `finetune` for the flags given on the command line (and `config`, `progress`),
    with the TrainingArguments flags of `args._extra` applied."""
    given = vars(args)
    kwargs = {k: v for k, v in given.items() if k not in IGNORED and not k.startswith("_")}
    kwargs.update(training_arguments(getattr(args, "_extra", []), kwargs))
    return {"config": given.get("config"), "progress": not given.get("no_progress", False), **kwargs}


def training_arguments(extra: list[str], kwargs: dict) -> dict:
    """transformers TrainingArguments flags -> finetune keywords. Those the loop has are applied; the others print
    one line saying they have no effect; a flag TrainingArguments does not have either is an error."""
    if not extra:
        return {}
    from ortlora.errors import OrtloraError
    from ortlora.finetune import FinetuneArgs

    try:
        from transformers import HfArgumentParser, TrainingArguments
    except ImportError:
        raise OrtloraError(f"unrecognized arguments: {' '.join(extra)} (transformers, which defines the training "
                           "arguments, is missing: pip install ortlora[train])") from None
    extra, legacy = _take_legacy(extra)
    parser = HfArgumentParser(TrainingArguments)
    ns, unknown = parser.parse_known_args(["--output_dir", "unused", *extra])  # parsed, not validated
    for name, value in legacy.items():
        setattr(ns, name, value)
        extra = [*extra, f"--{name}"]
    if unknown:
        raise OrtloraError(f"unrecognized arguments: {' '.join(unknown)} (neither an `olive finetune` flag nor a "
                           "transformers TrainingArguments one)")
    names = {a.split("=")[0][2:].replace("-", "_") for a in extra if a.startswith("--")}
    ours = {f for f in FinetuneArgs.__dataclass_fields__}
    out: dict = {}
    for name in sorted(names):
        value = getattr(ns, name, None)
        if name in ours:
            out[name] = value
        elif name in ("bf16", "fp16") and value:
            out.setdefault("torch_dtype", "bfloat16" if name == "bf16" else "float16")
        elif name == "evaluation_strategy":
            out["eval_strategy"] = value
        elif name == "overwrite_output_dir":
            out["overwrite"] = str(value).lower() not in ("false", "0", "no")
        elif name == "resume_from_checkpoint":
            out["resume"] = value or True
        elif name == "report_to" and value in ("none", ["none"], []):
            pass
        else:
            reason = {"output_dir": "-o names the output folder",
                      "report_to": "ortlora writes trainer_state.json and loss.png, with no integrations"}.get(
                name, "ortlora's training loop does not use it")
            print(f"ortlora: warning: --{name} has no effect: {reason}", file=sys.stderr)
    for key in ("eval_strategy", "save_strategy", "lr_scheduler_type", "optim"):
        if key in out and not isinstance(out[key], str):  # transformers parses these into enums
            out[key] = getattr(out[key], "value", str(out[key]))
    if "torch_dtype" in kwargs:
        out.pop("torch_dtype", None)
    return out


# TrainingArguments fields of transformers 4.x (which Olive command lines were written against) that transformers 5
# removed; accepted with their 4.x meaning where the loop has one, else with the no-effect warning.
LEGACY = ("group_by_length", "evaluation_strategy", "overwrite_output_dir", "no_cuda", "use_mps_device",
          "per_gpu_train_batch_size", "per_gpu_eval_batch_size", "fp16_backend", "half_precision_backend",
          "fp16_opt_level", "push_to_hub_token", "push_to_hub_model_id", "push_to_hub_organization", "logging_dir",
          "save_safetensors", "tpu_num_cores", "jit_mode_eval", "use_ipex", "torchdynamo", "ray_scope",
          "include_tokens_per_second", "include_inputs_for_metrics", "use_legacy_prediction_loop", "split_batches",
          "dispatch_batches", "mp_parameters", "sharded_ddp")


def _take_legacy(extra: list[str]) -> tuple[list[str], dict]:
    """Split the 4.x-only flags (and their values) off `extra`: a bare flag is True, `--flag VALUE` keeps VALUE."""
    rest, legacy, i = [], {}, 0
    while i < len(extra):
        name, eq, value = extra[i][2:].partition("=") if extra[i].startswith("--") else ("", "", "")
        if name.replace("-", "_") in LEGACY:
            if not eq and i + 1 < len(extra) and not extra[i + 1].startswith("--"):
                value, i = extra[i + 1], i + 1
            legacy[name.replace("-", "_")] = value if (eq or value) else True
        else:
            rest.append(extra[i])
        i += 1
    return rest, legacy


def main(args: argparse.Namespace) -> None:
    from ortlora.finetune import finetune, load_config_file, make_args

    given = vars(args)
    kwargs = finetune_kwargs(args)
    from_file = load_config_file(kwargs["config"]) if kwargs.get("config") else {}
    if "output_path" not in kwargs and "output_path" not in from_file:
        kwargs["output_path"] = "finetuned-adapter"  # Olive's default
    unset = [k for k in DIFFERENT_DEFAULTS if k not in kwargs and k not in from_file
             and not (k == "lr_scheduler_type" and "warmup_ratio" in kwargs)]
    if unset and os.environ.get("RANK", "0") == "0":  # once per data-parallel run
        olive.note("finetune", "defaults that differ from olive finetune's: " + "; ".join(
            f"{k} {DIFFERENT_DEFAULTS[k][0]} (Olive: {DIFFERENT_DEFAULTS[k][1]})" for k in unset))
    if given.get("dry_run"):
        run = dict(kwargs)
        run.pop("progress")
        make_args(**run)
        print("dry run: arguments accepted; nothing trained")
        return
    result = finetune(**kwargs)
    if not result.main_process:
        return
    m = result.metrics
    summary = f"adapter: {result.output_path}  steps: {m['global_step']}  train loss: {m['train_loss']:.4f}"
    if "eval_loss" in m:
        summary += f"  eval loss: {m['eval_loss_initial']:.4f} -> {m['eval_loss']:.4f}"
    print(summary)
    if given.get("use_ort_genai"):
        print(f"ONNX model: ortlora export -m {result.metrics.get('base_model', 'MODEL')} --adapter_path "
              f"{result.output_path} -o ONNX_DIR; adapter file: ortlora convert-adapters", file=sys.stderr)
