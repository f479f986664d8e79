"""`ortlora convert-adapters`: PEFT adapter folder(s) -> `.onnx_adapter`; accepts Olive's `convert-adapters` flags."""

from __future__ import annotations

import argparse

from ortlora import olive


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("-a", "--adapter_path", "--adapter", action="append", required=True,
                   help="PEFT adapter folder (repeatable; with several, --output_path is a folder and each file is "
                        "named after its adapter folder)")
    p.add_argument("-o", "--output_path", "--output", required=True,
                   help="the .onnx_adapter file to write (a folder with several --adapter_path)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16"],
                   help="parameter dtype (default: the model's LoRA input dtype with --model, else float32)")
    p.add_argument("-m", "--model", default=None,
                   help="exported model folder (or model.onnx): check that the adapter fits it before writing")
    p.add_argument("--adapter_version", type=int, default=1, help="adapter version stored in the file")
    p.add_argument("--model_version", type=int, default=1, help="model version stored in the file")
    p.add_argument("--adapter_format", default="onnx_adapter", choices=["pt", "numpy", "safetensors", "onnx_adapter"],
                   help="onnx_adapter (only; the format onnxruntime and onnxruntime-genai load)")
    # Olive's int4 adapters feed MatMulNBits LoRA nodes; ortlora's LoRA inputs are float, so they are refused in main
    p.add_argument("--quantize_int4", action="store_true", help="refused: ortlora's LoRA inputs are float")
    p.add_argument("--int4_block_size", type=int, default=32, choices=[16, 32, 64, 128, 256], help=argparse.SUPPRESS)
    p.add_argument("--int4_quantization_mode", default="symmetric", choices=["symmetric", "asymmetric"],
                   help=argparse.SUPPRESS)
    olive.add_common(p, cache=False, save_config=False, dry_run=False)


def main(args: argparse.Namespace) -> None:
    from ortlora.adapters import convert_adapters
    from ortlora.errors import OrtloraError

    if args.quantize_int4:
        raise OrtloraError("--quantize_int4 is not supported: LoRA inputs of ortlora models are float; convert "
                           "without it (an adapter is small next to the model, so int4 saves little)")
    if args.adapter_format != "onnx_adapter":
        raise OrtloraError(f"--adapter_format {args.adapter_format}: ortlora writes .onnx_adapter files only (the "
                           "format onnxruntime and onnxruntime-genai load)")
    written = convert_adapters(args.adapter_path, args.output_path, dtype=args.dtype, model=args.model,
                               adapter_version=args.adapter_version, model_version=args.model_version)
    for path in written:
        print(f"wrote {path}")
