"""`ortlora export`: ONNX logits against transformers/PEFT, int4/fp16, onnxruntime-genai, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from ortlora.adapters.peft import read_peft
from ortlora.errors import AdapterError, ModelError, OrtloraError
from ortlora.export import export
from ortlora.testing import ARCHITECTURES
from reference import OnnxDecoder, hf_greedy, hf_logits, targets_for

# Two right-padded rows of different lengths, then 3 decode steps through the KV cache (teacher-forced tokens).
ROWS = [[5, 17, 33, 9, 81, 100, 7], [12, 40, 66, 3]]
DECODE = [[11, 22, 33], [44, 55, 66]]
FULL = [r + d for r, d in zip(ROWS, DECODE)]
# fp32 tolerance: observed max |diff| is 1e-6..5e-5 (LoRA weights of std 0.3 make activations large); GQA and
# the fused norms sum in a different order from torch's eager path.
ATOL = 1e-4
# Model overrides per architecture beyond ortlora.testing's: tied embeddings where the family ties them.
OVERRIDES = {"gemma2": {"tie_word_embeddings": True}, "qwen2": {"tie_word_embeddings": True}}


def onnx_vs_reference(folder, ref, feeds=None):
    """Max |diff| of prefill and decode logits of the exported model against per-row reference logits."""
    prefill, steps = OnnxDecoder(folder, feeds).run(ROWS, DECODE)
    err = max(np.abs(prefill[i] - ref[i][: len(r)]).max() for i, r in enumerate(ROWS))
    for t, step in enumerate(steps):
        err = max(err, max(np.abs(step[i] - ref[i][len(r) + t]).max() for i, r in enumerate(ROWS)))
    return err


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logits_match_transformers_and_peft(tiny, arch):
    model = tiny.model(arch, **OVERRIDES.get(arch, {}))
    adapter = tiny.adapter(model, "all", target_modules=targets_for(arch))
    folder = tiny.export(model, "lora", adapter_path=[adapter])

    base_ref = hf_logits(model, FULL)
    peft_ref = hf_logits(model, FULL, adapter)
    # The adapter must matter, or the adapter comparison below proves nothing.
    assert max(np.abs(b - p).max() for b, p in zip(base_ref, peft_ref)) > 0.1

    assert onnx_vs_reference(folder, base_ref) <= ATOL  # no adapter inputs fed: the rank-0 defaults = base model
    assert onnx_vs_reference(folder, peft_ref, read_peft(adapter).onnx_tensors()) <= ATOL


def test_every_bias_of_the_checkpoint_is_used(tiny, tmp_path):
    """Llama with attention_bias (q, k, v and o_proj) and mlp_bias (gate, up, down): random biases (transformers
    initializes them to zero, which would hide a dropped one) give the same logits as transformers, with and
    without an adapter on the biased layers."""
    from safetensors.numpy import load_file, save_file

    model = tmp_path / "biased"
    shutil.copytree(tiny.model("llama", attention_bias=True, mlp_bias=True), model)
    weights = load_file(model / "model.safetensors")
    rng = np.random.default_rng(0)
    biases = [k for k in weights if k.endswith(".bias")]
    assert len(biases) == 2 * 7  # q, k, v, o, gate, up, down of 2 layers
    save_file({k: rng.normal(0, 0.5, v.shape).astype(v.dtype) if k in biases else v for k, v in weights.items()},
              model / "model.safetensors", metadata={"format": "pt"})
    adapter = tiny.adapter(model, "biased", target_modules=["o_proj", "gate_proj", "down_proj"])
    folder = export(model, tmp_path / "out", adapter_path=[adapter], progress=False)
    assert onnx_vs_reference(folder, hf_logits(model, FULL)) <= ATOL
    assert onnx_vs_reference(folder, hf_logits(model, FULL, adapter), read_peft(adapter).onnx_tensors()) <= ATOL


def test_bf16_checkpoint(tiny):
    model = tiny.model("llama", dtype="bfloat16")
    folder = tiny.export(model)
    assert onnx_vs_reference(folder, hf_logits(model, FULL)) <= ATOL  # transformers upcasts the same bf16 values


def test_num_logits_to_keep_and_lora_targets_flag(tiny):
    model = tiny.model("qwen3")
    folder = tiny.export(model, "targets", lora_targets=["q_proj", "down_proj"])
    graph = onnx.load(folder / "model.onnx", load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    lora = sorted(i.name for i in graph.input if ".lora_" in i.name)
    assert lora == sorted(f"model.layers.{i}.{m}.lora_{ab}.weight" for i in range(2)
                          for m in ("self_attn.q_proj", "mlp.down_proj") for ab in "AB")
    assert set(lora) <= inits  # every LoRA input has a default
    manifest = json.loads((folder / "ortlora.json").read_text())
    assert manifest["lora_targets"] == ["down_proj", "q_proj"] and manifest["precision"] == "fp32"

    dec = OnnxDecoder(folder)
    ids = np.array([ROWS[0]], np.int64)
    past = {n: np.zeros((1, dec.kv_heads, 0, dec.head_dim), np.float32) for n in dec.past_names}
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), **past}
    full = dec.sess.run(["logits"], feeds)[0]
    last = dec.sess.run(["logits"], {**feeds, "num_logits_to_keep": np.array(1, np.int64)})[0]
    assert full.shape[1] == len(ROWS[0]) and last.shape[1] == 1
    np.testing.assert_allclose(last[0, 0], full[0, -1], atol=1e-5)


@pytest.mark.parametrize("precision", ["int4", "fp16"])
def test_reduced_precision_tracks_fp32(tiny, precision):
    model = tiny.model("llama")
    adapter = tiny.adapter(model, "qv")
    folder = tiny.export(model, precision, adapter_path=[adapter], precision=precision)
    graph = onnx.load(folder / "model.onnx", load_external_data=False).graph
    lora_types = {i.type.tensor_type.elem_type for i in graph.input if ".lora_" in i.name}
    ops = {n.op_type for n in graph.node}
    if precision == "int4":
        assert lora_types == {onnx.TensorProto.FLOAT} and "MatMulNBits" in ops  # LoRA path stays float
    else:
        assert lora_types == {onnx.TensorProto.FLOAT16}
    dtype = np.float16 if precision == "fp16" else np.float32
    feeds = {k: v.astype(dtype) for k, v in read_peft(adapter).onnx_tensors().items()}
    ref = hf_logits(model, FULL, adapter)
    prefill, steps = OnnxDecoder(folder, feeds).run(ROWS, DECODE)
    got = np.concatenate([prefill[0].ravel(), prefill[1].ravel(), *[s.ravel() for st in steps for s in st]])
    want = np.concatenate([ref[0][:7].ravel(), ref[1][:4].ravel(),
                           *[ref[i][len(ROWS[i]) + t].ravel() for t in range(3) for i in range(2)]])
    corr = np.corrcoef(got, want)[0, 1]
    print(f"{precision}: logits correlation with fp32 transformers+PEFT = {corr:.5f}")
    assert corr > (0.999 if precision == "fp16" else 0.95)


def test_onnxruntime_genai_greedy_equals_transformers(tiny):
    og = pytest.importorskip("onnxruntime_genai")
    model = tiny.model("qwen2", **OVERRIDES["qwen2"])
    folder = tiny.export(model)
    config = json.loads((folder / "genai_config.json").read_text())
    assert config["model"]["decoder"]["session_options"]["intra_op_num_threads"] >= 1
    m = og.Model(str(folder))
    prompt = [int(t) for t in og.Tokenizer(m).encode("The quick brown fox")]
    params = og.GeneratorParams(m)
    params.set_search_options(max_length=len(prompt) + 12, do_sample=False)
    gen = og.Generator(m, params)
    gen.append_tokens(prompt)
    tokens = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    assert tokens == hf_greedy(model, prompt, 12)


# -- bad input: one clear error each, nothing left behind ------------------------------------------------------

def _leftovers(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_not_a_model_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        export(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ModelError, match="no such folder"):
        export(tmp_path / "Qwen/Qwen2.5-0.5B", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_shard(tiny, tmp_path):
    src = tiny.model("llama")
    bad = tmp_path / "sharded"
    shutil.copytree(src, bad)
    (bad / "model.safetensors").rename(bad / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors",
                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="model-00002-of-00002.safetensors"):
        export(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_unsupported_architecture(tiny, tmp_path):
    bad = tmp_path / "gpt2ish"
    shutil.copytree(tiny.model("llama"), bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    with pytest.raises(ModelError, match=r"gpt_neox.*supported: gemma2, llama, mistral, phi3, qwen2, qwen3"):
        export(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_adapter_for_another_base(tiny, tmp_path):
    model = tiny.model("llama")
    other = tiny.model("llama", hidden_size=32)
    wrong = tiny.adapter(other, "qv")
    with pytest.raises(AdapterError) as err:
        export(model, tmp_path / "out", adapter_path=[wrong], progress=False)
    msg = str(err.value)
    # every misfit is listed at once: q_proj and v_proj of both layers
    assert msg.count("another base model") == 4 and "model.layers.1.self_attn.v_proj" in msg
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_bad_flags(tiny, tmp_path):
    model = tiny.model("llama")
    with pytest.raises(AdapterError, match="lm_head is not supported"):
        export(model, tmp_path / "out", lora_targets=["lm_head"])
    with pytest.raises(AdapterError, match="no linear layer of the model is called qkv_proj"):
        export(model, tmp_path / "out", lora_targets=["qkv_proj"])
    with pytest.raises(OrtloraError, match="block size 48"):
        export(model, tmp_path / "out", precision="int4", block_size=48)
    with pytest.raises(OrtloraError, match="--context-length must be a positive integer, got -5"):
        export(model, tmp_path / "out", context_length=-5)
    with pytest.raises(OrtloraError, match="--threads must be a positive integer, got 0"):
        export(model, tmp_path / "out", threads=0)
    assert not (tmp_path / "out").exists()


def test_interrupted_export_leaves_previous_output(tiny, tmp_path, monkeypatch):
    from ortlora.export import decoder

    model = tiny.model("llama")
    out = export(model, tmp_path / "out", progress=False)
    before = (out / "model.onnx").read_bytes()

    def boom(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(decoder.DecoderBuilder, "lm_head", boom)  # interrupt mid-build, after the layers
    with pytest.raises(KeyboardInterrupt):
        export(model, out, progress=False, lora_targets=["q_proj"])
    assert (out / "model.onnx").read_bytes() == before and _leftovers(tmp_path) == []


def test_cli_accepts_olive_auto_opt_flags(tiny, tmp_path):
    model = tiny.model("llama")
    adapter = tiny.adapter(model, "qv")
    out = tmp_path / "olive"
    cmd = [sys.executable, "-m", "ortlora.cli", "auto-opt", "-m", str(model), "--adapter_path", str(adapter),
           "-o", str(out), "--device", "cpu", "--provider", "CPUExecutionProvider", "--use_ort_genai",
           "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "ortlora.json").read_text())["lora_targets"] == ["q_proj", "v_proj"]
    res = subprocess.run([sys.executable, "-m", "ortlora.cli", "export", "-m", str(tmp_path / "nope"), "-o",
                          str(tmp_path / "x")], capture_output=True, text=True)
    assert res.returncode == 1 and "no such folder" in res.stderr and "Traceback" not in res.stderr


def _cli(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "ortlora.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_output_that_is_a_file_or_a_foreign_folder(tiny, tmp_path):
    model = tiny.model("llama")
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    res = _cli("export", "-m", str(model), "-o", str(file), "--no-progress")
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert f"{file} is a file" in res.stderr and file.read_text() == "keep me"
    foreign = tmp_path / "home"
    (foreign / "docs").mkdir(parents=True)
    (foreign / "a.txt").write_text("mine")
    with pytest.raises(OrtloraError, match="holds other files .*refusing to replace it"):
        export(model, foreign, progress=False)
    assert sorted(p.name for p in foreign.iterdir()) == ["a.txt", "docs"] and _leftovers(tmp_path) == []


def _with_config(tiny, tmp_path, **changes):
    bad = tmp_path / "bad-config"
    shutil.copytree(tiny.model("llama"), bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, **changes}))
    return bad


def test_config_with_non_positive_sizes(tiny, tmp_path):
    bad = _with_config(tiny, tmp_path, hidden_size=0, num_attention_heads=-4, vocab_size=None)
    res = _cli("export", "-m", str(bad), "-o", str(tmp_path / "out"), "--no-progress")
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert "hidden_size=0, num_attention_heads=-4, vocab_size=None: each must be a positive integer" in res.stderr
    assert not (tmp_path / "out").exists()


def test_config_that_disagrees_with_the_tensors(tiny, tmp_path):
    """num_attention_heads 8 over 4-head weights (head_dim 16 in the config): q_proj and o_proj are half as wide as
    the config implies; every mismatched tensor is listed, nothing is written."""
    bad = _with_config(tiny, tmp_path, num_attention_heads=8)
    with pytest.raises(ModelError) as err:
        export(bad, tmp_path / "out", progress=False)
    msg = str(err.value)
    assert "does not match its config.json" in msg and "4 problems" in msg, msg
    for layer in (0, 1):
        p = f"mis-shaped: model.layers.{layer}.self_attn"
        assert f"{p}.q_proj.weight is [64, 64], config.json implies [128, 64]" in msg
        assert f"{p}.o_proj.weight is [64, 64], config.json implies [64, 128]" in msg
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    # sizes that change every matrix, and a tensor the config needs that is missing: all listed in one error
    bad = _with_config(tiny, tmp_path / "2", intermediate_size=96, num_hidden_layers=3)
    with pytest.raises(ModelError) as err:
        export(bad, tmp_path / "out", progress=False)
    msg = str(err.value)
    assert msg.count("mis-shaped: ") == 6 and "missing: model.layers.2.mlp.down_proj.weight" in msg, msg
    assert not (tmp_path / "out").exists()


_SLOW_SAVE = """
import sys, time
from pathlib import Path
from ortlora.export import graph

save = graph.GraphBuilder.save

def save_then_wait(self):  # the model is written into the temporary folder; wait there for the signal
    save(self)
    Path(sys.argv[1]).write_text("saved")
    time.sleep(120)

graph.GraphBuilder.save = save_then_wait
from ortlora.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_export_leaves_nothing(tiny, tmp_path, sig, code):
    """A real `ortlora export` process signalled while its temporary folder holds a written model: it exits with
    128 + signal, without a traceback, leaving no temporary and the previous output as it was."""
    model = tiny.model("llama")
    out = export(model, tmp_path / "out", progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # a shell's background job ignores SIGINT, and its children inherit that: give the process the default back
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, str(ready), "export", "-m", str(model), "-o", str(out),
                             "--lora-targets", "q_proj", "--no-progress"], env=env, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while not ready.exists() and time.time() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        temps = [p for p in tmp_path.iterdir() if p.name.startswith(".out.") and p.name.endswith(".tmp")]
        assert len(temps) == 1 and (temps[0] / "model.onnx").is_file()  # mid-export: the temporary folder is there
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code and "Traceback" not in err, err
    assert _leftovers(tmp_path) == [] and {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int4", "int8"])
def test_streamed_weights_are_the_whole_tensors_bytes(tiny, tmp_path, monkeypatch, precision):
    """Export reads, converts, transposes and quantizes weights a block of rows at a time (its memory stays at one
    tensor, not the model): blocks of a few values give the same file, byte for byte, as blocks of whole tensors."""
    from ortlora.export import decoder

    model = tiny.model("llama", dtype="bfloat16")
    whole = tiny.export(model, f"stream-{precision}", precision=precision)
    monkeypatch.setattr(decoder, "_BLOCK_VALUES", 40)  # 1-2 rows of the tiny model's weights per block
    small = export(model, tmp_path / "small", precision=precision, progress=False)
    assert (small / "model.onnx").read_bytes() == (whole / "model.onnx").read_bytes()
    assert (small / "model.onnx.data").read_bytes() == (whole / "model.onnx.data").read_bytes()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_checkpoint_reader_matches_safetensors(tmp_path, dtype):
    """Positional reads of whole tensors and of row ranges equal the safetensors library's tensors; a file cut
    short is refused naming the tensor."""
    import torch
    from safetensors.torch import save_file

    from ortlora.checkpoint import SafetensorsFile

    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(37, 11, generator=g).to(getattr(torch, dtype)),
               "v": torch.randn(5, generator=g).to(getattr(torch, dtype)), "s": torch.tensor(3.5).to(getattr(torch, dtype))}
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path))
    f = SafetensorsFile(path)
    for name, t in tensors.items():
        want = t.float().numpy() if dtype == "bfloat16" else t.numpy()
        np.testing.assert_array_equal(f.get(name), want)
    np.testing.assert_array_equal(f.get_rows("w", 9, 30), tensors["w"].float().numpy()[9:30])
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ModelError, match="truncated: tensor"):
        SafetensorsFile(path).get(max(tensors, key=lambda n: f.header[n]["data_offsets"][1]))


def test_outputs_get_the_usual_file_modes(tiny):
    """Outputs are written to temporaries and renamed; they end with the modes open()/mkdir() give (umask), not the
    temporaries' private 0600/0700 (another user or a container's service account reads the folder)."""
    folder = tiny.export(tiny.model("llama"))
    umask = os.umask(0o022)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
    for f in folder.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name


@pytest.mark.parametrize("hidden, heads, kv", [(64, 4, 2), (80, 5, 1)])  # 80: the last block of 32 padded, sliced off
def test_int4_tied_embeddings_are_the_lm_heads_int4_weights(tiny, hidden, heads, kv):
    """int4 with tied embeddings (as onnxruntime-genai's builder): the lookup reads the LM head's int4 weights
    (GatherBlockQuantized), no float copy of the vocabulary is stored; logits track fp32, and onnxruntime-genai's
    greedy tokens on the folder equal ortlora's."""
    og = pytest.importorskip("onnxruntime_genai")
    from ortlora import Model

    model = tiny.model("qwen2", tie_word_embeddings=True, hidden_size=hidden, num_attention_heads=heads,
                       num_key_value_heads=kv)
    fp32, int4 = tiny.export(model, "tied-fp32"), tiny.export(model, "tied-int4", precision="int4")
    graph = onnx.load(int4 / "model.onnx", load_external_data=False).graph
    inits = {i.name: i for i in graph.initializer}
    assert "model.embed_tokens.weight" not in inits and "lm_head.MatMulNBits.qweight" in inits
    lookup = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(lookup) == 1 and not [n for n in graph.node if n.op_type == "Gather" and "embed" in n.input[0]]
    want, _ = OnnxDecoder(fp32).run(ROWS, DECODE)
    got, _ = OnnxDecoder(int4).run(ROWS, DECODE)
    corr = np.corrcoef(np.concatenate([g.ravel() for g in got]), np.concatenate([w.ravel() for w in want]))[0, 1]
    assert corr > 0.95, corr

    prompt = ROWS[0]
    ours = Model(int4, slots=1).complete([prompt], max_new_tokens=10, ignore_eos=True)[0].token_ids
    m = og.Model(str(int4))
    params = og.GeneratorParams(m)
    params.set_search_options(max_length=len(prompt) + 10, min_length=len(prompt) + 10, do_sample=False)
    gen = og.Generator(m, params)
    gen.append_tokens(prompt)
    theirs = []
    while not gen.is_done():
        gen.generate_next_token()
        theirs.append(int(gen.get_next_tokens()[0]))
    assert ours == theirs
