"""`ortlora quantize`: int4 (weight-only) or int8 (weights and activations) quantization that keeps LoRA inputs
float, with an accuracy report.

Every flag of Olive 0.13's `quantize` is accepted (docs/olive.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ortlora import olive

OLIVE_ALGORITHMS = ["awq", "gptq", "hqq", "kquant", "rtn", "spinquant", "quarot", "lpbq", "seqmse", "adaround"]
OLIVE_PRECISIONS = ["int4", "int8", "int16", "int32", "uint4", "uint8", "uint16", "uint32", "fp4", "fp8", "fp16",
                    "fp32", "nf4", "bf16"]
WINDOWS = "ortlora reads one local text/JSON(L) file and takes token windows from its start (--max_samples of them)"


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model_name_or_path", "--model", required=True,
                   help="an exported ortlora folder (fp32/fp16) or a Hugging Face model folder")
    p.add_argument("-o", "--output_path", "--output", default="quantized-model",
                   help="output folder (default, as Olive's: %(default)s)")
    p.add_argument("--precision", default=None, choices=OLIVE_PRECISIONS,
                   help="int4 (default; Olive's default is int8, a note says so): weights, MatMulNBits; or int8: "
                        "weights per output channel and activations per row, on the CPU's int8 units")
    p.add_argument("--block_size", "--block-size", type=int, default=32,
                   help="int4: weights per scale along the input dimension, a power of two >= 16 (default 32); "
                        "int8 has one scale per output channel")
    p.add_argument("--algorithm", default="rtn", choices=OLIVE_ALGORITHMS,
                   help="rtn (round to nearest, default), hqq (no data; needs torch) or gptq (needs -d); int8: rtn")
    p.add_argument("--symmetric", action="store_true", help="no zero points (rtn, gptq)")
    p.add_argument("--lm_head", "--lm-head", choices=["quantize", "keep"], default="quantize",
                   help="quantize the LM head like the other linears (default) or keep it float")
    p.add_argument("--quantize_embeddings", "--quantize-embeddings", action="store_true",
                   help="also quantize the token embeddings (int4 GatherBlockQuantized)")
    p.add_argument("-d", "--data_name", "--data", dest="data", default=None,
                   help="calibration/evaluation text: .txt, or .json/.jsonl records (default: a built-in text)")
    p.add_argument("--text_template", "--text-template", default=None,
                   help="format of one record, e.g. '### Q: {question}\\n### A: {answer}'")
    p.add_argument("--text_field", "--text-field", default="text", help="record field to use without a template")
    p.add_argument("-a", "--adapter_path", "--adapter", action="append", default=[],
                   help="PEFT folder or .onnx_adapter to report accuracy with (repeatable); for a Hugging Face "
                        "input its target modules also become LoRA inputs")
    p.add_argument("--lora-targets", "--lora_targets", default=None,
                   help="Hugging Face input only: comma-separated modules that get LoRA inputs (or all-linear)")
    p.add_argument("--seq_len", "--seq-len", "--max_seq_len", type=int, default=256,
                   help="tokens per text window (default 256)")
    p.add_argument("--calib_samples", "--calib-samples", "--max_samples", type=int, default=32,
                   help="gptq calibration windows (default 32)")
    p.add_argument("--eval_samples", "--eval-samples", type=int, default=8,
                   help="report windows (default 8; 0: sizes only), taken after the calibration windows")
    p.add_argument("--accuracy_level", "--accuracy-level", type=int, default=4, choices=[0, 1, 2, 3, 4],
                   help="MatMulNBits accuracy_level (4: int8 activations on CPU, as export writes)")
    p.add_argument("--data_files", default=None,
                   help="the data file when -d names a datasets builder (Olive: -d json --data_files a.jsonl)")
    p.add_argument("--trust_remote_code", action="store_true", help="accepted; quantize reads no model code")
    p.add_argument("--no-progress", action="store_true")
    olive.add_input_model(p)
    olive.no_effect(p, "--act_precision", reason="int4 keeps activations float; int8 quantizes them to int8 per row")
    olive.no_effect(p, "--implementation", reason="ortlora has one implementation of each algorithm")
    olive.no_effect(p, "--use_qdq_encoding", nargs=0, reason="MatMulNBits is written, not QDQ (an NPU format)")
    olive.no_effect(p, "--subset", reason=WINDOWS)
    olive.no_effect(p, "--split", reason=WINDOWS)
    olive.no_effect(p, "--use_chat_template", nargs=0, reason="calibration and the report use plain text windows")
    olive.no_effect(p, "--add_special_tokens", reason="token windows are cut from one running text")
    olive.no_effect(p, "--batch_size", type=int, reason="windows are run one at a time")
    olive.no_effect(p, "--input_cols", nargs="+", reason="--text_field / --text_template choose the text")
    olive.add_common(p)


def main(args: argparse.Namespace) -> None:
    from ortlora.errors import OrtloraError
    from ortlora.quantize import REPORT, quantize

    if args.algorithm == "awq":
        raise OrtloraError("--algorithm awq: no maintained AWQ implementation installs without CUDA (AutoAWQ, which "
                           "Olive's awq runs, is archived and builds CUDA kernels); use gptq (calibrated with -d), "
                           "hqq or rtn")
    if args.algorithm not in ("rtn", "hqq", "gptq"):
        raise OrtloraError(f"--algorithm {args.algorithm}: ortlora quantizes with rtn, hqq or gptq")
    if args.precision is None:
        args.precision = "int4"
        olive.note("quantize", "--precision int4 (Olive's quantize defaults to int8; pass --precision int8 for it)")
    if args.precision not in ("int4", "int8"):
        raise OrtloraError(f"--precision {args.precision}: ortlora writes int4 or int8 models")
    if args.data_files:
        files = args.data_files.split(",")
        if len(files) != 1:
            raise OrtloraError("--data_files: quantize reads one file")
        args.data = files[0]
    if args.dry_run:
        print("dry run: arguments accepted; nothing written")
        return
    out = quantize(
        args.model_name_or_path, args.output_path, precision=args.precision, block_size=args.block_size,
        algorithm=args.algorithm, symmetric=args.symmetric, lm_head=args.lm_head == "quantize",
        embeddings=args.quantize_embeddings, data=args.data, text_template=args.text_template,
        text_field=args.text_field, adapter_path=args.adapter_path,
        lora_targets=args.lora_targets.split(",") if args.lora_targets else None, seq_len=args.seq_len,
        calib_samples=args.calib_samples, eval_samples=args.eval_samples, accuracy_level=args.accuracy_level,
        progress=not args.no_progress,
    )
    print(format_report(json.loads((Path(out) / REPORT).read_text())))
    print(f"quantized {out} (report: {Path(out) / REPORT})")


def format_report(r: dict) -> str:
    size = r["size_bytes"]
    grid = (f"weights {r['weights']}, activations {r['activations']}" if r.get("weights") else
            f"{r['algorithm']} block {r['block_size']} {'sym' if r['symmetric'] else 'asym'}")
    lines = [
        f"{r['precision']} {grid}, lm_head {r['lm_head']}, embeddings {r['embeddings']}: "
        f"{len(r['quantized_weights'])} weights",
        f"size {size['before'] / 2**20:.2f} MiB -> {size['after'] / 2**20:.2f} MiB ({size['ratio']:.2f}x smaller)",
    ]
    if r["results"]:
        e = r["eval"]
        lines.append(f"on {e['tokens']} tokens ({e['windows']} windows of <= {e['seq_len']}) of {e['data']}:")
        lines.append(f"  {'adapter':<28} {'ppl float':>10} {'ppl quant':>10} {'top-1 agree':>12} {'mean KL':>9}")
        for x in r["results"]:
            name = Path(x["adapter"]).name if x["adapter"] else "(none)"
            lines.append(f"  {name[:28]:<28} {x['reference']['perplexity']:>10.3f} "
                         f"{x['quantized']['perplexity']:>10.3f} {100 * x['top1_agreement']:>11.1f}% "
                         f"{x['mean_kl']:>9.4f}")
    return "\n".join(lines)
