"""`ortlora export` (alias `auto-opt`): accepts Olive's `auto-opt` flags."""

from __future__ import annotations

import argparse


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model_name_or_path", "--model", required=True, help="Hugging Face model folder")
    p.add_argument("-o", "--output_path", "--output", required=True, help="output folder")
    p.add_argument("--adapter_path", "--adapter", action="append", default=[],
                   help="PEFT adapter folder whose target modules become LoRA inputs (repeatable; union of all)")
    p.add_argument("--lora-targets", "--lora_targets", default=None,
                   help="comma-separated module names to give LoRA inputs (q_proj,v_proj,... or all-linear)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int4"])
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--provider", default=None, help="execution provider, e.g. CPUExecutionProvider, CUDAExecutionProvider")
    p.add_argument("--context-length", type=int, default=None, help="maximum total tokens (default: the model's)")
    p.add_argument("--block-size", "--block_size", type=int, default=32, help="int4 quantization block size")
    p.add_argument("--threads", type=int, default=None,
                   help="intra_op_num_threads written to genai_config.json (default: this machine's cores)")
    p.add_argument("--no-progress", action="store_true")
    # Olive flags that have no meaning here: accepted so Olive command lines run unchanged.
    for flag in ("--use_ort_genai", "--use_model_builder", "--trust_remote_code", "--use_dynamo_exporter"):
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    for flag in ("--log_level", "--task", "--memory", "--output_model"):
        p.add_argument(flag, default=None, help=argparse.SUPPRESS)


def main(args: argparse.Namespace) -> None:
    from ortlora.export import export

    targets = args.lora_targets.split(",") if args.lora_targets else None
    out = export(
        args.model_name_or_path, args.output_path, adapter_path=args.adapter_path, lora_targets=targets,
        precision=args.precision, device=args.device, provider=args.provider, context_length=args.context_length,
        block_size=args.block_size, threads=args.threads, progress=not args.no_progress,
    )
    print(f"exported {out}")
