"""`ortlora capture-onnx-graph`: Olive 0.13's `capture-onnx-graph` flags, on ortlora's exporter (docs/olive.md).

With `-a PEFT_DIR` the folder also gets `adapters/<name>.onnx_adapter` (Olive captures the adapter's weights into
the graph, for `generate-adapter` to extract; ortlora's graph has LoRA inputs, so the weights go beside it).
"""

from __future__ import annotations

import argparse

from ortlora import olive
from ortlora.argtypes import positive_int

BUILDER = "ortlora builds the graph itself from the weights; no torch exporter or Model Builder runs"


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model_name_or_path", "--model", required=True, help="Hugging Face model folder")
    p.add_argument("-o", "--output_path", "--output", default="onnx-model",
                   help="output folder (default, as Olive's: %(default)s)")
    p.add_argument("-a", "--adapter_path", "--adapter", action="append", default=[],
                   help="PEFT adapter folder: LoRA inputs for its modules and adapters/<name>.onnx_adapter")
    p.add_argument("--precision", default=None, choices=["fp16", "fp32", "int4", "bf16"],
                   help="default: fp16 with --use_model_builder (Olive's default there), else fp32 (what Olive's "
                        "torch capture of a float32 checkpoint gives)")
    p.add_argument("--torch_dtype", default=None,
                   help="float32 or float16: the precision when --precision is not given")
    p.add_argument("--int4_block_size", type=int, default=None, choices=[16, 32, 64, 128, 256],
                   help="int4 block size (default 32)")
    p.add_argument("--use_model_builder", action="store_true", help="only changes the default precision to fp16")
    p.add_argument("--use_ort_genai", action="store_true", help=argparse.SUPPRESS)  # the folder is always one
    p.add_argument("--exclude_embeds", type=olive.parse_bool, default=False,
                   help="must stay false: the runtime feeds token ids")
    p.add_argument("--exclude_lm_head", type=olive.parse_bool, default=False,
                   help="must stay false: the runtime samples logits")
    p.add_argument("--trust_remote_code", action="store_true", help="accepted; the export reads no model code")
    # ortlora export's own options (capture-onnx-graph was an alias of export)
    p.add_argument("--lora-targets", "--lora_targets", default=None,
                   help="comma-separated module names to give LoRA inputs (q_proj,v_proj,... or all-linear)")
    p.add_argument("--context-length", type=positive_int, default=None,
                   help="maximum total tokens (default: the model's)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="intra_op_num_threads written to genai_config.json")
    p.add_argument("--no-progress", action="store_true")
    olive.add_input_model(p)
    olive.no_effect(p, "--model_variant", reason="it selects a diffusers pipeline; ortlora exports causal LMs")
    olive.no_effect(p, "--conversion_device", reason="the export reads the weights on the CPU without running them")
    olive.no_effect(p, "--use_dynamo_exporter", nargs=0, reason=BUILDER)
    olive.no_effect(p, "--use_mobius_builder", nargs=0, reason=BUILDER)
    olive.no_effect(p, "--fixed_param_dict", reason="the graph keeps dynamic batch and sequence dims (NPU option)")
    olive.no_effect(p, "--past_key_value_name", reason="the KV inputs use onnxruntime-genai's names")
    olive.no_effect(p, "--target_opset", type=int, reason="the graph uses a fixed opset with onnxruntime's contrib ops")
    olive.no_effect(p, "--int4_accuracy_level", reason="int4 MatMulNBits use accuracy_level 4 (int8 activations "
                    "on CPU); ortlora quantize --accuracy_level sets another")
    olive.no_effect(p, "--enable_cuda_graph", type=olive.parse_bool,
                    reason="CUDA graphs are not used by ortlora's runtime")
    olive.no_effect(p, "--extra_mb_options", reason="there is no Model Builder to pass options to")
    olive.add_common(p)


def main(args: argparse.Namespace) -> None:
    from ortlora.errors import OrtloraError
    from ortlora.export import generate_adapter

    if args.exclude_embeds or args.exclude_lm_head:
        raise OrtloraError("--exclude_embeds / --exclude_lm_head: ortlora's runtime and onnxruntime-genai feed token "
                           "ids and sample from logits, so the graph keeps both")
    precision = args.precision
    if precision is None and args.torch_dtype is not None:
        precision = {"float32": "fp32", "float16": "fp16"}.get(args.torch_dtype)
        if precision is None:
            raise OrtloraError(f"--torch_dtype {args.torch_dtype}: choose float32 or float16")
    if precision is None:
        precision = "fp16" if args.use_model_builder else "fp32"
    if precision == "bf16":
        raise OrtloraError("--precision bf16: ortlora writes fp32, fp16 or int4 graphs (bf16 weights are widened)")
    if args.dry_run:
        print("dry run: arguments accepted; nothing written")
        return
    out = generate_adapter(args.model_name_or_path, args.output_path, adapter_path=args.adapter_path,
                           precision=precision, block_size=args.int4_block_size or 32,
                           lora_targets=args.lora_targets.split(",") if args.lora_targets else None,
                           context_length=args.context_length, threads=args.threads, progress=not args.no_progress)
    print(f"exported {out} ({precision})")
