"""Every flag of Olive's parsers for the commands ortlora mirrors is accepted by ortlora's parser, with every value
Olive's parser allows, so a future refusal (`unrecognized arguments`, `invalid choice`) is caught here.

The list is taken from Olive 0.13.0's source (tag v0.13.0, olive/cli/{finetune,auto_opt,capture_onnx,quantize,
convert_adapters,generate_adapter}.py and base.py): each command's parser was built with Olive's own
`register_subcommand` and its actions dumped (option strings, a value of the right type, the choices).
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from ortlora.cli import ALIASES, COMMANDS, WORK, build_parser

OLIVE_VERSION = "0.13.0"
PROVIDERS = ('CPUExecutionProvider', 'CUDAExecutionProvider', 'DmlExecutionProvider', 'JsExecutionProvider',
             'MIGraphXExecutionProvider', 'NvTensorRTRTXExecutionProvider', 'OpenVINOExecutionProvider',
             'QNNExecutionProvider', 'ROCMExecutionProvider', 'TensorrtExecutionProvider', 'VitisAIExecutionProvider',
             'WebGpuExecutionProvider')
PRECISIONS = ('int4', 'int8', 'int16', 'int32', 'uint4', 'uint8', 'uint16', 'uint32', 'fp4', 'fp8', 'fp16', 'fp32',
              'nf4', 'bf16')
# command -> [(option strings, a value (None: a switch), Olive's choices)]
OLIVE_FLAGS: dict[str, list[tuple[tuple[str, ...], str | None, tuple[str, ...]]]] = {
    'finetune': [
        (('-m', '--model_name_or_path'), 'x', ()),
        (('-t', '--task'), 'x', ()),
        (('--trust_remote_code',), None, ()),
        (('--test',), None, ()),
        (('-o', '--output_path'), 'x', ()),
        (('--method',), 'lora', ('lora', 'qlora')),
        (('--lora_r',), '1', ()),
        (('--lora_alpha',), '1', ()),
        (('--target_modules',), 'x', ()),
        (('--torch_dtype',), 'bfloat16', ('bfloat16', 'float16', 'float32')),
        (('-d', '--data_name'), 'x', ()),
        (('--train_subset',), 'x', ()),
        (('--train_split',), 'x', ()),
        (('--eval_subset',), 'x', ()),
        (('--eval_split',), 'x', ()),
        (('--data_files',), 'x', ()),
        (('--text_field',), 'x', ()),
        (('--text_template',), 'x', ()),
        (('--use_chat_template',), None, ()),
        (('--max_seq_len',), '1', ()),
        (('--add_special_tokens',), 'False', ()),
        (('--max_samples',), '1', ()),
        (('--batch_size',), '1', ()),
        (('--input_cols',), 'x', ()),
        (('--account_name',), 'x', ()),
        (('--container_name',), 'x', ()),
        (('--log_level',), '1', ()),
        (('--save_config_file',), None, ()),
        (('--dry_run',), None, ()),
        (('--disable_telemetry',), None, ()),
    ],
    'auto-opt': [
        (('-m', '--model_name_or_path'), 'x', ()),
        (('-t', '--task'), 'x', ()),
        (('--trust_remote_code',), None, ()),
        (('--test',), None, ()),
        (('-a', '--adapter_path'), 'x', ()),
        (('--model_script',), 'x', ()),
        (('--script_dir',), 'x', ()),
        (('-o', '--output_path'), 'x', ()),
        (('--device',), 'cpu', ('gpu', 'cpu', 'npu')),
        (('--provider',), 'CPUExecutionProvider', PROVIDERS),
        (('--memory',), '1GB', ()),
        (('-d', '--data_name'), 'x', ()),
        (('--split',), 'x', ()),
        (('--subset',), 'x', ()),
        (('--input_cols',), 'x', ()),
        (('--batch_size',), '1', ()),
        (('--precision',), 'fp32', PRECISIONS),
        (('--use_dynamo_exporter',), None, ()),
        (('--use_model_builder',), None, ()),
        (('--use_qdq_encoding',), None, ()),
        (('--dynamic-to-fixed-shape-dim-param',), 'x', ()),
        (('--dynamic-to-fixed-shape-dim-value',), '1', ()),
        (('--num-splits',), '1', ()),
        (('--cost-model',), 'x', ()),
        (('--mixed-precision-overrides-config',), 'x', ()),
        (('--use_ort_genai',), None, ()),
        (('--account_name',), 'x', ()),
        (('--container_name',), 'x', ()),
        (('--log_level',), '1', ()),
        (('--save_config_file',), None, ()),
        (('--dry_run',), None, ()),
        (('--disable_telemetry',), None, ()),
    ],
    'capture-onnx-graph': [
        (('-m', '--model_name_or_path'), 'x', ()),
        (('-t', '--task'), 'x', ()),
        (('--trust_remote_code',), None, ()),
        (('--test',), None, ()),
        (('-a', '--adapter_path'), 'x', ()),
        (('--model_variant',), 'auto', ('auto', 'sd', 'sdxl', 'sd3', 'flux', 'sana')),
        (('--model_script',), 'x', ()),
        (('--script_dir',), 'x', ()),
        (('-o', '--output_path'), 'x', ()),
        (('--conversion_device',), 'cpu', ('cpu', 'gpu')),
        (('--use_dynamo_exporter',), None, ()),
        (('--use_model_builder',), None, ()),
        (('--use_mobius_builder',), None, ()),
        (('--fixed_param_dict',), 'batch_size=1', ()),
        (('--past_key_value_name',), 'x', ()),
        (('--torch_dtype',), 'x', ()),
        (('--target_opset',), '1', ()),
        (('--precision',), 'fp16', ('fp16', 'fp32', 'int4', 'bf16')),
        (('--int4_block_size',), '16', ('16', '32', '64', '128', '256')),
        (('--int4_accuracy_level',), '4', ()),
        (('--exclude_embeds',), 'False', ()),
        (('--exclude_lm_head',), 'False', ()),
        (('--enable_cuda_graph',), 'False', ()),
        (('--extra_mb_options',), 'x', ()),
        (('--use_ort_genai',), None, ()),
        (('--log_level',), '1', ()),
        (('--save_config_file',), None, ()),
        (('--dry_run',), None, ()),
        (('--account_name',), 'x', ()),
        (('--container_name',), 'x', ()),
        (('--disable_telemetry',), None, ()),
    ],
    'quantize': [
        (('-m', '--model_name_or_path'), 'x', ()),
        (('-t', '--task'), 'x', ()),
        (('--trust_remote_code',), None, ()),
        (('--test',), None, ()),
        (('-a', '--adapter_path'), 'x', ()),
        (('--model_script',), 'x', ()),
        (('--script_dir',), 'x', ()),
        (('-o', '--output_path'), 'x', ()),
        (('--algorithm',), 'rtn',
         ('awq', 'gptq', 'hqq', 'kquant', 'rtn', 'spinquant', 'quarot', 'lpbq', 'seqmse', 'adaround')),
        (('--precision',), 'int8', PRECISIONS),
        (('--act_precision',), 'int8', PRECISIONS),
        (('--implementation',), 'x', ()),
        (('--use_qdq_encoding',), None, ()),
        (('-d', '--data_name'), 'x', ()),
        (('--subset',), 'x', ()),
        (('--split',), 'x', ()),
        (('--data_files',), 'x', ()),
        (('--text_field',), 'x', ()),
        (('--text_template',), 'x', ()),
        (('--use_chat_template',), None, ()),
        (('--max_seq_len',), '1', ()),
        (('--add_special_tokens',), 'False', ()),
        (('--max_samples',), '1', ()),
        (('--batch_size',), '1', ()),
        (('--input_cols',), 'x', ()),
        (('--account_name',), 'x', ()),
        (('--container_name',), 'x', ()),
        (('--log_level',), '1', ()),
        (('--save_config_file',), None, ()),
        (('--dry_run',), None, ()),
        (('--disable_telemetry',), None, ()),
    ],
    'convert-adapters': [
        (('-a', '--adapter_path'), 'x', ()),
        (('--adapter_format',), 'onnx_adapter', ('pt', 'numpy', 'safetensors', 'onnx_adapter')),
        (('-o', '--output_path'), 'x', ()),
        (('--dtype',), 'float32', ('float32', 'float16')),
        (('--quantize_int4',), None, ()),
        (('--int4_block_size',), '32', ('16', '32', '64', '128', '256')),
        (('--int4_quantization_mode',), 'symmetric', ('symmetric', 'asymmetric')),
        (('--log_level',), '1', ()),
        (('--disable_telemetry',), None, ()),
    ],
    'generate-adapter': [
        (('-m', '--model_name_or_path'), 'x', ()),
        (('-o', '--output_path'), 'x', ()),
        (('--adapter_type',), 'lora', ('lora', 'dora', 'loha')),
        (('--adapter_format',), 'onnx_adapter', ('pt', 'numpy', 'safetensors', 'onnx_adapter')),
        (('--log_level',), '1', ()),
        (('--save_config_file',), None, ()),
        (('--dry_run',), None, ()),
        (('--account_name',), 'x', ()),
        (('--container_name',), 'x', ()),
        (('--disable_telemetry',), None, ()),
    ],
}
# What each command needs besides the flag under test (Olive makes these required, or ortlora does).
REQUIRED = {"finetune": [], "auto-opt": ["-m", "M"], "capture-onnx-graph": ["-m", "M"], "quantize": ["-m", "M"],
            "convert-adapters": ["-a", "A", "-o", "O"], "generate-adapter": ["-m", "M"]}
# The Hugging Face TrainingArguments that `olive finetune` passes through (the examples).
TRAINING_ARGS = ["--bf16", "--fp16", "--optim", "adamw_torch", "--report_to", "none", "--save_strategy", "steps",
                 "--eval_strategy", "steps", "--group_by_length", "--lr_scheduler_type", "cosine_with_restarts",
                 "--num_train_epochs", "1", "--warmup_steps", "2", "--dataloader_num_workers", "0"]


def _cases():
    for command, flags in OLIVE_FLAGS.items():
        for options, value, choices in flags:
            for option in options:
                for v in choices or [value]:
                    yield pytest.param(command, option, v, id=f"{command} {option} {v or ''}".strip())


def _parse(command: str, argv: list[str]):
    return build_parser(ALIASES.get(command, command)).parse_args([command, *argv])


@pytest.mark.parametrize("command,option,value", list(_cases()))
def test_olive_flag_is_accepted(command, option, value, capsys):
    argv = [a for a in REQUIRED[command]]
    if option in argv:  # the flag under test is a required one: give it once, with its value
        i = argv.index(option)
        del argv[i:i + 2]
    args = _parse(command, [*argv, option, *([] if value is None else [value])])
    assert args is not None
    assert "unrecognized" not in capsys.readouterr().err


def test_every_olive_command_exists():
    assert set(OLIVE_FLAGS) <= set(COMMANDS) | set(ALIASES)
    assert sum(len(v) for v in OLIVE_FLAGS.values()) == 30 + 32 + 31 + 31 + 9 + 10  # Olive 0.13's counts


def test_no_effect_flags_warn_once(capsys):
    _parse("auto-opt", ["-m", "M", "--use_qdq_encoding", "--disable_telemetry", "--account_name", "a"])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all("has no effect" in line for line in err), err


def test_training_arguments_pass_through(capsys):
    """Olive's finetune hands unknown flags to transformers' TrainingArguments parser; so does ortlora's, applying
    those its loop has."""
    from ortlora.finetune.cli import finetune_kwargs

    parser = build_parser("finetune")
    args, extra = parser.parse_known_args(["finetune", "-m", "M", "-d", "D", *TRAINING_ARGS])
    args._extra = extra
    kw = finetune_kwargs(args)
    assert (kw["optim"], kw["save_strategy"], kw["eval_strategy"], kw["lr_scheduler_type"]) == (
        "adamw_torch", "steps", "steps", "cosine_with_restarts")
    assert kw["torch_dtype"] == "bfloat16" and kw["num_train_epochs"] == 1 and kw["warmup_steps"] == 2
    err = capsys.readouterr().err
    assert "--group_by_length has no effect" in err and "--dataloader_num_workers has no effect" in err


def test_every_command_has_one_kind_of_place():
    """Each CLI module holds configure_parser and main only; its work function is exported by the package."""
    for command, (module, _) in COMMANDS.items():
        cli = importlib.import_module(module)
        public = {n for n, v in vars(cli).items() if callable(v) and getattr(v, "__module__", "") == module
                  and not n.startswith("_")}
        assert {"configure_parser", "main"} <= public, module
        package, function = WORK[command].split(":")
        assert callable(getattr(importlib.import_module(package), function)), WORK[command]
        assert module.startswith(package + ".") and module.rsplit(".", 1)[1].endswith("cli"), module


def test_cli_exits_cleanly_on_olive_only_errors(tmp_path):
    """A flag Olive has but ortlora cannot honour is parsed, then refused with one line (exit 1, no traceback)."""
    code = "import sys; from ortlora.cli import main; sys.exit(main(sys.argv[1:]))"
    env_path = str(Path(__file__).parent.parent)
    for argv, message in (
        (["quantize", "-m", str(tmp_path), "--algorithm", "awq"], "no maintained AWQ implementation"),
        (["auto-opt", "-m", str(tmp_path), "--precision", "nf4"], "fp32, fp16, int4 or int8"),
        (["convert-adapters", "-a", str(tmp_path), "-o", "x", "--quantize_int4"], "--quantize_int4 is not supported"),
        (["generate-adapter", "-m", str(tmp_path), "--adapter_type", "loha"], "LoRA and DoRA adapters only"),
        (["capture-onnx-graph", "-m", str(tmp_path), "--exclude_lm_head", "true"], "keeps both"),
    ):
        r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                           env={"PYTHONPATH": env_path, "PATH": ""})
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, (argv, r.stderr)
