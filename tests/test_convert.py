"""`ortlora convert-adapters`, the `.onnx_adapter` reader/writer and the fit check: logits against PEFT through
onnxruntime's own adapter loading and through our reader, onnxruntime-genai greedy tokens, Olive- and
genai-builder-spelled files, float16, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from ortlora import naming
from ortlora.adapters.convert import convert_adapter, convert_adapters
from ortlora.adapters.onnx_adapter import open_onnx_adapter, read_onnx_adapter, write_onnx_adapter
from ortlora.adapters.peft import read_peft
from ortlora.adapters.validate import check_adapter, model_feeds
from ortlora.model_folder import LoraInput, model_lora_inputs
from ortlora.errors import AdapterError
from ortlora.inspect import describe, inspect
from reference import OnnxDecoder, hf_greedy, hf_logits, targets_for

# The rows of test_export: two right-padded rows, then 3 teacher-forced decode steps through the KV cache.
ROWS = [[5, 17, 33, 9, 81, 100, 7], [12, 40, 66, 3]]
DECODE = [[11, 22, 33], [44, 55, 66]]
FULL = [r + d for r, d in zip(ROWS, DECODE)]
ATOL = 1e-4  # fp32, as in test_export (observed max |diff| ~1e-5)
# A float16 adapter cast into the float32 model: A and B rounded to fp16 (relative error up to 2^-11) move logits
# by 3.8e-3 at most here (LoRA weights of std 0.3 make the LoRA term large); 1e-2 leaves room, 1e-4 would fail.
ATOL_FP16_ADAPTER = 1e-2

# Adapters of one llama, each exercising a part of the scale / rank rules; all fit the all-linear export.
ADAPTERS = {
    "qv": dict(),  # r=4, alpha=8, q_proj + v_proj: a subset of the model's targets (the rest act as zero)
    "rank8-all": dict(r=8, alpha=4.0, target_modules=targets_for("llama")),
    "rslora": dict(r=8, alpha=16.0, use_rslora=True, target_modules=("q_proj", "o_proj", "up_proj")),
    "patterns": dict(r=4, alpha=8.0, target_modules=("q_proj", "k_proj", "down_proj"),
                     rank_pattern={"k_proj": 2, "model.layers.1.mlp.down_proj": 6},
                     alpha_pattern={"down_proj": 3.0}),
}


class AdapterDecoder(OnnxDecoder):
    """The reference decode loop, with onnxruntime's own adapter loading (RunOptions.add_active_adapter)."""

    def __init__(self, folder, adapter_file):
        super().__init__(folder)
        self.adapter = ort.LoraAdapter()
        self.adapter.Load(str(adapter_file))
        self.run_options = ort.RunOptions()
        self.run_options.add_active_adapter(self.adapter)

    def _step(self, ids, mask, past):
        return self.sess.run(None, {"input_ids": ids, "attention_mask": mask, **past}, self.run_options)


def max_diff(decoder, ref):
    prefill, steps = decoder.run(ROWS, DECODE)
    err = max(np.abs(prefill[i] - ref[i][: len(r)]).max() for i, r in enumerate(ROWS))
    for t, step in enumerate(steps):
        err = max(err, max(np.abs(step[i] - ref[i][len(r) + t]).max() for i, r in enumerate(ROWS)))
    return err


@pytest.fixture(scope="module")
def llama(tiny):
    model = tiny.model("llama")
    folder = tiny.export(model, "lora", adapter_path=[tiny.adapter(model, "all", target_modules=targets_for("llama"))])
    return model, folder


@pytest.mark.parametrize("name", ADAPTERS)
def test_converted_adapter_gives_peft_logits(tiny, llama, tmp_path, name):
    model, folder = llama
    adapter = tiny.adapter(model, name, **ADAPTERS[name])
    out = convert_adapter(adapter, tmp_path / f"{name}.onnx_adapter", model=folder)

    ref = hf_logits(model, FULL, adapter)
    base = hf_logits(model, FULL)
    assert max(np.abs(b - p).max() for b, p in zip(base, ref)) > 0.05  # the adapter matters

    err_ort = max_diff(AdapterDecoder(folder, out), ref)  # onnxruntime reads the file itself
    feeds = model_feeds(read_onnx_adapter(out), model_lora_inputs(folder), str(out))
    err_ours = max_diff(OnnxDecoder(folder, feeds), ref)  # our zero-copy reader feeds the same inputs
    print(f"{name}: max |logits - PEFT| via add_active_adapter {err_ort:.2e}, via read_onnx_adapter {err_ours:.2e}")
    assert err_ort <= ATOL and err_ours <= ATOL


def test_scale_and_layout_rules(tiny, llama, tmp_path):
    """The patterns adapter: per-module ranks and alphas land in the file as PEFT defines them."""
    model, folder = llama
    adapter = tiny.adapter(model, "patterns", **ADAPTERS["patterns"])
    params = read_onnx_adapter(convert_adapter(adapter, tmp_path / "p.onnx_adapter"))
    from safetensors.numpy import load_file

    raw = load_file(adapter / "adapter_model.safetensors")
    expect = {"model.layers.0.self_attn.q_proj": (4, 8.0 / 4), "model.layers.0.self_attn.k_proj": (2, 8.0 / 2),
              "model.layers.0.mlp.down_proj": (4, 3.0 / 4), "model.layers.1.mlp.down_proj": (6, 3.0 / 6)}
    for module, (r, scale) in expect.items():
        a, b = naming.lora_input_names(module)
        assert params[a].shape[1] == r and params[b].shape[0] == r
        np.testing.assert_array_equal(params[a], raw[f"base_model.model.{module}.lora_A.weight"].T)
        np.testing.assert_allclose(params[b], raw[f"base_model.model.{module}.lora_B.weight"].T * scale, rtol=1e-6)
    rs = read_onnx_adapter(convert_adapter(tiny.adapter(model, "rslora", **ADAPTERS["rslora"]), tmp_path / "r.x"))
    raw = load_file(tiny.adapter(model, "rslora", **ADAPTERS["rslora"]) / "adapter_model.safetensors")
    np.testing.assert_allclose(rs["model.layers.0.self_attn.q_proj.lora_B.weight"],
                               raw["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].T
                               * (16.0 / math.sqrt(8)), rtol=1e-6)


def test_olive_and_genai_builder_files_load(tiny, llama, tmp_path):
    """Files written the way `olive convert-adapters` writes them (its names, layout and scale, through
    onnxruntime.AdapterFormat directly), and the same tensors in onnxruntime-genai builder spelling."""
    from safetensors.numpy import load_file

    model, folder = llama
    adapter = tiny.adapter(model, "rank8-all", **ADAPTERS["rank8-all"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scaling = cfg["lora_alpha"] / cfg["r"]  # Olive: one global scale (it ignores rank/alpha patterns)
    olive = {}
    for key, value in load_file(adapter / "adapter_model.safetensors").items():
        name = key.replace("base_model.model.model", "model")  # Olive's rename
        w = value.astype(np.float32).T.copy()
        olive[name] = w * scaling if "lora_B" in name else w
    genai = {}
    for name, w in olive.items():  # builder: /model/layers.{i}/attn/q_proj/lora_A/MatMul -> initializer name
        genai[name.replace(".self_attn.", ".attn.").replace(".weight", ".MatMul.weight")] = w
    assert any(".attn." in n for n in genai) and any(".mlp." in n for n in genai)
    ref = hf_logits(model, FULL, adapter)
    lora_inputs = model_lora_inputs(folder)
    for label, params in (("olive", olive), ("genai", genai)):
        path = tmp_path / f"{label}.onnx_adapter"
        fmt = ort.AdapterFormat()
        fmt.set_adapter_version(0)
        fmt.set_model_version(0)
        fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
        fmt.export_adapter(str(path))
        read = read_onnx_adapter(path)
        assert sorted(read) == sorted(olive)  # genai spelling mapped to ours
        err = max_diff(OnnxDecoder(folder, model_feeds(read, lora_inputs, str(path))), ref)
        print(f"{label}-spelled file: max |logits - PEFT| {err:.2e}")
        assert err <= ATOL
    # Olive's file needs no mapping at all: onnxruntime loads it against our model as it is.
    assert max_diff(AdapterDecoder(folder, tmp_path / "olive.onnx_adapter"), ref) <= ATOL


def test_onnxruntime_genai_greedy_equals_peft(tiny, llama, tmp_path):
    og = pytest.importorskip("onnxruntime_genai")
    model, folder = llama
    adapters = {n: tiny.adapter(model, n, **ADAPTERS[n]) for n in ("qv", "rslora")}
    m = og.Model(str(folder))
    loaded = og.Adapters(m)
    for name, path in adapters.items():
        loaded.load(str(convert_adapter(path, tmp_path / f"{name}.onnx_adapter", model=folder)), name)
    prompt = [int(t) for t in og.Tokenizer(m).encode("The quick brown fox")]
    for name, path in adapters.items():
        params = og.GeneratorParams(m)
        # min_length = max_length: EOS suppressed, as hf_greedy's min_new_tokens does
        params.set_search_options(min_length=len(prompt) + 12, max_length=len(prompt) + 12, do_sample=False)
        gen = og.Generator(m, params)
        gen.set_active_adapter(loaded, name)
        gen.append_tokens(prompt)
        tokens = []
        while not gen.is_done():
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
        want = hf_greedy(model, prompt, 12, path)
        assert want != hf_greedy(model, prompt, 12) or name != "qv"  # the adapter changes the greedy tokens
        assert tokens == want, name


# -- the file format --------------------------------------------------------------------------------------------

def test_round_trip_is_exact_and_zero_copy(tmp_path):
    rng = np.random.default_rng(0)
    params = {"model.layers.0.self_attn.q_proj.lora_A.weight": rng.standard_normal((64, 3), np.float32),
              "model.layers.0.self_attn.q_proj.lora_B.weight": rng.standard_normal((3, 80)).astype(np.float16),
              "model.layers.1.mlp.up_proj.lora_A.weight": np.zeros((64, 0), np.float32),
              "model.layers.1.mlp.up_proj.lora_B.weight": np.zeros((0, 128), np.float32)}
    path = write_onnx_adapter(tmp_path / "a.onnx_adapter", params, adapter_version=7, model_version=3)
    f = open_onnx_adapter(path)
    assert (f.format_version, f.adapter_version, f.model_version) == (1, 7, 3)
    assert sorted(f.params) == sorted(params)
    for name, want in params.items():
        got = f.params[name]
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        assert not got.flags.writeable
    big = f.params["model.layers.0.self_attn.q_proj.lora_A.weight"]
    # a view of the file's mapping (onnxruntime's writer aligns data to 4 bytes: enough for float32 / float16)
    assert not big.flags.owndata and big.flags.aligned
    # onnxruntime's own reader sees the same tensors in the file we parsed ourselves.
    theirs = ort.AdapterFormat.read_adapter(str(path))
    assert (theirs.get_adapter_version(), theirs.get_model_version()) == (7, 3)
    for name, value in theirs.get_parameters().items():
        np.testing.assert_array_equal(value.numpy(), params[name])
    assert [p.name for p in tmp_path.iterdir()] == ["a.onnx_adapter"]  # no temporary left behind


def test_float16_adapter(tiny, llama, tmp_path):
    model, folder = llama
    adapter = tiny.adapter(model, "qv")
    ref = hf_logits(model, FULL, adapter)
    # A float16 model's LoRA inputs are float16: the converted file (dtype taken from --model) fits it.
    fp16 = tiny.export(model, "fp16", adapter_path=[adapter], precision="fp16")
    out16 = convert_adapter(adapter, tmp_path / "m16.onnx_adapter", model=fp16)
    assert {a.dtype for a in read_onnx_adapter(out16).values()} == {np.dtype(np.float16)}
    prefill, _ = AdapterDecoder(fp16, out16).run(ROWS, DECODE)
    got = np.concatenate([prefill[i].ravel() for i in range(2)])
    want = np.concatenate([ref[i][: len(r)].ravel() for i, r in enumerate(ROWS)])
    corr = np.corrcoef(got, want)[0, 1]
    print(f"float16 model + float16 adapter: logits correlation with fp32 PEFT {corr:.5f}")
    assert corr > 0.999  # as test_export's fp16 model check

    # A float16 file and a float32 model: refused at convert time (onnxruntime and genai would reject it) ...
    with pytest.raises(AdapterError, match="--dtype float16, but the model's LoRA inputs are float32"):
        convert_adapter(adapter, tmp_path / "no.onnx_adapter", dtype="float16", model=folder)
    assert not (tmp_path / "no.onnx_adapter").exists()
    # ... and cast by the ortlora runtime path (model_feeds), at a looser tolerance.
    out = convert_adapter(adapter, tmp_path / "h.onnx_adapter", dtype="float16")
    params = read_onnx_adapter(out)
    with pytest.raises(AdapterError, match="mis-typed"):
        check_adapter(params, model_lora_inputs(folder), str(out))
    feeds = model_feeds(params, model_lora_inputs(folder), str(out), allow_cast=True)
    assert {a.dtype for a in feeds.values()} == {np.dtype(np.float32)}
    err = max_diff(OnnxDecoder(folder, feeds), ref)
    print(f"float16 adapter cast into the float32 model: max |logits - PEFT| {err:.2e}")
    assert err <= ATOL_FP16_ADAPTER


def test_cli_and_inspect(tiny, llama, tmp_path):
    model, folder = llama
    a, b = tiny.adapter(model, "qv"), tiny.adapter(model, "rslora", **ADAPTERS["rslora"])
    cmd = [sys.executable, "-m", "ortlora.cli", "convert-adapters", "--adapter_path", str(a), "--adapter_path", str(b),
           "--output_path", str(tmp_path / "out"), "--model", str(folder),
           "--adapter_format", "onnx_adapter", "--log_level", "1"]  # Olive's flags, accepted as they are
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == sorted([a.name + ".onnx_adapter", b.name + ".onnx_adapter"])

    info = describe(tmp_path / "out" / (b.name + ".onnx_adapter"))
    assert info["lora_targets"] == ["o_proj", "q_proj", "up_proj"] and info["ranks"] == {
        "o_proj": [8], "q_proj": [8], "up_proj": [8]}
    assert info["lora_modules"] == 6 and info["dtype"] == ["float32"] and info["adapter_version"] == 1
    assert info["parameters"] == sum(m.a.size + m.b.size for m in read_peft(b).modules.values())
    m = describe(folder)
    assert m["architecture"] == "llama" and m["precision"] == "fp32" and m["lora_modules"] == 14
    assert m["lora_targets"] == sorted(targets_for("llama"))
    assert 100_000 < m["parameters"] < 200_000  # tiny llama: embed 320x64 + 2 layers + head
    text = inspect(folder)
    assert "architecture" in text and "llama" in text and "down_proj" in text
    assert describe(a)["kind"] == "peft" and describe(a)["ranks"] == {"q_proj": [4], "v_proj": [4]}


def test_pytorch_bin_adapter_reads_like_safetensors(tiny, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    model = tiny.model("llama")
    st = tiny.adapter(model, "qv")
    binary = tmp_path / "bin"
    shutil.copytree(st, binary)
    torch.save(load_file(binary / "adapter_model.safetensors"), binary / "adapter_model.bin")
    (binary / "adapter_model.safetensors").unlink()
    want = read_onnx_adapter(convert_adapter(st, tmp_path / "st.onnx_adapter"))
    got = read_onnx_adapter(convert_adapter(binary, tmp_path / "bin.onnx_adapter"))
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_interrupted_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "a.onnx_adapter"
    old = {"m.lora_A.weight": np.ones((4, 1), np.float32), "m.lora_B.weight": np.ones((1, 4), np.float32)}
    write_onnx_adapter(path, old)
    before = path.read_bytes()

    def fail(self, file_path):
        with open(file_path, "wb") as f:
            f.write(b"TORT half")
        raise KeyboardInterrupt

    monkeypatch.setattr(ort.AdapterFormat, "export_adapter", fail)
    with pytest.raises(KeyboardInterrupt):
        write_onnx_adapter(path, {k: v * 2 for k, v in old.items()})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["a.onnx_adapter"]


# -- bad input: one clear error each, no output file ------------------------------------------------------------

def _no_output(tmp_path, name="x.onnx_adapter"):
    return [p.name for p in tmp_path.iterdir() if p.name == name or p.name.startswith(".")] == []


def test_missing_or_corrupt_adapter_config(tiny, llama, tmp_path):
    import shutil

    model, folder = llama
    bad = tmp_path / "bad"
    shutil.copytree(tiny.adapter(model, "qv"), bad)
    out = tmp_path / "o"
    out.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="adapter_config.json is not valid JSON"):
        convert_adapter(bad, out / "x.onnx_adapter", model=folder)
    (bad / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        convert_adapter(bad, out / "x.onnx_adapter")
    assert _no_output(out)


def test_bad_adapter_files(tmp_path):
    good = write_onnx_adapter(tmp_path / "good.onnx_adapter",
                              {"m.lora_A.weight": np.ones((8, 2), np.float32), "m.lora_B.weight": np.ones((2, 4),
                                                                                                       np.float32)})
    data = good.read_bytes()
    cases = {"empty": b"", "truncated": data[: len(data) // 2], "random": np.random.default_rng(0).bytes(300),
             "header only": data[:8], "wrong identifier": data[:4] + b"XXXX" + data[8:]}
    for label, content in cases.items():
        path = tmp_path / f"{label}.onnx_adapter"
        path.write_bytes(content)
        with pytest.raises(AdapterError, match="onnx_adapter") as exc:
            read_onnx_adapter(path)
        assert str(path) in str(exc.value), label
    with pytest.raises(AdapterError, match="no such adapter file"):
        read_onnx_adapter(tmp_path / "missing.onnx_adapter")
    with pytest.raises(AdapterError, match="is a folder"):
        read_onnx_adapter(tmp_path)
    run = subprocess.run([sys.executable, "-m", "ortlora.cli", "inspect", str(tmp_path / "random.onnx_adapter")],
                         capture_output=True, text=True)
    assert run.returncode == 1 and "not a valid .onnx_adapter file" in run.stderr and "Traceback" not in run.stderr


def test_adapter_for_another_base_model(tiny, llama, tmp_path):
    model, folder = llama
    other = tiny.model("llama", hidden_size=32, intermediate_size=96)
    adapter = tiny.adapter(other, "qv-other", target_modules=("q_proj", "v_proj", "down_proj"))
    with pytest.raises(AdapterError) as exc:
        convert_adapter(adapter, tmp_path / "x.onnx_adapter", model=folder)
    msg = str(exc.value)
    # Every misfit at once: q/v A [32, r] against [64, lora_r] and down_proj A [96, r] against [128, lora_r], ...
    for layer in (0, 1):
        for module in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"):
            assert f"mis-shaped: model.layers.{layer}.{module}.lora_A.weight" in msg
    assert "(12 problems)" in msg and str(adapter) in msg
    assert _no_output(tmp_path)
    # the CLI says the same, without a traceback, and writes nothing
    run = subprocess.run([sys.executable, "-m", "ortlora.cli", "convert-adapters", "-a", str(adapter), "-o",
                          str(tmp_path / "x.onnx_adapter"), "--model", str(folder)], capture_output=True, text=True)
    assert run.returncode == 1 and "does not fit the model" in run.stderr and "Traceback" not in run.stderr
    assert _no_output(tmp_path)


def test_non_lora_adapters_and_dora_without_its_inputs_are_refused(tiny, tmp_path):
    import torch
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    model = tiny.model("llama")
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    get_peft_model(base, IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])) \
        .save_pretrained(tmp_path / "ia3")
    with pytest.raises(AdapterError, match="PEFT type IA3 is not supported"):
        convert_adapter(tmp_path / "ia3", tmp_path / "x.onnx_adapter")
    dora = tiny.adapter(model, "dora", use_dora=True)
    # DoRA runs (tests/test_adapter_variants.py) on a model exported with its inputs; without the model's weights,
    # or on a model without them, it is refused with what to do
    from ortlora.quantize import quantize

    with pytest.raises(AdapterError, match="DoRA adapter's factor .* needs the base model's weights.*--model"):
        convert_adapter(dora, tmp_path / "x.onnx_adapter")
    plain = tiny.export(model, "plain-qv", lora_targets=["q_proj", "v_proj"])
    for run in (lambda: convert_adapter(dora, tmp_path / "x.onnx_adapter", model=plain),
                lambda: quantize(plain, tmp_path / "x", adapter_path=[dora], progress=False)):
        with pytest.raises(AdapterError, match="is a DoRA adapter, but the model was exported without DoRA inputs"):
            run()
    assert _no_output(tmp_path) and not (tmp_path / "x").exists()


def test_several_adapters_one_bad_writes_nothing(tiny, llama, tmp_path):
    model, folder = llama
    good = tiny.adapter(model, "qv")
    (tmp_path / "nope").mkdir()
    with pytest.raises(AdapterError, match="nope has no adapter_config.json"):
        convert_adapters([good, tmp_path / "nope"], tmp_path / "out", model=folder)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_check_lists_every_problem():
    inputs = {n: LoraInput(n, np.dtype(np.float32), s) for n, s in (
        ("model.layers.0.self_attn.q_proj.lora_A.weight", (64, "lora_r")),
        ("model.layers.0.self_attn.q_proj.lora_B.weight", ("lora_r", 64)),
        ("model.layers.0.mlp.up_proj.lora_A.weight", (64, "lora_r")),
        ("model.layers.0.mlp.up_proj.lora_B.weight", ("lora_r", 128)))}
    params = {
        "model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((64, 4), np.float32),
        "model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((2, 64), np.float32),  # rank 2 vs 4
        "model.layers.0.mlp.up_proj.lora_A.weight": np.zeros((64, 4), np.float16),  # dtype
        "model.layers.0.mlp.up_proj.lora_B.weight": np.zeros((4, 96), np.float32),  # out 96 vs 128
        "model.layers.0.self_attn.k_proj.lora_A.weight": np.zeros((64, 4), np.float32),  # extra, and B missing
        "lm_head.weight": np.zeros((4, 4), np.float32),  # not a LoRA name
    }
    with pytest.raises(AdapterError) as exc:
        check_adapter(params, inputs, "my.onnx_adapter")
    msg = str(exc.value)
    assert msg.startswith("my.onnx_adapter does not fit the model (6 problems)")
    for part in ("rank 4 in lora_A [64, 4] but 2 in lora_B", "mis-typed: model.layers.0.mlp.up_proj.lora_A.weight",
                 "mis-shaped: model.layers.0.mlp.up_proj.lora_B.weight is [4, 96], the model wants [lora_r, 128]",
                 "extra: model.layers.0.self_attn.k_proj.lora_A.weight is not an input",
                 "missing: model.layers.0.self_attn.k_proj.lora_B.weight", "extra: lm_head.weight"):
        assert part in msg, part
    check_adapter({k: v for k, v in params.items() if "q_proj" in k and "A" in k} | {
        "model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((4, 64), np.float32)}, inputs, "subset")
