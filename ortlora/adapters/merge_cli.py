"""`ortlora merge-adapters`: the weighted combination of adapters as one `.onnx_adapter` (exact, rank = sum of
ranks)."""

from __future__ import annotations

import argparse

from ortlora.argtypes import finite_float


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapters", nargs="+", help="adapters to combine: .onnx_adapter files or PEFT adapter folders")
    p.add_argument("-w", "--weights", type=finite_float, nargs="+", default=None,
                   help="one weight per adapter (default 1 each): the result is sum_i w_i * delta_i")
    p.add_argument("-o", "--output_path", "--output", required=True, help="the .onnx_adapter file to write")
    p.add_argument("-m", "--model", default=None,
                   help="exported model folder: check the result fits it (and compute PEFT DoRA factors)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="parameter dtype")


def main(args: argparse.Namespace) -> None:
    from ortlora.adapters import merge_adapters

    path = merge_adapters(args.adapters, args.output_path, weights=args.weights, model=args.model, dtype=args.dtype)
    print(f"wrote {path}")
