"""`ortlora export` (alias `auto-opt`): every flag of Olive 0.13's `auto-opt` is accepted (docs/olive.md)."""

from __future__ import annotations

import argparse

from ortlora import olive
from ortlora.argtypes import positive_int

OLIVE_PROVIDERS = ["CPUExecutionProvider", "CUDAExecutionProvider", "DmlExecutionProvider", "JsExecutionProvider",
                   "MIGraphXExecutionProvider", "NvTensorRTRTXExecutionProvider", "OpenVINOExecutionProvider",
                   "QNNExecutionProvider", "ROCMExecutionProvider", "TensorrtExecutionProvider",
                   "VitisAIExecutionProvider", "WebGpuExecutionProvider"]
OLIVE_PRECISIONS = ["int4", "int8", "int16", "int32", "uint4", "uint8", "uint16", "uint32", "fp4", "fp8", "fp16",
                    "fp32", "nf4", "bf16"]
NPU = "it configures Olive's NPU/QDQ passes, which ortlora does not run"
EVAL = "Olive's auto-opt evaluates on this data; ortlora's export does not (ortlora quantize -d reports accuracy)"


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model_name_or_path", "--model", required=True, help="Hugging Face model folder")
    p.add_argument("-o", "--output_path", "--output", default="auto-opt-output",
                   help="output folder (default, as Olive's: %(default)s)")
    p.add_argument("-a", "--adapter_path", "--adapter", action="append", default=[],
                   help="PEFT adapter folder whose target modules become LoRA inputs (repeatable; union of all)")
    p.add_argument("--lora-targets", "--lora_targets", default=None,
                   help="comma-separated module names to give LoRA inputs (q_proj,v_proj,... or all-linear)")
    p.add_argument("--dora", action="store_true",
                   help="give the LoRA modules DoRA inputs (<module>.dora_scale) even without a DoRA --adapter_path")
    p.add_argument("--precision", default="fp32", choices=OLIVE_PRECISIONS,
                   help="fp32 (default), fp16, int4 (weights), or int8 (weights and activations: the CPU's int8 "
                        "units)")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu", "npu"])
    p.add_argument("--provider", default=None, choices=OLIVE_PROVIDERS + ["cpu", "cuda", "dml", "webgpu"],
                   help="execution provider written to genai_config.json (default: the --device's)")
    p.add_argument("--context-length", type=positive_int, default=None,
                   help="maximum total tokens (default: the model's)")
    p.add_argument("--block-size", "--block_size", type=int, default=32, help="int4 quantization block size")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="intra_op_num_threads written to genai_config.json (default: this machine's cores)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--trust_remote_code", action="store_true", help="accepted; the export reads no model code")
    # Olive flags that ortlora's exporter makes moot (it always writes onnxruntime-genai's folder with LoRA inputs)
    p.add_argument("--use_ort_genai", "--use_model_builder", action="store_true", help=argparse.SUPPRESS)
    olive.add_input_model(p)
    olive.no_effect(p, "--use_dynamo_exporter", nargs=0, reason="ortlora builds the graph from the weights; no "
                    "torch exporter runs")
    olive.no_effect(p, "--memory", reason="it limits accelerator memory in Olive's search; ortlora runs no search")
    olive.no_effect(p, "-d", "--data_name", reason=EVAL)
    olive.no_effect(p, "--split", reason=EVAL)
    olive.no_effect(p, "--subset", reason=EVAL)
    olive.no_effect(p, "--input_cols", nargs="*", reason=EVAL)
    olive.no_effect(p, "--batch_size", type=int, reason=EVAL)
    olive.no_effect(p, "--use_qdq_encoding", nargs=0, reason=NPU)
    olive.no_effect(p, "--dynamic-to-fixed-shape-dim-param", nargs="*", reason=NPU)
    olive.no_effect(p, "--dynamic-to-fixed-shape-dim-value", nargs="*", type=int, reason=NPU)
    olive.no_effect(p, "--num-splits", type=int, reason="ortlora writes one model file (no model splitting)")
    olive.no_effect(p, "--cost-model", reason="ortlora writes one model file (no model splitting)")
    olive.no_effect(p, "--mixed-precision-overrides-config", nargs="*",
                    reason="ortlora quantizes every linear alike (ortlora quantize --lm_head keep for the LM head)")
    olive.add_common(p)


def main(args: argparse.Namespace) -> None:
    from ortlora.errors import OrtloraError

    targets = args.lora_targets.split(",") if args.lora_targets else None
    if args.device == "npu":
        raise OrtloraError("--device npu: ortlora exports for the CPU and GPUs only (Olive's NPU flow uses QDQ "
                           "models and its own passes)")
    if args.precision not in ("fp32", "fp16", "int4", "int8"):
        raise OrtloraError(f"--precision {args.precision}: ortlora writes fp32, fp16, int4 or int8 models")
    if args.dry_run:
        print("dry run: arguments accepted; nothing written")
        return
    from ortlora.export import export

    out = export(
        args.model_name_or_path, args.output_path, adapter_path=args.adapter_path, lora_targets=targets,
        precision=args.precision, device=args.device, provider=args.provider,
        context_length=args.context_length, block_size=args.block_size, threads=args.threads,
        progress=not args.no_progress, dora=args.dora,
    )
    print(f"exported {out}")
