"""`ortlora inspect PATH`: what an exported model folder, an `.onnx_adapter` file or a PEFT adapter folder holds."""

from __future__ import annotations

import argparse


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="exported model folder (or model.onnx), .onnx_adapter file, or PEFT adapter folder")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def main(args: argparse.Namespace) -> None:
    from ortlora.inspect import inspect

    print(inspect(args.path, as_json=args.json))
