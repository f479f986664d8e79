"""`ortlora quantize`: weights packed right, LoRA inputs untouched, adapters still steer a quantized model,
onnxruntime-genai loads the result, and bad input fails cleanly.

The adapter tests use a small llama trained for a few seconds: base on one text, a LoRA adapter on another
(`trained` fixture), so greedy decoding is confident and a change of tokens means something.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from ortlora.adapters import read_params
from ortlora.errors import AdapterError, ModelError, OrtloraError
from ortlora.quantize import REPORT, quantize
from ortlora.quantize.algorithms import gptq, rtn
from ortlora.quantize.data import load_text

GREEDY_TOKENS = 32


def _session(folder: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])


def _logits(sess, ids: list[int], feeds: dict) -> np.ndarray:
    past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
            for i in sess.get_inputs() if i.name.startswith("past_key_values")}
    x = np.array([ids], np.int64)
    return sess.run(["logits"], {"input_ids": x, "attention_mask": np.ones_like(x), **past, **feeds})[0][0]


def _greedy(sess, prompt: list[int], n: int, feeds: dict) -> list[int]:
    """Greedy decoding by re-running the whole sequence each step: no KV cache, nothing shared with genai."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(_logits(sess, ids, feeds)[-1].argmax()))
    return ids[len(prompt):]


def _initializers(folder: Path) -> dict[str, np.ndarray]:
    graph = onnx.load(str(folder / "model.onnx")).graph
    return {t.name: numpy_helper.to_array(t, str(folder)) for t in graph.initializer}


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


# -- the weight algorithms -----------------------------------------------------------------------------------

def _dequantize(p, k: int, n: int, bits: int, block: int) -> np.ndarray:
    """What onnxruntime's MatMulNBits multiplies by: run it on the identity (accuracy_level 0: fp32 math)."""
    inputs = ["x", "q", "s"] + (["z"] if p.zeros is not None else [])
    inits = [numpy_helper.from_array(p.qweight, "q"), numpy_helper.from_array(p.scales, "s")]
    inits += [numpy_helper.from_array(p.zeros, "z")] if p.zeros is not None else []
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=k, N=n, bits=bits, block_size=block)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": np.eye(k, dtype=np.float32)})[0]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_packs_for_matmulnbits_and_beats_rtn(bits, symmetric):
    rng = np.random.default_rng(0)
    k, n, block = 96, 24, 32  # K not a multiple of 64: exercises padding at block 64 below
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = (rng.standard_normal((800, k)) @ rng.standard_normal((k, k))).astype(np.float32)  # correlated inputs
    # With H = I there is nothing to compensate: GPTQ must reproduce onnxruntime's RTN grid exactly.
    for b in (block, 64):
        same = _dequantize(gptq(w, np.eye(k), bits, b, symmetric), k, n, bits, b)
        assert np.abs(same - _dequantize(rtn(w, bits, b, symmetric), k, n, bits, b)).max() < 1e-5
    # With H = x^T x it must cut the layer's output error (measured: by 27-32%, all four settings).
    err_gptq = np.linalg.norm(x @ (_dequantize(gptq(w, x.T.astype(np.float64) @ x, bits, block, symmetric), k, n,
                                               bits, block) - w))
    err_rtn = np.linalg.norm(x @ (_dequantize(rtn(w, bits, block, symmetric), k, n, bits, block) - w))
    print(f"int{bits} {'sym' if symmetric else 'asym'}: |x(Wq - W)| gptq {err_gptq:.1f} rtn {err_rtn:.1f}")
    assert err_gptq < 0.85 * err_rtn


@pytest.mark.parametrize("algorithm", ["rtn", "gptq"])
@pytest.mark.parametrize("transposed", [False, True])
def test_column_slices_equal_whole_weight(monkeypatch, algorithm, transposed):
    from ortlora.quantize import algorithms

    rng = np.random.default_rng(1)
    w = rng.standard_normal((40, 96) if transposed else (96, 40)).astype(np.float32)  # logical [K=96, N=40]
    x = rng.standard_normal((300, 96))
    kw = dict(algorithm=algorithm, bits=4, block_size=32, symmetric=False, hessian=x.T @ x, transposed=transposed)
    whole = algorithms.quantize_weight(w, **kw)
    monkeypatch.setattr(algorithms, "_CHUNK_BYTES", 96 * 4 * 7)  # 7 columns per slice: 6 slices, a ragged last
    sliced = algorithms.quantize_weight(w, **kw)
    for a, b in zip((whole.qweight, whole.scales, whole.zeros), (sliced.qweight, sliced.scales, sliced.zeros)):
        assert a.shape == b.shape and np.array_equal(a, b)
    assert whole.qweight.shape == (40, 3, 16)


def test_text_from_records(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"q": "two plus two?", "a": "four"}\n{"q": "capital of France?", "a": "Paris"}\n')
    assert load_text(path, "Q: {q} A: {a}") == "Q: two plus two? A: four\n\nQ: capital of France? A: Paris"
    with pytest.raises(OrtloraError, match=r"record 0 has no field 'answer' \(it has: q, a\)"):
        load_text(path, "{answer}")
    with pytest.raises(OrtloraError, match="does not exist"):
        load_text(tmp_path / "missing.txt")


def test_hessians_in_several_passes_equal_one_pass(tiny):
    """GPTQ's statistics under a memory budget (one activation per pass) equal the one-pass ones, and equal
    x^T x of the activations computed directly."""
    from ortlora.quantize.data import token_windows
    from ortlora.quantize.evaluate import Hessians, Runner
    from ortlora.quantize.rewrite import Settings, SourceModel, find_targets

    folder = tiny.export(tiny.model("llama"))
    src = SourceModel(folder)
    targets = [t for t in find_targets(src, Settings()) if t.kind == "matmul"]
    order = [t.activation for t in targets]
    sizes = {t.activation: t.shape[0] for t in targets}
    windows = token_windows(folder, load_text(None), 64, 3)
    one, many = Hessians(folder, windows, order, sizes), Hessians(folder, windows, order, sizes, budget_bytes=1)
    got_one, got_many = [one(a) for a in order], [many(a) for a in order]
    assert one.passes == 1 and many.passes == len(set(order)) == 9  # 4 distinct activations per layer + lm_head
    assert not one.ready and not many.ready  # each H dropped after its last MatMul
    for a, b in zip(got_one, got_many):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    runner = Runner(folder, extra_outputs=[order[-1]])
    xs = [runner.sess.run([order[-1]], runner.feeds(w))[0].reshape(-1, 64).astype(np.float64) for w in windows]
    np.testing.assert_allclose(got_one[-1], sum(x.T @ x for x in xs), rtol=1e-10)
    src.close()


# -- an HF checkpoint gives exactly what `export --precision int4|int8` gives ------------------------------

@pytest.mark.parametrize("precision", ["int4", "int8"])
@pytest.mark.parametrize("arch,kw", [("llama", {}), ("qwen2", {"tie_word_embeddings": True})])
def test_hf_input_equals_export(tiny, tmp_path, arch, kw, precision):
    model = tiny.model(arch, **kw)
    adapter = tiny.adapter(model, "qv")
    want = _initializers(tiny.export(model, f"{precision}-qv", adapter_path=[adapter], precision=precision))
    out = quantize(model, tmp_path / "q", precision=precision, adapter_path=[adapter], eval_samples=1,
                   progress=False)
    got = _initializers(out)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name]), name
    assert _leftovers(tmp_path) == []  # the temporary fp32 export is gone


# -- a trained model: LoRA inputs untouched, adapter still steers ------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A llama (hidden 128) trained on CORPUS, a LoRA adapter trained on other text, and its fp32 export."""
    from ortlora.export import export
    from ortlora.testing import CORPUS, build_model, synthetic_text, train_adapter, train_model

    root = tmp_path_factory.mktemp("quantize-trained")
    adapter_text = synthetic_text(4, seed=3)
    model = build_model(root / "hf", "llama", hidden_size=128, intermediate_size=256)
    train_model(model, CORPUS * 4, steps=100, batch=8, lr=1e-2)
    adapter = train_adapter(model, root / "peft", adapter_text * 4, steps=150, batch=8)
    folder = export(model, root / "fp32", adapter_path=[adapter], progress=False)
    (root / "text.txt").write_text(CORPUS + "\n" + adapter_text)
    return dict(root=root, model=model, adapter=adapter, folder=folder, text=adapter_text, data=root / "text.txt")


def _lora_tensors(folder: Path) -> dict:
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    inputs = {i.name: i.SerializeToString() for i in proto.graph.input}
    defaults = {t.name: t.SerializeToString() for t in proto.graph.initializer if ".lora_" in t.name}
    return {"inputs": inputs, "defaults": defaults}


@pytest.mark.parametrize("precision,algorithm", [("int4", "rtn"), ("int4", "hqq"), ("int4", "gptq"), ("int8", "rtn")])
def test_adapter_steers_quantized_model_like_fp32(trained, tmp_path, precision, algorithm):
    from tokenizers import Tokenizer

    folder, adapter = trained["folder"], trained["adapter"]
    data = trained["data"] if algorithm == "gptq" else None
    out = quantize(folder, tmp_path / "q", precision=precision, algorithm=algorithm, adapter_path=[adapter],
                   data=data, progress=False)

    # The graph's inputs (LoRA ones included) and the LoRA default initializers are byte-identical.
    before, after = _lora_tensors(folder), _lora_tensors(out)
    assert after == before and len(before["defaults"]) == 12  # q, v, down_proj x 2 layers x A/B
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    quantized_op = "MatMulNBits" if precision == "int4" else "MatMulIntegerToFloat"
    ops = [(n.op_type, n.input[1]) for n in proto.graph.node if n.op_type in ("MatMul", quantized_op)]
    assert all(".lora_" in b for op, b in ops if op == "MatMul")  # only the LoRA MatMuls stay float
    assert sum(op == quantized_op for op, _ in ops) == 15  # 7 linears x 2 layers + lm_head
    assert json.loads((out / "ortlora.json").read_text())["precision"] == precision
    assert json.loads((out / "genai_config.json").read_text()) == json.loads((folder / "genai_config.json").read_text())

    # The adapter changes greedy tokens, and changes them the same way on the quantized model: along fp32+adapter's
    # greedy text, the quantized model + adapter picks the same next token. (Teacher-forced: a free-running
    # comparison compounds one early near-tie into a different text, which says nothing about later steps.)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = tok.encode(trained["text"]).ids
    feeds = read_params(adapter)
    ref_s, q_s = _session(folder), _session(out)
    agree = changed = total = 0
    for start in (0, 40, 80):
        prompt = ids[start:start + 8]
        want = np.array(_greedy(ref_s, prompt, GREEDY_TOKENS, feeds))
        got = _logits(q_s, prompt + want[:-1].tolist(), feeds)[len(prompt) - 1:].argmax(-1)
        base = _logits(ref_s, prompt + want[:-1].tolist(), {})[len(prompt) - 1:].argmax(-1)
        agree += int((want == got).sum())
        changed += int((want != base).sum())
        total += GREEDY_TOKENS
    print(f"{precision} {algorithm}: next tokens with the adapter agree with fp32+adapter on {agree}/{total}; "
          f"the adapter changes {changed}/{total} of fp32's base next tokens")
    assert changed >= 0.5 * total  # the adapter steers: without it, the model picks other tokens on this text
    assert agree >= 0.9 * total

    report = json.loads((out / REPORT).read_text())
    assert [r["adapter"] for r in report["results"]] == [None, str(adapter)]
    assert report["size_bytes"]["after"] < report["size_bytes"]["before"] / (3 if precision == "int4" else 1.7)
    for r in report["results"]:
        assert 0.8 <= r["top1_agreement"] <= 1 and r["mean_kl"] >= -1e-6
        assert r["quantized"]["perplexity"] < 1.5 * r["reference"]["perplexity"]


def test_onnxruntime_genai_generates_with_and_without_adapter(trained, tmp_path):
    og = pytest.importorskip("onnxruntime_genai")
    from ortlora.adapters.onnx_adapter import write_onnx_adapter

    out = quantize(trained["folder"], tmp_path / "q", eval_samples=0, progress=False)
    adapter_file = write_onnx_adapter(tmp_path / "a.onnx_adapter", read_params(trained["adapter"]))
    m = og.Model(str(out))
    adapters = og.Adapters(m)
    adapters.load(str(adapter_file), "a")
    prompt = [int(t) for t in og.Tokenizer(m).encode(trained["text"][:30])]
    q_s = _session(out)
    for name, feeds in ((None, {}), ("a", read_params(trained["adapter"]))):
        params = og.GeneratorParams(m)
        params.set_search_options(min_length=len(prompt) + 16, max_length=len(prompt) + 16, do_sample=False)
        gen = og.Generator(m, params)
        if name:
            gen.set_active_adapter(adapters, name)
        gen.append_tokens(prompt)
        tokens = []
        while not gen.is_done():
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
        assert tokens == _greedy(q_s, prompt, 16, feeds), name


def test_options_embeddings_lm_head_fp16_and_cli(tiny, tmp_path, capsys):
    from ortlora.cli import main

    model = tiny.model("llama")
    adapter = tiny.adapter(model, "qv")
    fp16 = tiny.export(model, "fp16-qv", adapter_path=[adapter], precision="fp16")
    assert main(["quantize", "-m", str(fp16), "-o", str(tmp_path / "q"), "--adapter", str(adapter), "--lm_head",
                 "keep", "--quantize_embeddings", "--symmetric", "--block_size", "64", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "int4 rtn block 64 sym, lm_head float, embeddings int4" in printed and "(none)" in printed
    proto = onnx.load(str(tmp_path / "q" / "model.onnx"), load_external_data=False)
    ops = {n.op_type for n in proto.graph.node}
    inits = {t.name: t for t in proto.graph.initializer}
    assert "GatherBlockQuantized" in ops and "model.embed_tokens.weight" not in inits
    assert "lm_head.MatMul.weight" in inits and "model.embed_tokens.GatherBlockQuantized.qzeros" not in inits
    assert inits["model.layers.0.self_attn.q_proj.MatMulNBits.scales"].data_type == TensorProto.FLOAT16
    report = json.loads((tmp_path / "q" / REPORT).read_text())
    assert report["results"][0]["top1_agreement"] > 0.3  # a random tiny model: logits nearly flat


# -- bad input: one clear error, nothing written ---------------------------------------------------------------

def test_bad_options_are_listed_together(tiny, tmp_path):
    folder = tiny.export(tiny.model("llama"))
    with pytest.raises(OrtloraError) as err:
        quantize(folder, tmp_path / "q", precision="int3", algorithm="awq", block_size=48)
    msg = str(err.value)
    assert "precision 'int3' is not supported" in msg and "algorithm 'awq' is unknown" in msg
    assert "block size 48 is invalid: it must be a power of two of at least 16" in msg
    for kw, text in [(dict(block_size=8), "block size 8 is invalid"), (dict(block_size=0), "block size 0"),
                     (dict(algorithm="gptq"), "gptq needs calibration text"),
                     (dict(algorithm="hqq", precision="int8"), "hqq is an int4 algorithm"),
                     (dict(algorithm="gptq", precision="int8", data=__file__), "gptq is an int4 algorithm"),
                     (dict(precision="int8", embeddings=True), "embedding quantization"),
                     (dict(adapter_path=[tmp_path / "nope"]), "not a PEFT adapter folder")]:
        with pytest.raises(OrtloraError, match=text):
            quantize(folder, tmp_path / "q", **kw)
    with pytest.raises(OrtloraError, match="is the input folder or inside it"):
        quantize(folder, folder / "q")
    assert not (tmp_path / "q").exists() and _leftovers(tmp_path) == [] and not (folder / "q").exists()
    (tmp_path / "file").write_text("keep")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    for out, text in (("file", "is a file"), ("mine", "holds other files")):
        with pytest.raises(OrtloraError, match=text):
            quantize(folder, tmp_path / out)
    assert (tmp_path / "file").read_text() == (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_already_quantized_models_are_refused(tiny, tmp_path):
    model = tiny.model("llama")
    int4 = tiny.export(model, "int4", precision="int4")
    with pytest.raises(ModelError, match=r"already quantized \(int4, says ortlora.json\)"):
        quantize(int4, tmp_path / "q")
    # A graph with MatMulNBits but a manifest that says fp32 (e.g. quantized by another tool) is caught too.
    ours = quantize(tiny.export(model), tmp_path / "q1", eval_samples=0, progress=False)
    manifest = json.loads((ours / "ortlora.json").read_text())
    (ours / "ortlora.json").write_text(json.dumps({**manifest, "precision": "fp32"}))
    with pytest.raises(ModelError, match=r"already quantized: it has 15 quantized nodes \(.*MatMulNBits"):
        quantize(ours, tmp_path / "q2")
    with pytest.raises(ModelError, match="neither model.onnx"):
        quantize(tmp_path, tmp_path / "q3")
    gptq_hf = tmp_path / "gptq-hf"
    gptq_hf.mkdir()
    (gptq_hf / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "gptq", "bits": 4}}))
    with pytest.raises(ModelError, match=r"already quantized checkpoint \(quantization_config: gptq\)"):
        quantize(gptq_hf, tmp_path / "q3")
    assert not (tmp_path / "q2").exists() and not (tmp_path / "q3").exists() and _leftovers(tmp_path) == []


def test_adapter_that_does_not_fit_writes_nothing(tiny, tmp_path):
    model = tiny.model("llama")
    folder = tiny.export(model, "fp32-qv", adapter_path=[tiny.adapter(model, "qv")])
    other = tiny.adapter(model, "mlp", target_modules=["down_proj"])
    with pytest.raises(AdapterError, match="down_proj.lora_A.weight is not an input of the model"):
        quantize(folder, tmp_path / "q", adapter_path=[other])
    assert not (tmp_path / "q").exists() and _leftovers(tmp_path) == []


def test_cli_reports_errors(tiny, tmp_path, capsys):
    from ortlora.cli import main

    folder = tiny.export(tiny.model("llama"))
    assert main(["quantize", "-m", str(folder), "-o", str(tmp_path / "q"), "--block_size", "12"]) == 1
    assert "ortlora quantize: error: cannot quantize:\n  block size 12 is invalid" in capsys.readouterr().err
    # (--algorithm awq, Olive's, is refused with its reason: tests/test_olive_flags.py)
    assert not (tmp_path / "q").exists()
