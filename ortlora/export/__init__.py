"""`export`: a Hugging Face checkpoint -> an ONNX decoder folder whose LoRA weights are graph inputs.

    from ortlora.export import export
    export("hf_model_dir", "out_dir", adapter_path=["adapter_dir"], precision="int4")
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from ortlora import model_folder
from ortlora.checkpoint import Checkpoint
from ortlora.config import ModelArgs, eos_token_ids, load_config
from ortlora.errors import AdapterError, ModelError, OrtloraError
from ortlora.export.arch import get_arch
from ortlora.export.arch.base import Arch
from ortlora.export.decoder import DecoderBuilder
from ortlora.export.graph import GraphBuilder
from ortlora.export import int8
from ortlora.export.int4 import check_block_size
from ortlora.export.rope import default_context_length
from ortlora.fileutil import atomic_dir

PRECISIONS = ("fp32", "fp16", "int4", "int8")
_UNSUPPORTED_TARGETS = ("lm_head", "embed_tokens")


def check_checkpoint(args: ModelArgs, arch: Arch, ckpt: Checkpoint) -> None:
    """Refuse, listing every mismatch at once, a checkpoint whose tensors are missing or disagree in shape with
    config.json (e.g. num_attention_heads 8 over 4-head weights): the graph would be built from the config and
    fail at run time."""
    shapes = arch.tensor_shapes(args)
    if not args.tie_word_embeddings and "lm_head.weight" in ckpt:
        shapes["lm_head.weight"] = (args.vocab_size, args.hidden_size)
    problems = []
    for name, want in shapes.items():
        if name not in ckpt:
            problems.append(f"missing: {name} (config.json implies {list(want)})")
        elif tuple(ckpt.shape(name)) != want:
            problems.append(f"mis-shaped: {name} is {list(ckpt.shape(name))}, config.json implies {list(want)}")
    if problems:
        sizes = ", ".join(f"{k} {getattr(args, k)}" for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                               "num_key_value_heads", "head_dim", "vocab_size"))
        raise ModelError(f"{ckpt.dir}: the checkpoint does not match its config.json ({sizes}); "
                         f"{len(problems)} problem{'s' if len(problems) != 1 else ''}:\n  " + "\n  ".join(problems))


def model_linears(args: ModelArgs, arch: Arch, ckpt: Checkpoint) -> dict[str, tuple[int, int]]:
    """Every LoRA-targetable linear module of the model -> (in_features, out_features)."""
    out = {}
    for i in range(args.num_hidden_layers):
        for rel in arch.linear_modules(args):
            module = f"model.layers.{i}.{rel}"
            o, n = ckpt.shape(f"{module}.weight")
            out[module] = (n, o)
    return out


def resolve_lora_targets(linears: dict[str, tuple[int, int]], adapter_paths: Sequence[str | Path],
                         lora_targets: Sequence[str] | None) -> dict[str, tuple[int, int]]:
    """The union of the adapters' modules and the `--lora-targets` names; every misfit is reported at once."""
    return _lora_targets(linears, adapter_paths, lora_targets)[0]


def _lora_targets(linears: dict[str, tuple[int, int]], adapter_paths: Sequence[str | Path],
                  lora_targets: Sequence[str] | None) -> tuple[dict[str, tuple[int, int]], bool]:
    """`resolve_lora_targets`, and whether any adapter is DoRA (the model then takes dora_scale inputs)."""
    from ortlora.adapters.peft import read_lora

    chosen: set[str] = set()
    problems: list[str] = []
    dora = False
    for name in lora_targets or ():
        name = name.strip()
        if name in ("all-linear", "all_linear"):
            chosen.update(linears)
            continue
        if name in _UNSUPPORTED_TARGETS:
            problems.append(f"--lora-targets {name}: LoRA on {name} is not supported (the LM head and embeddings "
                            "stay frozen); drop it from the targets")
            continue
        hits = [m for m in linears if re.fullmatch(rf"(.*\.)?{re.escape(name)}", m)]
        if not hits:
            suffixes = sorted({m.rsplit(".", 1)[-1] for m in linears})
            problems.append(f"--lora-targets: no linear layer of the model is called {name} "
                            f"(choose from {', '.join(suffixes)}, or all-linear)")
        chosen.update(hits)
    for path in adapter_paths:
        try:
            adapter = read_lora(path)
        except AdapterError as exc:
            problems.append(str(exc))
            continue
        dora = dora or adapter.is_dora
        for module, m in adapter.modules.items():
            if module.rsplit(".", 1)[-1] in _UNSUPPORTED_TARGETS:
                problems.append(f"{path}: LoRA on {module} is not supported (the LM head and embeddings stay frozen)")
            elif module not in linears:
                problems.append(f"{path}: module {module} is not a linear layer of this model")
            elif (m.in_features, m.out_features) != linears[module]:
                problems.append(f"{path}: {module} has in/out {m.in_features}x{m.out_features}, the model "
                                f"{linears[module][0]}x{linears[module][1]} (an adapter for another base model?)")
            else:
                chosen.add(module)
    if problems:
        raise AdapterError("cannot export with these LoRA targets:\n  " + "\n  ".join(problems))
    return {m: linears[m] for m in sorted(chosen, key=_layer_order)}, dora


def _layer_order(module: str):
    m = re.search(r"\.(\d+)\.", module)
    return (int(m.group(1)) if m else -1, module)


def export(model: str | Path, output: str | Path, *, adapter_path: Sequence[str | Path] = (),
           lora_targets: Sequence[str] | None = None, precision: str = "fp32", device: str = "cpu",
           provider: str | None = None, context_length: int | None = None, block_size: int = 32,
           threads: int | None = None, progress: bool = True, dora: bool = False) -> Path:
    """Export `model` (a Hugging Face folder) into `output`; returns the output folder. The model takes DoRA
    factors (`<module>.dora_scale`) when `dora` or when a DoRA adapter is among `adapter_path`; otherwise its graph
    is the plain LoRA one."""
    if precision not in PRECISIONS:
        raise OrtloraError(f"precision {precision!r} is not supported; choose one of {', '.join(PRECISIONS)}")
    if precision == "int4":
        check_block_size(block_size)
    if precision == "int8" and device != "cpu":
        raise OrtloraError("precision int8 runs on the CPU's int8 units (MatMulIntegerToFloat); for a GPU export "
                           "int4 or fp16")
    for flag, value in (("--context-length", context_length), ("--threads", threads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise OrtloraError(f"{flag} must be a positive integer, got {value!r}")
    model_folder.check_output_folder(output)
    if precision == "int8":
        int8.warn_without_int8_units("export")
    model_dir = Path(model)
    if not model_dir.exists():
        raise ModelError(f"{model}: no such folder. Hub names are not downloaded by export: download the model "
                         "first (e.g. `huggingface-cli download NAME --local-dir DIR`) and pass the folder")
    args, _ = load_config(model_dir)
    arch = get_arch(args)
    ckpt = Checkpoint(model_dir)
    check_checkpoint(args, arch, ckpt)
    lora, dora_adapter = _lora_targets(model_linears(args, arch, ckpt), adapter_path, lora_targets)
    dora = bool(lora) and (dora or dora_adapter)
    context = context_length or default_context_length(args)
    eos = eos_token_ids(model_dir, args)
    io_dtype = np.float16 if precision == "fp16" or (precision == "int4" and device == "gpu") else np.float32
    bar = tqdm(total=args.num_hidden_layers, desc="export", unit="layer", disable=not progress)
    with atomic_dir(output) as tmp:
        g = GraphBuilder(tmp / model_folder.MODEL_FILE)
        try:
            DecoderBuilder(
                g, args, arch, ckpt, io_dtype=io_dtype, int4_block_size=block_size if precision == "int4" else None,
                int8_weights=precision == "int8", lora_modules=lora, context_length=context,
                on_layer=lambda i: bar.update(1), dora=dora,
            ).build()
            g.save()
        finally:
            g.close()
            bar.close()
        model_folder.write_genai_config(tmp, model_folder.genai_config(
            args, arch.genai_type, eos=eos, context_length=context,
            provider=model_folder.provider_name(provider, device), threads=threads or _cores()))
        model_folder.copy_tokenizer(model_dir, tmp)
        model_folder.write_manifest(tmp, model_folder.manifest(
            args, precision=precision, io_dtype=np.dtype(io_dtype).name, lora=lora, context_length=context,
            block_size=block_size if precision == "int4" else None, source=str(model_dir)))
    return Path(output)


def _cores() -> int:
    """onnxruntime-genai runs on one core without `intra_op_num_threads`: write this machine's cores."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def __getattr__(name: str):
    # generate-adapter's work function, imported on first use (bundle.py calls export)
    if name == "generate_adapter":
        from ortlora.export.bundle import generate_adapter

        return generate_adapter
    raise AttributeError(f"module 'ortlora.export' has no attribute {name!r}")
