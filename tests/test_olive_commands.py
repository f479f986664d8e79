"""Olive's documented command lines, run with `ortlora` in place of `olive`: each output exists and loads.

The lines are those of Olive 0.13's docs (docs/source/how-to/cli/cli-finetune.md, cli-auto-opt.md, cli-quantize.md,
how-to-configure-data.md, the README's getting-started line, blogs/sd-lora.md's capture-onnx-graph) and of the
onnxruntime-genai LoRA tutorial (/work/shared/reference/onnxruntime-genai-lora-tutorial.txt). Only the model and data
become local tiny ones, and finetune gets `--max_steps 2` where the line trains longer (2 busy cores).
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from ortlora.adapters.peft import read_peft
from ortlora.cli import main as ortlora

TEMPLATE = r"<|start_header_id|>user<|end_header_id|>\n{phrase}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n{tone}"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on 2 shared cores (see test_finetune.py)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def work(tiny, tmp_path_factory):
    """A tiny base model and Olive-shaped data: phrase/tone rows, text rows, chat rows."""
    root = tmp_path_factory.mktemp("olive")
    rng = random.Random(0)
    tones = ["happy", "sad", "calm"]
    with open(root / "phrases.jsonl", "w") as f:
        for i in range(48):
            f.write(json.dumps({"phrase": f"phrase {rng.randint(0, 99)}", "tone": tones[i % 3]}) + "\n")
    for name, n in (("my_training_data.jsonl", 40), ("file1.jsonl", 10), ("file2.jsonl", 10), ("my_data.jsonl", 40)):
        with open(root / name, "w") as f:
            for i in range(n):
                f.write(json.dumps({"text": f"the number {i} is {'even' if i % 2 == 0 else 'odd'}"}) + "\n")
    with open(root / "chat.jsonl", "w") as f:
        for i in range(24):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"say {i}"},
                                             {"role": "assistant", "content": str(i)}]}) + "\n")
    return root, tiny.model("llama")


def _run(argv: list[str]) -> None:
    assert ortlora(argv) == 0, argv


def _loads(folder, adapters=()) -> None:
    """The folder loads in ortlora and in onnxruntime-genai, with each adapter, and generates."""
    import onnxruntime_genai as og

    import ortlora as api

    m = api.Model(folder, slots=1)
    for i, path in enumerate(adapters):
        m.adapters.load(path, name=f"a{i}")
    texts = m.generate(["hello"] * (1 + len(adapters)), adapter=[None] + [f"a{i}" for i in range(len(adapters))],
                       max_new_tokens=3)
    assert len(texts) == 1 + len(adapters)
    gm = og.Model(str(folder))
    loaded = og.Adapters(gm)
    for i, path in enumerate(adapters):
        loaded.load(str(path), f"a{i}")


def test_finetune_then_auto_opt_as_in_cli_finetune_md(work, tmp_path):
    root, model = work
    ft = tmp_path / "models/llama/ft"
    _run(["finetune", "--model_name_or_path", str(model), "--trust_remote_code", "--output_path", str(ft),
          "--data_name", str(root / "phrases.jsonl"), "--text_template", TEMPLATE, "--method", "lora",
          "--max_steps", "2", "--log_level", "1"])
    assert read_peft(ft / "adapter").modules and (ft / "model" / "config.json").is_file()  # Olive's layout
    onnx = tmp_path / "models/llama/onnx"
    _run(["auto-opt", "--model_name_or_path", str(ft / "model"), "--adapter_path", str(ft / "adapter"), "--device",
          "cpu", "--provider", "CPUExecutionProvider", "--use_ort_genai", "--output_path", str(onnx),
          "--log_level", "1"])
    _run(["convert-adapters", "--adapter_path", str(ft / "adapter"), "--output_path", str(tmp_path / "ft.onnx_adapter"),
          "--dtype", "float32"])
    _loads(onnx, [tmp_path / "ft.onnx_adapter"])


def test_tutorial_lines(work, tmp_path):
    """The onnxruntime-genai LoRA tutorial: finetune (lora: qlora needs CUDA), auto-opt, convert-adapters, generate."""
    root, model = work
    adapter = tmp_path / "adapters/tiny-codes"
    _run(["finetune", "--method", "lora", "-m", str(model), "-d", str(root / "phrases.jsonl"), "--train_split",
          "train[:32]", "--eval_split", "train[32:40]", "--text_template", "### Phrase: {phrase}\n### Tone: {tone}",
          "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16", "--max_steps", "2",
          "--logging_steps", "1", "-o", str(adapter)])
    out = tmp_path / "model"
    _run(["auto-opt", "-m", str(model), "--adapter_path", str(adapter), "-o", str(out), "--device", "cpu",
          "--provider", "CPUExecutionProvider"])
    _run(["convert-adapters", "--adapter_path", str(adapter), "--output_path", str(tmp_path / "a.onnx_adapter"),
          "--dtype", "float32"])
    _run(["generate", "-m", str(out), "-a", str(tmp_path / "a.onnx_adapter"), "-p", "hello", "--max-new-tokens", "3"])
    _loads(out, [tmp_path / "a.onnx_adapter"])


def test_auto_opt_int4_and_int8_as_in_cli_auto_opt_md(work, tmp_path):
    _, model = work
    ao = tmp_path / "models/llama/ao"
    _run(["auto-opt", "--model_name_or_path", str(model), "--trust_remote_code", "--output_path", str(ao),
          "--device", "cpu", "--provider", "CPUExecutionProvider", "--use_ort_genai", "--precision", "int4",
          "--log_level", "1"])
    assert json.loads((ao / "ortlora.json").read_text())["precision"] == "int4"
    _loads(ao)
    int8 = tmp_path / "int8"
    _run(["auto-opt", "-m", str(model), "-o", str(int8), "--precision", "int8", "--no-progress"])
    import onnx

    proto = onnx.load(str(int8 / "model.onnx"), load_external_data=False)
    ops = {n.op_type for n in proto.graph.node}
    assert "MatMulIntegerToFloat" in ops and not ops & {"MatMulNBits", "MatMul"}  # int8 weights and activations
    _loads(int8)


def test_data_options_as_in_how_to_configure_data_md(work, tmp_path):
    root, model = work
    common = ["--model_name_or_path", str(model), "--data_name", "json", "--text_field", "text", "--max_steps", "2"]
    _run(["finetune", *common, "--data_files", str(root / "my_training_data.jsonl"), "--train_split", "train",
          "--output_path", str(tmp_path / "a")])
    _run(["finetune", *common, "--data_files", f"{root / 'file1.jsonl'},{root / 'file2.jsonl'}", "--train_split",
          "train", "--output_path", str(tmp_path / "b")])
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["train_rows"] == 20
    _run(["finetune", *common, "--data_files", str(root / "my_data.jsonl"), "--train_split", "train[:80%]",
          "--eval_split", "train[80%:]", "--output_path", str(tmp_path / "c")])
    metrics = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert (metrics["train_rows"], metrics["eval_rows"]) == (32, 8)


def test_readme_chat_line(work, tmp_path):
    """README: --use_chat_template --max_samples 256 --torch_dtype bfloat16 (chat rows, the tokenizer's template)."""
    root, model = work
    out = tmp_path / "olive-output"
    _run(["finetune", "-m", str(model), "--method", "lora", "--lora_r", "64", "--lora_alpha", "16", "-d",
          str(root / "chat.jsonl"), "--train_split", "train", "--use_chat_template", "--max_seq_len", "1024",
          "--max_samples", "256", "--torch_dtype", "bfloat16", "-o", str(out), "--max_steps", "2"])
    assert read_peft(out).modules
    assert json.loads((out / "metrics.json").read_text())["train_rows"] == 24


def test_capture_onnx_graph_then_generate_adapter(work, tmp_path):
    """sd-lora.md's `capture-onnx-graph -m M -a ADAPTER --output_path O` on an LLM, then `generate-adapter -m O`."""
    root, model = work
    adapter = tmp_path / "adapter"
    _run(["finetune", "-m", str(model), "-d", str(root / "phrases.jsonl"), "--text_template", TEMPLATE,
          "--max_steps", "2", "--lora_r", "4", "-o", str(adapter)])
    captured = tmp_path / "onnx"
    _run(["capture-onnx-graph", "-m", str(model), "-a", str(adapter), "--output_path", str(captured)])
    assert json.loads((captured / "ortlora.json").read_text())["precision"] == "fp32"  # Olive's torch capture
    out = tmp_path / "optimized-model"
    _run(["generate-adapter", "-m", str(captured), "-o", str(out), "--adapter_type", "lora", "--adapter_format",
          "onnx_adapter", "--log_level", "1"])
    files = sorted((out / "adapters").glob("*.onnx_adapter"))
    assert [f.name for f in files] == ["adapter.onnx_adapter"]
    _loads(out, files)
    # from the Hugging Face folder directly (ortlora's -a)
    both = tmp_path / "both"
    _run(["generate-adapter", "-m", str(model), "-a", str(adapter), "-o", str(both), "--no-progress"])
    _loads(both, sorted((both / "adapters").glob("*.onnx_adapter")))


def test_quantize_lines(work, tmp_path, capsys):
    """cli-quantize.md's awq line is refused with the reason; rtn/gptq run on an exported folder."""
    root, model = work
    assert ortlora(["quantize", "--model_name_or_path", str(model), "--algorithm", "awq", "--output_path",
                    str(tmp_path / "awq"), "--log_level", "1"]) == 1
    assert "AWQ" in capsys.readouterr().err
    exported = tmp_path / "fp32"
    _run(["auto-opt", "-m", str(model), "-o", str(exported), "--no-progress"])
    out = tmp_path / "q"
    _run(["quantize", "-m", str(exported), "--algorithm", "rtn", "-o", str(out), "--eval_samples", "1",
          "--no-progress"])
    assert "Olive's quantize defaults to int8" in capsys.readouterr().err
    _loads(out)
    np.testing.assert_equal(json.loads((out / "quantize_report.json").read_text())["precision"], "int4")


def test_gpu_provider_is_honoured_or_refused(work, tmp_path, capsys):
    """The tutorial's `auto-opt --device gpu --provider CUDAExecutionProvider`: the folder asks for CUDA; with this
    CPU-only onnxruntime ortlora refuses to load it, naming onnxruntime-gpu (no silent CPU run), unless told
    `--provider cpu`; with CUDA offered, the session list is [CUDA, CPU]."""
    import onnxruntime

    from ortlora.errors import ModelError
    from ortlora.runtime import providers
    from ortlora.runtime.engine import Engine

    _, model = work
    out = tmp_path / "gpu"
    _run(["auto-opt", "-m", str(model), "-o", str(out), "--device", "gpu", "--provider", "CUDAExecutionProvider",
          "--no-progress"])
    assert providers.configured(out) == "cuda"
    assert providers.session_providers(out, available=["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the refusal cannot be shown here")
    with pytest.raises(ModelError, match="install onnxruntime-gpu"):
        Engine(out)
    capsys.readouterr()
    assert ortlora(["generate", "-m", str(out), "-p", "hi", "--max-new-tokens", "2"]) == 1
    assert "onnxruntime-gpu" in capsys.readouterr().err
    _run(["generate", "-m", str(out), "-p", "hi", "--max-new-tokens", "2", "--provider", "cpu"])
    assert Engine(out, provider="cpu").provider == "cpu"
    with pytest.raises(ModelError, match="unknown execution provider 'tpu'"):
        providers.canonical("tpu")
