"""`ortlora generate-adapter`: a model folder with LoRA inputs plus one `.onnx_adapter` per PEFT adapter.

Olive 0.13's `generate-adapter` flags are accepted (docs/olive.md); `-a` (repeatable) is ortlora's addition, since an
ortlora graph holds no adapter weights to extract.

    ortlora generate-adapter -m HF_DIR -a adapters/a1 -a adapters/a2 -o out      # export + convert
    ortlora capture-onnx-graph -m HF_DIR -a adapters/a1 -o onnx && ortlora generate-adapter -m onnx -o out
"""

from __future__ import annotations

import argparse

from ortlora import olive


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model_name_or_path", "--model", required=True,
                   help="Hugging Face model folder, or an exported ortlora folder (e.g. from capture-onnx-graph)")
    p.add_argument("-o", "--output_path", "--output", default="optimized-model",
                   help="output folder (default, as Olive's: %(default)s)")
    p.add_argument("-a", "--adapter_path", "--adapter", action="append", default=[],
                   help="PEFT adapter folder -> OUT/adapters/<name>.onnx_adapter (repeatable)")
    p.add_argument("--adapter_type", default="lora", choices=["lora", "dora", "loha"], help="lora (only)")
    p.add_argument("--adapter_format", default="onnx_adapter", choices=["pt", "numpy", "safetensors", "onnx_adapter"],
                   help="onnx_adapter (only)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int4"],
                   help="for a Hugging Face folder: the exported precision")
    p.add_argument("--no-progress", action="store_true")
    olive.add_common(p)


def main(args: argparse.Namespace) -> None:
    from ortlora.export import generate_adapter

    if args.dry_run:
        print("dry run: arguments accepted; nothing written")
        return
    from pathlib import Path

    exported = (Path(args.model_name_or_path) / "genai_config.json").is_file()
    kwargs = {} if exported else {"precision": args.precision, "progress": not args.no_progress}
    out = generate_adapter(args.model_name_or_path, args.output_path, adapter_path=args.adapter_path,
                           adapter_type=args.adapter_type, adapter_format=args.adapter_format, **kwargs)
    print(f"wrote {out}")
