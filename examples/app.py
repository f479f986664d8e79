"""The onnxruntime-genai LoRA tutorial's app on ortlora: the answer of the base model, or of each adapter in turn.

    python examples/app.py -m out -a a1.onnx_adapter a2.onnx_adapter -t "<|user|>{input}<|end|><|assistant|>" -p "Hi"
"""

import argparse
from pathlib import Path

import ortlora

parser = argparse.ArgumentParser()
parser.add_argument("-m", "--model", required=True, help="Path to the exported model folder")
parser.add_argument("-a", "--adapters", nargs="+", default=[], help="Adapters in .onnx_adapter format")
parser.add_argument("-t", "--template", default="{input}", help="Prompt template with {system} and {input}")
parser.add_argument("-s", "--system", default="", help="The system prompt to pass to the model")
parser.add_argument("-p", "--prompt", required=True, help="The user prompt to pass to the model")
parser.add_argument("--max-new-tokens", type=int, default=256)
args = parser.parse_args()

model = ortlora.Model(args.model)
for path in args.adapters:
    model.adapters.load(path, name=Path(path).stem)

prompt = args.template.replace("{system}", args.system).replace("{input}", args.prompt)

for adapter in [Path(p).stem for p in args.adapters] or [None]:
    print(f"[{adapter or 'Base'}]: ", end="", flush=True)
    for chunk in model.stream(prompt, adapter=adapter, max_new_tokens=args.max_new_tokens):
        print(chunk.text, end="", flush=True)
    print()
