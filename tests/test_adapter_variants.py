"""Adapters beyond plain LoRA, against PEFT / transformers: DoRA (fp32 and int4 bases, alone and mixed with LoRA
adapters), per-request scales, exact weighted combinations (and `merge-adapters`), and the LoraConfig audit: every
PEFT config field either runs exactly or is refused by name."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ortlora.adapters.convert import convert_adapter
from ortlora.adapters.peft import EXACT, REFUSED, read_peft
from ortlora.errors import AdapterError, AdapterInvalid
from reference import OnnxDecoder, genai_greedy, hf_greedy, hf_logits, peft_model, torch_greedy, torch_logits
from runtime_helpers import assert_batch_equals_singles

N = 8
PROMPTS = [[5, 17, 33, 9, 81, 100, 7], [12, 40, 66, 3], [8, 9, 10, 11, 12, 13, 14]]
# fp32 logits through our graph vs PEFT's: observed |diff| < 1e-5 (DoRA's factor is one more float multiply)
ATOL = 1e-4


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    """A tiny qwen2 (q/k/v biases: DoRA's factor must not scale them), a random DoRA adapter whose magnitudes are
    random too (not the norms PEFT initializes them to), and two LoRA adapters of different ranks and targets."""
    hf = tiny.model("qwen2")
    dora = tiny.adapter(hf, "var-dora", r=4, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True, seed=21)
    l1 = tiny.adapter(hf, "var-l1", r=4, target_modules=["q_proj", "o_proj"], seed=22)
    l2 = tiny.adapter(hf, "var-l2", r=6, target_modules=["k_proj", "up_proj", "q_proj"], seed=23)
    folder = tiny.export(hf, "var", adapter_path=[dora, l1, l2])
    root = tmp_path_factory.mktemp("variants")
    files = {name: convert_adapter(p, root / f"{name}.onnx_adapter", model=folder)
             for name, p in (("dora", dora), ("l1", l1), ("l2", l2))}
    return dict(hf=hf, folder=folder, peft=dict(dora=dora, l1=l1, l2=l2), files=files, root=root)


@pytest.fixture(scope="module")
def model(setup):
    from ortlora import Model

    m = Model(setup["folder"], slots=4, max_len=64)
    for name, path in setup["files"].items():
        m.adapters.load(path, name=name)
    return m


def greedy(m, prompt, adapter=None, **kw):
    return m.complete([prompt], [adapter], max_new_tokens=N, min_new_tokens=N, **kw)[0].token_ids


# -- DoRA ---------------------------------------------------------------------------------------------------------
def test_dora_logits_and_greedy_equal_peft(setup, model):
    from ortlora.adapters import read_params

    params = read_params(setup["files"]["dora"])
    assert any(k.endswith(".dora_scale") for k in params)
    ref = torch_logits(peft_model(setup["hf"], setup["peft"]["dora"]), PROMPTS[:1])[0]
    base = hf_logits(setup["hf"], PROMPTS[:1])[0]
    ours, _ = OnnxDecoder(setup["folder"], params).run(PROMPTS[:1], [[]])
    assert np.abs(ref - base).max() > 0.5  # the adapter (magnitudes included) changes the output
    np.testing.assert_allclose(ours[0], ref, atol=ATOL)
    for prompt in PROMPTS[:2]:
        assert greedy(model, prompt, "dora") == hf_greedy(setup["hf"], prompt, N, setup["peft"]["dora"])


def test_dora_in_a_mixed_batch_with_lora_adapters(setup, model):

    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0]]
    adapters = ["dora", "l1", None, "l2"]
    singles = assert_batch_equals_singles(model, prompts, adapters, n=N)
    assert singles[0] == hf_greedy(setup["hf"], prompts[0], N, setup["peft"]["dora"])
    assert singles[1] == hf_greedy(setup["hf"], prompts[1], N, setup["peft"]["l1"])
    assert len({tuple(s) for s in singles}) == 4


def test_plain_export_keeps_its_graph_and_refuses_a_dora_file(tiny, setup, tmp_path):
    """No DoRA adapter: no dora_scale input and no Mul (the graph onnxruntime-genai loads today); a DoRA file is
    refused by such a model with a message that says what to do."""
    from ortlora import Model
    from ortlora.model_folder import load_model_proto

    plain = tiny.export(setup["hf"], "var-plain", adapter_path=[setup["peft"]["l1"]])
    proto = load_model_proto(plain)
    assert not [i.name for i in proto.graph.input if "dora" in i.name]
    assert not [n.name for n in proto.graph.node if "dora" in n.name]
    with pytest.raises(AdapterError, match="exported without DoRA inputs.*export the model again"):
        convert_adapter(setup["peft"]["dora"], tmp_path / "x.onnx_adapter", model=plain)
    m = Model(plain, slots=1, max_len=32)
    with pytest.raises(AdapterInvalid, match="DoRA adapter.*exported without DoRA inputs"):
        m.adapters.load(setup["files"]["dora"], name="d")
    with pytest.raises(AdapterError, match="DoRA adapter's factor.*needs the base model's weights"):
        convert_adapter(setup["peft"]["dora"], tmp_path / "y.onnx_adapter")
    assert not list(tmp_path.iterdir())


def test_onnxruntime_genai_runs_a_dora_export(setup):
    """A folder exported with DoRA inputs still loads in onnxruntime-genai (factors default to ones = base), and
    its DoRA adapter file gives PEFT's tokens there too."""
    og = pytest.importorskip("onnxruntime_genai")

    prompt = PROMPTS[0]
    assert genai_greedy(setup["folder"], prompt, n=N) == hf_greedy(setup["hf"], prompt, N)
    assert og is not None
    assert genai_greedy(setup["folder"], prompt, setup["files"]["dora"], n=N) == \
        hf_greedy(setup["hf"], prompt, N, setup["peft"]["dora"])


def test_dora_on_an_int4_base_equals_peft_on_the_dequantized_weights(tiny, setup, tmp_path):
    """int4: the factors are taken against the dequantized weights, and the tokens are those of PEFT over a
    checkpoint holding exactly those weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from ortlora import Model
    from ortlora.adapters.base_weights import BaseWeights

    folder = tiny.export(setup["hf"], "var-int4", adapter_path=[setup["peft"]["dora"], setup["peft"]["l1"]],
                         precision="int4", block_size=16)
    files = {n: convert_adapter(setup["peft"][n], tmp_path / f"{n}.onnx_adapter", model=folder) for n in ("dora", "l1")}
    weights = BaseWeights(folder)
    hf = AutoModelForCausalLM.from_pretrained(setup["hf"], dtype=torch.float32)
    with torch.no_grad():
        for name, module in hf.named_modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(torch.from_numpy(weights(name)))
    deq = tmp_path / "dequantized"
    hf.save_pretrained(deq)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(setup["hf"] / f, deq / f)
    m = Model(folder, slots=4, max_len=64)
    for n, path in files.items():
        m.adapters.load(path, name=n)
    ours = m.complete(PROMPTS[:2] + PROMPTS[:1], ["dora", "dora", "l1"], max_new_tokens=N, min_new_tokens=N)
    want = [hf_greedy(deq, p, N, setup["peft"]["dora"]) for p in PROMPTS[:2]]
    agree = np.mean([a == b for c, w in zip(ours, want) for a, b in zip(c.token_ids, w)])
    # MatMulNBits rounds activations to int8 (accuracy_level 4): tokens agree, logits only nearly
    assert agree >= 0.85, (agree, [c.token_ids for c in ours], want)
    assert ours[0].token_ids != hf_greedy(deq, PROMPTS[0], N)


# -- scale and combinations -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("name", ["l2", "dora"])
def test_scale_equals_peft_with_its_scaling_multiplied(setup, model, name, scale):
    """LoRA and DoRA (its factor m / ||W + c·s·B·A|| recomputed from the base weights) at scale c = PEFT with
    every scaling multiplied by c. Scale 0 is the base model (for DoRA that is "off": PEFT's scaling 0 would still
    rescale the weights by m / ||W||)."""
    held = model.adapters.acquire(name, scale=scale)
    try:
        params = held.params if held is not None else {}
        assert (held is None) == (scale == 0.0)  # scale 0 is the base model itself
        ours, _ = OnnxDecoder(setup["folder"], params).run(PROMPTS[:1], [[]])
    finally:
        model.adapters.release(held)
    if scale == 0.0:
        np.testing.assert_allclose(ours[0], hf_logits(setup["hf"], PROMPTS[:1])[0], atol=ATOL)
        assert greedy(model, PROMPTS[1], name, adapter_scale=0.0) == hf_greedy(setup["hf"], PROMPTS[1], N)
        return
    peft = peft_model(setup["hf"], setup["peft"][name], scale)
    np.testing.assert_allclose(ours[0], torch_logits(peft, PROMPTS[:1])[0], atol=ATOL)
    assert greedy(model, PROMPTS[1], name, adapter_scale=scale) == torch_greedy(peft, PROMPTS[1])


def test_rows_with_different_scales_share_a_batch(model):

    prompts = [PROMPTS[0]] * 4
    scales = [1.0, 0.5, 2.0, 0.0]
    singles = [greedy(model, p, "l1", adapter_scale=s) for p, s in zip(prompts, scales)]
    assert len({tuple(s) for s in singles}) == 4 and singles[3] == greedy(model, prompts[0], None)
    batch = model.complete(prompts, ["l1"] * 4, adapter_scale=scales, max_new_tokens=N, min_new_tokens=N)
    assert [c.token_ids for c in batch] == singles
    assert_batch_equals_singles(model, prompts[:2], ["dora", "l1"])  # nothing held after the scaled rows
    rows = ["dora", "dora", "l1", None]
    dora_scales = [0.5, 2.0, 0.5, 1.0]
    want = [greedy(model, PROMPTS[0], a, adapter_scale=s) for a, s in zip(rows, dora_scales)]
    assert want[0] != want[1] != greedy(model, PROMPTS[0], "dora")
    batch = model.complete([PROMPTS[0]] * 4, rows, adapter_scale=dora_scales, max_new_tokens=N, min_new_tokens=N)
    assert [c.token_ids for c in batch] == want and model.adapters.held() == 0


def _delta(adapter_dir) -> dict[str, np.ndarray]:
    """module -> s·B·A [out, in] straight from the PEFT file."""
    a = read_peft(adapter_dir)
    return {m.name: m.scale * (m.b @ m.a) for m in a.modules.values()}


def test_combination_equals_transformers_with_merged_weights(setup, model, tmp_path):
    """0.7·l1 + 0.3·l2 (ranks 4 and 6, different targets) = transformers with W + 0.7 dW1 + 0.3 dW2, in Python and
    as a merge-adapters file; cached by recipe, and mixed in one batch with its components."""
    import torch
    from transformers import AutoModelForCausalLM

    from ortlora.adapters import read_params

    hf = AutoModelForCausalLM.from_pretrained(setup["hf"], dtype=torch.float32, attn_implementation="eager").eval()
    d1, d2 = _delta(setup["peft"]["l1"]), _delta(setup["peft"]["l2"])
    with torch.no_grad():
        for name, module in hf.named_modules():
            if name in d1 or name in d2:
                dw = 0.7 * d1.get(name, 0) + 0.3 * d2.get(name, 0)
                module.weight.add_(torch.from_numpy(np.asarray(dw, np.float32)))
    ref = torch_logits(hf, PROMPTS[:1])[0]
    recipe = {"l1": 0.7, "l2": 0.3}
    held = model.adapters.acquire(recipe)
    again = model.adapters.acquire({"l2": 0.3, "l1": 0.7})
    try:
        assert again is held and held.rank == 4 + 6  # cached by recipe; ranks concatenated
        ours, _ = OnnxDecoder(setup["folder"], held.params).run(PROMPTS[:1], [[]])
    finally:
        model.adapters.release(held)
        model.adapters.release(again)
    np.testing.assert_allclose(ours[0], ref, atol=ATOL)
    base = torch_logits(AutoModelForCausalLM.from_pretrained(setup["hf"], dtype=torch.float32).eval(), PROMPTS[:1])[0]
    assert np.abs(ref - base).max() > 0.5

    out = tmp_path / "mix.onnx_adapter"
    run = subprocess.run([sys.executable, "-m", "ortlora.cli", "merge-adapters", str(setup["files"]["l1"]),
                          str(setup["peft"]["l2"]), "--weights", "0.7", "0.3", "-o", str(out), "--model",
                          str(setup["folder"])], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    merged, _ = OnnxDecoder(setup["folder"], read_params(out)).run(PROMPTS[:1], [[]])
    np.testing.assert_allclose(merged[0], ref, atol=ATOL)
    model.adapters.load(out, name="mix")
    want = greedy(model, PROMPTS[1], recipe)
    assert want == greedy(model, PROMPTS[1], "mix") == torch_greedy(hf, PROMPTS[1])
    batch = model.complete([PROMPTS[1]] * 3, [recipe, "l1", "l2"], max_new_tokens=N, min_new_tokens=N)
    assert batch[0].token_ids == want and batch[1].token_ids == greedy(model, PROMPTS[1], "l1")
    assert model.adapters.held() == 0
    model.adapters.unload("mix")


def test_combination_refusals(setup, model, tmp_path):
    with pytest.raises(AdapterInvalid, match="'dora' is a DoRA adapter: a sum of DoRA adapters is not one"):
        model.adapters.acquire({"dora": 0.5, "l1": 0.5})
    with pytest.raises(AdapterInvalid, match="finite number"):
        model.adapters.acquire({"l1": float("nan")})
    with pytest.raises(AdapterError, match="no adapter named 'nope'"):
        model.adapters.acquire({"l1": 0.5, "nope": 0.5})
    assert model.adapters.held() == 0
    run = subprocess.run([sys.executable, "-m", "ortlora.cli", "merge-adapters", str(setup["files"]["l1"]),
                          str(setup["files"]["l2"]), "--weights", "0.7", "-o", str(tmp_path / "x.onnx_adapter")],
                         capture_output=True, text=True)
    assert run.returncode == 1 and "2 adapters but 1 --weights" in run.stderr and "Traceback" not in run.stderr
    # a DoRA file at another scale needs the model's weights; with them it is the runtime's scaled adapter
    dora = [sys.executable, "-m", "ortlora.cli", "merge-adapters", str(setup["files"]["dora"]), "-w", "0.5", "-o",
            str(tmp_path / "d.onnx_adapter")]
    run = subprocess.run(dora, capture_output=True, text=True)
    assert run.returncode == 1 and "base weights, which are not at hand" in run.stderr
    run = subprocess.run(dora + ["--model", str(setup["folder"])], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    from ortlora.adapters import read_params

    held = model.adapters.acquire("dora", scale=0.5)
    try:
        written = read_params(tmp_path / "d.onnx_adapter")
        assert written.keys() == held.params.keys()
        for k, v in written.items():
            np.testing.assert_allclose(v, held.params[k], rtol=1e-6, atol=1e-7)
    finally:
        model.adapters.release(held)


def test_replacing_a_component_rebuilds_its_combinations(setup, model):
    first = model.adapters.acquire("l1", scale=0.5)
    model.adapters.release(first)
    model.adapters.load(setup["files"]["l1"], name="l1")  # a new version of l1
    second = model.adapters.acquire("l1", scale=0.5)
    model.adapters.release(second)
    assert second is not first and first.retired


# -- the LoraConfig audit ---------------------------------------------------------------------------------------------
def test_every_lora_config_field_is_honoured_or_refused():
    from peft import LoraConfig

    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    assert fields <= set(EXACT) | set(REFUSED), sorted(fields - set(EXACT) - set(REFUSED))
    assert not set(EXACT) & set(REFUSED)


REFUSAL_VALUES = {  # a non-default value of each refused field, as PEFT would write it
    "fan_in_fan_out": True, "bias": "lora_only", "modules_to_save": ["lm_head"], "lora_bias": True,
    "target_parameters": ["mlp.experts.gate_up_proj"], "trainable_token_indices": [1, 2],
    "layer_replication": [[0, 2]], "megatron_config": {"x": 1}, "megatron_core": "other.core",
    "loftq_config": {"loftq_bits": 4}, "corda_config": {"cache_file": "x"}, "lora_ga_config": {"x": 1},
    "velora_config": {"rank": 1}, "alora_invocation_tokens": [3, 4], "use_qalora": True, "qalora_group_size": 32,
    "monteclora_config": {"x": 1}, "use_bdlora": True, "arrow_config": {"top_k": 2}, "kasa_config": {"x": 1},
}


@pytest.mark.parametrize("field", sorted(REFUSED))
def test_refused_fields_are_refused_by_name(tiny, tmp_path, field):
    src = tiny.adapter(tiny.model("llama"), "audit", r=2)
    dst = tmp_path / "a"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg[field] = REFUSAL_VALUES[field]
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=rf"{field}=.*: "):
        read_peft(dst)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"])
def test_inits_that_change_the_base_are_refused(tiny, tmp_path, init):
    src = tiny.adapter(tiny.model("llama"), "audit", r=2)
    shutil.copytree(src, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = init
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=rf"init_lora_weights='{init}'.*changes the base weights"):
        read_peft(tmp_path / "a")


def test_peft_lora_bias_and_unknown_fields_are_refused(tiny, tmp_path):
    """A real lora_bias=True adapter (its lora_B bias would be dropped: a silent wrong answer) is refused by name,
    as is a field from a newer PEFT; harmless defaults of every field (PEFT writes them all) pass."""
    model = tiny.model("llama")
    biased = tiny.adapter(model, "lora-bias", r=2, lora_bias=True)
    with pytest.raises(AdapterError, match="lora_bias=True: lora_B carries a bias"):
        convert_adapter(biased, tmp_path / "x.onnx_adapter")
    plain = tiny.adapter(model, "audit", r=2)
    read_peft(plain)  # every default PEFT wrote is accepted
    shutil.copytree(plain, tmp_path / "new")
    cfg = json.loads((tmp_path / "new" / "adapter_config.json").read_text())
    cfg["use_hyperlora"] = True
    (tmp_path / "new" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="use_hyperlora=True: a LoraConfig field ortlora does not know"):
        read_peft(tmp_path / "new")


def test_exact_fields_have_parity(tiny, tmp_path):
    """The EXACT fields that change the numbers (rsLoRA, rank/alpha patterns, layers_to_transform, exclude_modules)
    give PEFT's logits."""
    model = tiny.model("llama")
    folder = tiny.export(model, "audit-all", lora_targets=["all-linear"])
    for name, kw in {
        "rs": dict(use_rslora=True, r=4),
        "patterns": dict(r=4, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3.0}),
        "layers": dict(r=2, layers_to_transform=[1], layers_pattern="layers", target_modules=["q_proj", "o_proj"]),
        "exclude": dict(r=2, target_modules=["q_proj", "k_proj"], exclude_modules=["model.layers.0.self_attn.k_proj"]),
    }.items():
        peft = tiny.adapter(model, f"audit-{name}", **kw)
        f = convert_adapter(peft, tmp_path / f"{name}.onnx_adapter", model=folder)
        from ortlora.adapters import read_params

        ours, _ = OnnxDecoder(folder, read_params(f)).run(PROMPTS[:1], [[]])
        np.testing.assert_allclose(ours[0], hf_logits(model, PROMPTS[:1], peft)[0], atol=ATOL, err_msg=name)


def test_pool_keeps_ones_for_rows_without_a_dora_factor():
    """The pool's DoRA buffer: ones in slot 0 and for a LoRA adapter's slot, the file's factor for a DoRA one; each
    row's slot (relative to the bound ones) is fed as adapter_row_slot."""
    from ortlora.model_folder import LoraInput
    from ortlora.runtime.adapters import Adapter
    from ortlora.runtime.pool import AdapterPool

    f32 = np.dtype(np.float32)
    inputs = {"m.lora_A.weight": LoraInput("m.lora_A.weight", f32, (3, "r")),
              "m.lora_B.weight": LoraInput("m.lora_B.weight", f32, ("r", 2)),
              "m.dora_scale": LoraInput("m.dora_scale", f32, (2,))}
    pool = AdapterPool(inputs, 3, f32)
    ab = {"m.lora_A.weight": np.ones((3, 1), f32), "m.lora_B.weight": np.ones((1, 2), f32)}
    lora, dora = Adapter("l", dict(ab)), Adapter("d", {**ab, "m.dora_scale": np.array([2.0, 3.0], f32)})
    (run,) = pool.runs
    slots = {uid: slot for uid, (slot,) in pool.place({lora.uid: lora, dora.uid: dora}).items()}
    np.testing.assert_array_equal(run.buffers["m.dora_scale"][[0, slots[lora.uid], slots[dora.uid]]],
                                  [[1, 1], [1, 1], [2, 3]])
    g = run.groups([slots[dora.uid], 0, slots[lora.uid]])
    assert g.first == 0 and g.feeds[run.names.row_slot].tolist() == [slots[dora.uid], 0, slots[lora.uid]]
    plain = AdapterPool({k: v for k, v in inputs.items() if "dora" not in k}, 3, f32).runs[0]
    assert run.names.row_slot not in plain.groups([1, 2]).feeds


def test_generate_adapter_with_adapter_type_dora(setup, tmp_path):
    from ortlora.adapters import read_params
    from ortlora.export import generate_adapter
    from ortlora.model_folder import model_lora_inputs

    out = generate_adapter(setup["hf"], tmp_path / "out", adapter_path=[setup["peft"]["dora"]], adapter_type="dora",
                           progress=False)
    inputs = model_lora_inputs(out)
    assert sum(k.endswith(".dora_scale") for k in inputs) == 6
    (file,) = (out / "adapters").glob("*.onnx_adapter")
    ours, _ = OnnxDecoder(out, read_params(file)).run(PROMPTS[:1], [[]])
    np.testing.assert_allclose(ours[0], torch_logits(peft_model(setup["hf"], setup["peft"]["dora"]), PROMPTS[:1])[0],
                               atol=ATOL)


def test_export_dora_flag_adds_the_inputs_without_a_dora_adapter(setup, tmp_path):
    """`export --dora`: DoRA inputs on every LoRA module (a DoRA adapter converted later fits), factors default
    to ones (the base model and LoRA adapters are unchanged)."""
    run = subprocess.run([sys.executable, "-m", "ortlora.cli", "export", "-m", str(setup["hf"]), "-o",
                          str(tmp_path / "m"), "--lora-targets", "q_proj,v_proj,down_proj", "--dora", "--no-progress"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    from ortlora.adapters import read_params
    from ortlora.model_folder import model_lora_inputs

    assert sum(k.endswith(".dora_scale") for k in model_lora_inputs(tmp_path / "m")) == 6
    f = convert_adapter(setup["peft"]["dora"], tmp_path / "d.onnx_adapter", model=tmp_path / "m")
    ours, _ = OnnxDecoder(tmp_path / "m", read_params(f)).run(PROMPTS[:1], [[]])
    np.testing.assert_allclose(ours[0], torch_logits(peft_model(setup["hf"], setup["peft"]["dora"]), PROMPTS[:1])[0],
                               atol=ATOL)
    base, _ = OnnxDecoder(tmp_path / "m").run(PROMPTS[:1], [[]])
    np.testing.assert_allclose(base[0], hf_logits(setup["hf"], PROMPTS[:1])[0], atol=ATOL)
