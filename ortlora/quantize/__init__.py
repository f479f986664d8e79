"""`quantize`: int4 or int8 quantization of an ortlora model whose LoRA inputs stay float.

    from ortlora.quantize import quantize
    quantize("exported_or_hf_dir", "out_dir", precision="int4", algorithm="rtn", adapter_path=["adapter"])

int4 is weight-only: an exported folder (fp32/fp16) has its base MatMuls rewritten as MatMulNBits. int8 runs the
projections on the CPU's int8 units: weights int8 per output channel, activations quantized per row at run time
(MatMulIntegerToFloat; export/int8.py), as `export --precision int8` writes. A Hugging Face folder is first
exported to fp32 (a temporary folder, also the accuracy reference). LoRA inputs and their defaults are copied
unchanged, so every adapter that fitted the float model fits the quantized one. The output folder gets
`quantize_report.json`: sizes and, on text windows, perplexity and top-1 agreement against the float model,
with and without each adapter.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path
from typing import Sequence

import onnx
from tqdm import tqdm

from ortlora import model_folder
from ortlora.adapters import adapter_kind
from ortlora.adapters.onnx_adapter import SUFFIX
from ortlora.errors import ModelError, OrtloraError
from ortlora.export import int8
from ortlora.export.int4 import check_block_size
from ortlora.fileutil import atomic_dir, temp_dir, write_json
from ortlora.model_folder import MANIFEST, model_lora_inputs
from ortlora.quantize.algorithms import ALGORITHMS, BITS
from ortlora.quantize.data import load_text, token_windows
from ortlora.quantize.rewrite import Settings, SourceModel, find_targets, rewrite

REPORT = "quantize_report.json"
_WEIGHT_FILES = (model_folder.MODEL_FILE, model_folder.MODEL_FILE + ".data")
_MODEL_FILES = {*_WEIGHT_FILES, MANIFEST, REPORT}


def quantize(model: str | Path, output: str | Path, *, precision: str = "int4", block_size: int = 32,
             algorithm: str = "rtn", symmetric: bool = False, lm_head: bool = True, embeddings: bool = False,
             data: str | Path | None = None, text_template: str | None = None, text_field: str = "text",
             adapter_path: Sequence[str | Path] = (), lora_targets: Sequence[str] | None = None,
             seq_len: int = 256, calib_samples: int = 32, eval_samples: int = 8, accuracy_level: int = 4,
             progress: bool = True) -> Path:
    """Quantize `model` (an exported ortlora folder or a Hugging Face folder) into `output`; returns `output`."""
    model_dir, out = Path(model), Path(output)
    problems = _check_options(precision, block_size, algorithm, symmetric, embeddings, data, adapter_path)
    for name, value, least in (("seq_len", seq_len, 2), ("calib_samples", calib_samples, 1),
                               ("eval_samples", eval_samples, 0)):
        if not isinstance(value, int) or value < least:
            problems.append(f"{name} must be an integer of at least {least}, got {value!r}")
    kind = _model_kind(model_dir, out, problems)
    if kind == "onnx" and lora_targets:
        problems.append("--lora-targets applies to a Hugging Face input only: an exported folder keeps the LoRA "
                        "inputs it was exported with")
    text = None
    try:
        text = load_text(data, text_template, text_field)
    except OrtloraError as exc:
        problems.append(str(exc))
    if problems:
        raise (ModelError if kind is None else OrtloraError)("cannot quantize:\n  " + "\n  ".join(problems))
    settings = Settings(bits=BITS[precision], block_size=block_size, algorithm=algorithm, symmetric=symmetric,
                        lm_head=lm_head, embeddings=embeddings, accuracy_level=accuracy_level)
    options = dict(seq_len=seq_len, calib_samples=calib_samples, eval_samples=eval_samples,
                   data_name=str(data) if data else "built-in text", has_data=data is not None, progress=progress)
    if kind == "onnx":
        return _quantize_folder(model_dir, out, settings, text, adapter_path, source=model_dir, **options)
    scratch = temp_dir(out)  # the fp32 export, removed at the end; named as fileutil's temporaries
    try:
        from ortlora.export import export

        peft_dirs = [p for p in adapter_path if Path(p).is_dir()]
        reference = export(model_dir, scratch / "fp32", adapter_path=peft_dirs, lora_targets=lora_targets,
                           progress=progress)
        return _quantize_folder(reference, out, settings, text, adapter_path, source=model_dir, **options)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _check_options(precision, block_size, algorithm, symmetric, embeddings, data, adapter_path) -> list[str]:
    problems = []
    if precision not in BITS:
        problems.append(f"precision {precision!r} is not supported; choose one of {', '.join(BITS)}")
    if algorithm not in ALGORITHMS:
        problems.append(f"algorithm {algorithm!r} is unknown; choose one of {', '.join(ALGORITHMS)}")
    try:
        check_block_size(block_size)
    except OrtloraError as exc:
        problems.append(str(exc))
    if precision == "int8" and algorithm != "rtn":
        problems.append(f"{algorithm} is an int4 algorithm: int8 rounds each output channel to nearest "
                        "(benchmarks/NOTES.md#int8); drop --algorithm")
    if algorithm == "hqq":
        if symmetric:
            problems.append("hqq optimizes the zero points: --symmetric does not apply to it")
        if importlib.util.find_spec("torch") is None:
            problems.append("hqq needs torch (onnxruntime's HQQ uses it): pip install 'ortlora[train]'")
    if algorithm == "gptq" and data is None:
        problems.append("gptq needs calibration text: pass -d FILE (.txt, .json or .jsonl)")
    if embeddings and precision == "int8":
        problems.append("embedding quantization (GatherBlockQuantized) is int4 only: drop --quantize_embeddings")
    for p in adapter_path:
        if adapter_kind(p) is None:
            problems.append(f"adapter {p}: not a PEFT adapter folder or {SUFFIX} file")
    return problems


def _model_kind(model_dir: Path, out: Path, problems: list[str]) -> str | None:
    """'onnx' (an exported folder), 'hf' (a Hugging Face checkpoint) or None (problems say why)."""
    if not model_dir.is_dir():
        problems.append(f"{model_dir}: no such folder (an exported ortlora folder or a Hugging Face folder)")
        return None
    src, dst = model_dir.resolve(), out.absolute().resolve()
    if dst == src or src in dst.parents:
        problems.append(f"output {out} is the input folder or inside it: choose another output folder")
    else:
        try:
            model_folder.check_output_folder(out)
        except OrtloraError as exc:
            problems.append(str(exc))
    if (model_dir / model_folder.MODEL_FILE).is_file():
        broken = model_folder.folder_problems(model_dir)  # refused before anything is written or copied
        if broken:
            problems.extend(broken)
            return None
        try:
            precision = model_folder.read_manifest(model_dir).get("precision")
        except ModelError as exc:
            problems.append(str(exc))
            return None
        if precision in BITS:
            problems.append(f"{model_dir} is already quantized ({precision}, says {MANIFEST}): quantize the fp32 "
                            "or fp16 export (or the Hugging Face checkpoint) instead")
            return None
        try:
            src_model = SourceModel(model_dir)
        except ModelError as exc:
            problems.append(str(exc))
            return None
        done = src_model.quantized_nodes()
        if done:
            problems.append(f"{model_dir}/model.onnx is already quantized: it has {len(done)} quantized nodes "
                            f"({', '.join(done[:3])}{', ...' if len(done) > 3 else ''})")
            return None
        return "onnx"
    config = model_dir / "config.json"
    if config.is_file():
        try:
            qc = json.loads(config.read_text()).get("quantization_config")
        except (OSError, ValueError, AttributeError) as exc:
            problems.append(f"{config} is not valid JSON: {exc}")
            return None
        if qc:
            problems.append(f"{model_dir} is an already quantized checkpoint (quantization_config: "
                            f"{qc.get('quant_method', qc) if isinstance(qc, dict) else qc}): use the float one")
            return None
        broken = model_folder.tokenizer_problems(model_dir, required=False)  # export would copy it as it is
        if broken:
            problems.extend(broken)
            return None
        return "hf"
    problems.append(f"{model_dir} holds neither model.onnx (an ortlora export) nor config.json (Hugging Face)")
    return None


def _quantize_folder(ref: Path, out: Path, settings: Settings, text: str, adapter_path: Sequence[str | Path], *,
                     source: Path, seq_len: int, calib_samples: int, eval_samples: int, data_name: str,
                     has_data: bool, progress: bool) -> Path:
    src = SourceModel(ref)
    try:
        return _quantize_source(src, out, settings, text, adapter_path, source=source, seq_len=seq_len,
                                calib_samples=calib_samples, eval_samples=eval_samples, data_name=data_name,
                                has_data=has_data, progress=progress)
    finally:
        src.close()


def _quantize_source(src: SourceModel, out: Path, settings: Settings, text: str,
                     adapter_path: Sequence[str | Path], *, source: Path, seq_len: int, calib_samples: int,
                     eval_samples: int, data_name: str, has_data: bool, progress: bool) -> Path:
    from ortlora.adapters import adapter_feeds
    from ortlora.quantize.evaluate import Hessians, Runner, compare

    ref = src.folder
    if settings.bits == 8:
        _check_int8_source(src)
        int8.warn_without_int8_units("quantize")
    targets = find_targets(src, settings)
    if not any(t.kind == "matmul" for t in targets):
        raise ModelError(f"{ref}/model.onnx has no base MatMul weights (`*.MatMul.weight` initializers): "
                         "is it an ortlora export?")
    manifest = model_folder.read_manifest(ref)
    seq_len = min(seq_len, int(manifest.get("context_length") or seq_len))
    # With data, its first `calib_samples` windows are kept for calibration whatever the algorithm, so every
    # algorithm is scored on the same held-out windows that follow them (all windows when the text is too short).
    reserved = calib_samples if has_data else 0
    windows = token_windows(ref, text, seq_len, reserved + max(eval_samples, 1))
    calib = windows[:reserved] if settings.algorithm == "gptq" else []
    held_out = len(windows) > reserved
    evals = (windows[reserved:] if held_out else windows)[:eval_samples]
    lora_inputs = model_lora_inputs(src.proto)
    adapters = {str(p): adapter_feeds(p, lora_inputs, model=ref) for p in adapter_path}

    t0 = time.perf_counter()
    hessians = None
    if settings.algorithm == "gptq":
        order = [t.activation for t in targets if t.kind == "matmul"]
        sizes = {t.activation: t.shape[0] for t in targets if t.kind == "matmul"}
        hessians = Hessians(ref, calib, order, sizes)
    bar = tqdm(total=len(targets), desc="quantize", unit="weight", disable=not progress)
    with atomic_dir(out) as tmp:
        try:
            rewrite(src, tmp, targets, settings, hessian=hessians, on_weight=lambda t: bar.update(1))
        finally:
            bar.close()
        skip = _MODEL_FILES | src.data_files()
        for f in ref.iterdir():
            if f.is_file() and f.name not in skip and not f.name.startswith("."):
                shutil.copy2(f, tmp / f.name)
        seconds_quantize = time.perf_counter() - t0
        model_folder.write_manifest(tmp, {**manifest, **_manifest_update(settings, targets)})
        t1 = time.perf_counter()
        results = []
        if evals:  # both models in onnxruntime at once: the report's memory is about the two models
            reference, quantized = Runner(ref), Runner(tmp)
            for name, tensors in [(None, None), *adapters.items()]:
                results.append({"adapter": name, **compare(reference, quantized, evals, tensors)})
            del reference, quantized
        report = {
            "source": str(source), "output": str(out), **_describe(settings, targets),
            "quantized_weights": sorted(t.module for t in targets),
            "size_bytes": _sizes(src.data_bytes(), tmp),
            "eval": {"data": data_name, "windows": len(evals), "tokens": int(sum(len(w) for w in evals)),
                     "seq_len": seq_len, "held_out_from_calibration": held_out if has_data else None},
            "calibration": ({"data": data_name, "windows": len(calib), "passes": hessians.passes}
                            if hessians else None),
            "results": results,
            "seconds": {"quantize": round(seconds_quantize, 2), "evaluate": round(time.perf_counter() - t1, 2)},
        }
        write_json(tmp / REPORT, report)
    return out


def _check_int8_source(src: SourceModel) -> None:
    """int8's MatMulIntegerToFloat computes in float32 and its per-row QuantizeLinear is opset 21's."""
    elem = {i.type.tensor_type.elem_type for i in src.graph.input if i.name.startswith("past_key_values.")}
    opset = next((o.version for o in src.proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    problems = []
    if elem - {onnx.TensorProto.FLOAT}:
        problems.append("int8 needs an fp32 export (its MatMulIntegerToFloat computes in float32); this one is "
                        "fp16: quantize the fp32 export or the Hugging Face checkpoint")
    if opset < 21:
        problems.append(f"int8 needs opset 21 (per-row QuantizeLinear); {src.path} is opset {opset}: re-export it")
    if problems:
        raise ModelError(f"cannot quantize {src.folder} to int8:\n  " + "\n  ".join(problems))


def _describe(settings: Settings, targets) -> dict:
    kind = f"int{settings.bits}"
    kinds = {t.kind for t in targets}
    embeddings = f"{kind}, the LM head's" if "shared" in kinds else "int4" if "gather" in kinds else "float"
    if settings.bits == 8:  # per output channel, symmetric; no blocks, no MatMulNBits accuracy level
        return {"precision": kind, "algorithm": "rtn", "block_size": None, "symmetric": True,
                "accuracy_level": None, "weights": "per output channel", "activations": "per row",
                "lm_head": kind if settings.lm_head else "float", "embeddings": embeddings}
    return {
        "precision": kind, "algorithm": settings.algorithm, "block_size": settings.block_size,
        "symmetric": settings.symmetric, "accuracy_level": settings.accuracy_level,
        "lm_head": kind if settings.lm_head else "float", "embeddings": embeddings,
    }


def _manifest_update(settings: Settings, targets) -> dict:
    return {
        "precision": f"int{settings.bits}",
        "int4_block_size": settings.block_size if settings.bits == 4 else None,
        "quantization": _describe(settings, targets),
    }


def _sizes(before: int, folder: Path) -> dict:
    after = sum((folder / f).stat().st_size for f in _WEIGHT_FILES if (folder / f).is_file())
    return {"before": before, "after": after, "ratio": round(before / after, 3)}
