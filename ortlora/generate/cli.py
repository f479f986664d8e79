"""`ortlora generate`: the onnxruntime-genai LoRA tutorial's app as a command.

    ortlora generate -m out -a a1.onnx_adapter a2.onnx_adapter -t "<|user|>{input}<|end|><|assistant|>" -p "Hi"
"""

from __future__ import annotations

import argparse

from ortlora.argtypes import non_negative_float, non_negative_int, positive_int, probability


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", required=True, help="exported model folder")
    p.add_argument("-a", "--adapters", nargs="+", default=[], metavar="FILE",
                   help=".onnx_adapter files; the output of each is printed in turn")
    p.add_argument("-t", "--template", default=None,
                   help="prompt template with {system} and {input} (default: the model's chat template, if any)")
    p.add_argument("-s", "--system", default=None, help="system prompt")
    p.add_argument("-p", "--prompt", default=None, help="user prompt (required unless --chat)")
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="above 0 samples; 0 (default) is greedy")
    p.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling: in (0, 1]")
    p.add_argument("--top-k", type=non_negative_int, default=0, help="0 (default): no top-k cut")
    p.add_argument("--seed", type=non_negative_int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="generate --max-new-tokens tokens (benchmarks)")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn session")
    p.add_argument("--threads", type=positive_int, default=None, help="default: genai_config.json's, else every core")
    p.add_argument("--provider", default=None,
                   help="run on this execution provider (cpu, cuda, dml, ...) instead of the one genai_config.json "
                        "names; --provider cpu runs a GPU-exported folder on the CPU")


def main(args: argparse.Namespace) -> None:
    from ortlora.generate import generate

    generate(args.model, adapters=args.adapters, template=args.template, system=args.system, prompt=args.prompt,
             max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
             seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos, chat=args.chat, threads=args.threads,
             provider=args.provider)
