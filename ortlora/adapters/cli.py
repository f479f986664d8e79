"""`ortlora convert-adapters`: PEFT adapter folder(s) -> `.onnx_adapter`; accepts Olive's `convert-adapters` flags."""

from __future__ import annotations

import argparse


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
    p.add_argument("--adapter_format", default="onnx_adapter", choices=["onnx_adapter"], help=argparse.SUPPRESS)
    p.add_argument("--log_level", default=None, help=argparse.SUPPRESS)
    p.add_argument("--quantize_int4", action="store_true", help=argparse.SUPPRESS)  # Olive's; refused in main


def main(args: argparse.Namespace) -> None:
    from ortlora.adapters.convert import convert_adapters
    from ortlora.errors import OrtloraError

    if args.quantize_int4:
        raise OrtloraError("--quantize_int4 is not supported: LoRA inputs of ortlora models are float; convert "
                           "without it (an adapter is small next to the model, so int4 saves little)")
    written = convert_adapters(args.adapter_path, args.output_path, dtype=args.dtype, model=args.model,
                               adapter_version=args.adapter_version, model_version=args.model_version)
    for path in written:
        print(f"wrote {path}")
