"""THE format of an exported model folder: every part of ortlora reads and writes it through this module.

    model.onnx (+ model.onnx.data)   the decoder; LoRA weights are graph inputs `<module>.lora_A|B.weight`
                                     (names: naming.py), each with a rank-0 default so that no adapter = base
    genai_config.json                onnxruntime-genai's description of the model and its IO: what the runtime
                                     needs (`ModelInfo`), so onnxruntime-genai loads the same folder
    ortlora.json                     the manifest: precision, io dtype, context length, LoRA targets and modules,
                                     int4 block size, source checkpoint, the ortlora version that wrote it
    tokenizer.json, ...              tokenizer files copied from the Hugging Face folder (`TOKENIZER_FILES`)

Readers go through paths only (`is_file`, `read_text`), so a folder whose files are symlinks reads the same.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ortlora import __version__, naming
from ortlora.config import ModelArgs
from ortlora.errors import ModelError, OrtloraError
from ortlora.fileutil import output_problem, write_json

MODEL_FILE = "model.onnx"
GENAI_CONFIG = "genai_config.json"
MANIFEST = "ortlora.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)
# export's --device/--provider -> genai_config's provider name (Olive spells them `CUDAExecutionProvider`)
_PROVIDERS = {"cpu": None, "cuda": "cuda", "gpu": "cuda", "dml": "dml", "webgpu": "webgpu"}

Dim = int | str | None


# -- JSON files ------------------------------------------------------------------------------------------------

def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file; {} when the file is absent, ModelError when it is unreadable or not an object."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError covers JSONDecodeError and UnicodeDecodeError
        raise ModelError(f"{path} cannot be read as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} does not hold a JSON object")
    return data


def read_genai_config(folder: str | Path) -> dict[str, Any]:
    """`genai_config.json` as it is ({} when absent); `ModelInfo.read` is the checked view the runtime uses."""
    return read_json(Path(folder) / GENAI_CONFIG)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """`ortlora.json` ({} when absent: a folder exported by another tool)."""
    return read_json(Path(folder) / MANIFEST)


def write_genai_config(folder: str | Path, config: dict) -> None:
    write_json(Path(folder) / GENAI_CONFIG, config)


def write_manifest(folder: str | Path, manifest: dict) -> None:
    write_json(Path(folder) / MANIFEST, manifest)


def is_model_folder(folder: str | Path) -> bool:
    """Does `folder` look like an exported model (what may be replaced by a new export or quantization)?"""
    folder = Path(folder)
    return (folder / MODEL_FILE).is_file() or (folder / GENAI_CONFIG).is_file() or (folder / MANIFEST).is_file()


def check_output_folder(path: str | Path, flag: str = "--output_path") -> None:
    """Refuse an output path that is a file, or a non-empty folder that is not a model folder (replacing the folder
    would delete whatever it holds)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OrtloraError(f"{flag} {path} is a file: the output is a folder; choose another path")
    problem = output_problem(path)
    if problem is not None:
        raise OrtloraError(f"{flag} {problem}: choose another path")
    if path.is_dir() and any(path.iterdir()) and not is_model_folder(path):
        raise OrtloraError(f"{flag} {path} is a folder that holds other files (not an exported model): refusing "
                           "to replace it; choose a new or empty folder")


# -- genai_config.json -----------------------------------------------------------------------------------------

def provider_name(provider: str | None, device: str) -> str | None:
    """`CUDAExecutionProvider` / `cuda` / device `gpu` -> `cuda`; None for the CPU (genai_config's default)."""
    name = (provider or device).lower().removesuffix("executionprovider")
    return _PROVIDERS.get(name, name)


def genai_config(args: ModelArgs, genai_type: str, *, eos: list[int], context_length: int, provider: str | None,
                 threads: int | None) -> dict:
    """The `genai_config.json` of an export of `args` (the IO names are the decoder's, see DESIGN.md)."""
    session = {"log_id": "onnxruntime-genai", "provider_options": [{provider: {}}] if provider else []}
    if threads:
        session["intra_op_num_threads"] = threads
    pad = args.pad_token_id if args.pad_token_id is not None else (eos[0] if eos else 0)
    return {
        "model": {
            "bos_token_id": args.bos_token_id if args.bos_token_id is not None else (eos[0] if eos else 0),
            "context_length": context_length,
            "decoder": {
                "session_options": session,
                "filename": MODEL_FILE,
                "head_size": args.head_dim,
                "hidden_size": args.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": ModelInfo.past_key,
                    "past_value_names": ModelInfo.past_value,
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": ModelInfo.present_key,
                    "present_value_names": ModelInfo.present_value,
                },
                "num_attention_heads": args.num_attention_heads,
                "num_hidden_layers": args.num_hidden_layers,
                "num_key_value_heads": args.num_key_value_heads,
            },
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": pad,
            "type": genai_type,
            "vocab_size": args.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context_length, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime needs from `genai_config.json` (onnxruntime-genai's layout, written by export)."""
    folder: Path
    filename: str
    num_layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    eos_ids: tuple[int, ...]
    pad_id: int
    threads: int | None
    past_key: str = "past_key_values.%d.key"
    past_value: str = "past_key_values.%d.value"
    present_key: str = "present.%d.key"
    present_value: str = "present.%d.value"

    @classmethod
    def read(cls, folder: str | Path) -> "ModelInfo":
        folder = Path(folder)
        path = folder / GENAI_CONFIG
        if not folder.is_dir():
            raise ModelError(f"{folder}: no such model folder (export one with `ortlora export`)")
        if not path.is_file():
            raise ModelError(f"{folder} has no {GENAI_CONFIG}: not an exported model folder")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError
            raise ModelError(f"{path} is not a valid {GENAI_CONFIG}: {type(exc).__name__}: {exc}") from None
        f = _Fields(data)
        eos = f.get("model.eos_token_id", "ints", [])
        info = cls(
            folder=folder, filename=f.get("model.decoder.filename", "str", MODEL_FILE),
            num_layers=f.get("model.decoder.num_hidden_layers", "count"),
            kv_heads=f.get("model.decoder.num_key_value_heads", "count"),
            head_dim=f.get("model.decoder.head_size", "count"), vocab_size=f.get("model.vocab_size", "count"),
            context_length=f.get("model.context_length", "count"),
            eos_ids=tuple([eos] if isinstance(eos, int) else eos or ()), pad_id=f.get("model.pad_token_id", "int", 0),
            threads=f.get("model.decoder.session_options.intra_op_num_threads", "int", None),
            past_key=f.get("model.decoder.inputs.past_key_names", "pattern", cls.past_key),
            past_value=f.get("model.decoder.inputs.past_value_names", "pattern", cls.past_value),
            present_key=f.get("model.decoder.outputs.present_key_names", "pattern", cls.present_key),
            present_value=f.get("model.decoder.outputs.present_value_names", "pattern", cls.present_value),
        )
        if f.problems:
            raise ModelError(f"{path} is not a valid {GENAI_CONFIG}: " + "; ".join(dict.fromkeys(f.problems)))
        if not (folder / info.filename).is_file():
            raise ModelError(f"{folder} has no {info.filename} (named in {GENAI_CONFIG})")
        return info

    def kv_names(self) -> list[tuple[str, str]]:
        """(past input, present output) pairs, keys then values per layer."""
        return [(pat_in % i, pat_out % i) for i in range(self.num_layers)
                for pat_in, pat_out in ((self.past_key, self.present_key), (self.past_value, self.present_value))]


_REQUIRED = object()
_KINDS = {  # kind -> (test, what the message says is expected)
    "count": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
    "ints": (lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, list) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in v)), "an integer or a list of integers"),
    "str": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "pattern": (lambda v: isinstance(v, str) and "%d" in v, "a name with %d for the layer"),
}


class _Fields:
    """Typed reads of a JSON document by dotted path that collect every problem instead of stopping at the first
    (onnxruntime-genai's own reader is typed too: "2" is not a layer count)."""

    def __init__(self, data: Any):
        self.data = data
        self.problems: list[str] = []

    def get(self, dotted: str, kind: str, default: Any = _REQUIRED) -> Any:
        node, keys = self.data, dotted.split(".")
        for i, key in enumerate(keys):
            if not isinstance(node, dict):
                where = ".".join(keys[:i]) or "the file"
                self.problems.append(f"{where} must be an object, got {json.dumps(node)[:40]}")
                return default if default is not _REQUIRED else None
            if key not in node:
                if default is _REQUIRED:
                    self.problems.append(f"{dotted} is missing")
                return default if default is not _REQUIRED else None
            node = node[key]
        test, expected = _KINDS[kind]
        if node is None and default is None:  # an optional field written as null
            return None
        if not test(node):
            self.problems.append(f"{dotted} must be {expected}, got {json.dumps(node)[:40]}")
            return default if default is not _REQUIRED else None
        return node


# -- ortlora.json ------------------------------------------------------------------------------------------------

def manifest(args: ModelArgs, *, precision: str, io_dtype: str, lora: dict[str, tuple[int, int]],
             context_length: int, block_size: int | None, source: str) -> dict:
    """The manifest of an export; `lora` is module -> (in_features, out_features) of each LoRA input pair."""
    return {
        "ortlora_version": __version__,
        "architecture": args.model_type,
        "precision": precision,
        "io_dtype": io_dtype,
        "context_length": context_length,
        "int4_block_size": block_size,
        "lora_targets": sorted({naming.target_name(m) for m in lora}),
        "lora_modules": {m: {"in": i, "out": o} for m, (i, o) in sorted(lora.items())},
        "source": source,
    }


# -- tokenizer files -----------------------------------------------------------------------------------------------

def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files `src` (a Hugging Face folder) has into `dst`; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


# -- LoRA inputs of model.onnx --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraInput:
    name: str  # the graph input's own name (what to feed); dict keys are ortlora's spelling of it
    dtype: np.dtype
    shape: tuple[Dim, ...]  # e.g. (64, "<module>.lora_r") for A, ("<module>.lora_r", 128) for B


def load_model_proto(model):
    """The graph of `model` (a folder, a model.onnx path or an onnx.ModelProto) without its external weights."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise ModelError(f"{model}: no {MODEL_FILE} (an exported ortlora / onnxruntime-genai folder was expected)")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise ModelError(f"{path}: cannot read the ONNX model: {exc}") from None


def model_lora_inputs(model) -> dict[str, LoraInput]:
    """The LoRA inputs (`<module>.lora_A|B.weight`) of `model`: a folder, a model.onnx path or an onnx.ModelProto.

    Only the graph's input declarations are read; the weights (external data) are never loaded.
    """
    from onnx.helper import tensor_dtype_to_np_dtype

    proto = load_model_proto(model)
    out = {}
    for vi in proto.graph.input:
        key = naming.from_genai_spelling(vi.name)
        if naming.parse_input_name(key) is None:
            continue
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        out[key] = LoraInput(vi.name, np.dtype(tensor_dtype_to_np_dtype(tt.elem_type)), dims)
    return out


# -- checks: what stops a folder from loading, found without loading its weights -----------------------------------

def folder_problems(folder: str | Path) -> list[str]:
    """Every problem that stops the runtime (or onnxruntime-genai) from loading `folder`: genai_config.json (present,
    with the fields and types `ModelInfo` reads), the model file (`model_file_problems`) and tokenizer.json (loads).
    [] when the folder is usable. No weight is loaded."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder}: no such model folder"]
    problems, filename = [], MODEL_FILE
    try:
        filename = ModelInfo.read(folder).filename
    except ModelError as exc:
        problems.append(str(exc))
    missing = f"{folder} has no {filename} (named in {GENAI_CONFIG})"
    if (folder / filename).is_file():
        problems += model_file_problems(folder / filename)
    elif missing not in problems:
        problems.append(f"{folder} has no {filename}")
    return problems + tokenizer_problems(folder)


def model_file_problems(path: str | Path) -> list[str]:
    """Problems of an ONNX model file: missing, empty, not parseable, no graph, or external data that is missing,
    outside its folder or shorter than the ranges the graph reads from it (a truncated `model.onnx.data`)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        return [f"{path}: no such model file"]
    if path.stat().st_size == 0:
        return [f"{path} is empty"]
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends
        return [f"{path}: cannot read the ONNX model: {exc}"]
    if not proto.graph.node:
        return [f"{path} holds no graph (not an ONNX model)"]
    return _external_data_problems(proto, path)


def _external_data_problems(proto, path: Path) -> list[str]:
    import onnx

    ends: dict[str, int] = {}  # file -> the end of the furthest range the graph reads from it
    counts: dict[str, int] = {}
    for t in proto.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        length = int(info["length"]) if info.get("length") else _nbytes(t)
        ends[location] = max(ends.get(location, 0), int(info.get("offset") or 0) + length)
        counts[location] = counts.get(location, 0) + 1
    problems = []
    for location, end in ends.items():
        data = path.parent / location
        norm = os.path.normpath(location)  # lexical, as onnxruntime's check: a symlinked data file is fine
        if not location or os.path.isabs(location) or norm == os.pardir or norm.startswith(os.pardir + os.sep):
            problems.append(f"{path} keeps weights in {location!r}, which is not a file in its folder")
        elif not data.is_file():
            problems.append(f"{data} is missing ({path.name} keeps {counts[location]} weights in it)")
        elif data.stat().st_size < end:
            problems.append(f"{data} is truncated: {data.stat().st_size} bytes, but {path.name} reads {end} "
                            "bytes from it")
    return problems


def _nbytes(tensor) -> int:
    """Bytes of a tensor's data from its type and dims (0 when the type is unknown: nothing is checked)."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    n = int(np.prod(tensor.dims, dtype=np.int64))
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (n + 1) // 2
    try:
        return n * np.dtype(tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return 0


def tokenizer_problems(folder: str | Path, *, required: bool = True) -> list[str]:
    """[] when `folder`'s tokenizer.json loads (or, unless `required`, is absent); else what is wrong with it."""
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return [f"{folder} has no tokenizer.json (export copies it from the Hugging Face folder)"] if required else []
    try:
        Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        return [f"{path} cannot be loaded by the tokenizers package: {exc}"]
    return []
