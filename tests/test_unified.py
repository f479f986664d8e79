"""A step's decode rows and a prompt in one run (Engine.step, runtime/unified.py): the same logits as the decode run
and the prompt run apart, for every architecture and precision the export makes, with different adapters (and none)
on both sides; graphs of another form keep the two runs; a serving loop merges while streams decode and gives every
request the tokens it gets alone."""

from __future__ import annotations

import numpy as np
import pytest

from ortlora.adapters.convert import convert_adapter
from ortlora.runtime import unified
from ortlora.runtime.adapters import Adapters
from ortlora.runtime.engine import Engine, Row
from ortlora.testing import ARCHITECTURES
from reference import targets_for

PAST = [[5, 17, 33, 9, 81, 100, 7, 3, 44], [12, 40, 66], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]


def _folder(tiny, arch: str, precision: str):
    model = tiny.model(arch)
    targets = targets_for(arch)
    a1 = tiny.adapter(model, "u-a1", r=4, target_modules=targets[:2] + targets[-1:], seed=21)
    a2 = tiny.adapter(model, "u-a2", r=8, target_modules=targets[1:], seed=22)
    folder = tiny.export(model, f"u-{precision}", adapter_path=[a1, a2], precision=precision)
    for name, peft in (("a1", a1), ("a2", a2)):
        if not (folder / f"{name}.onnx_adapter").exists():
            convert_adapter(peft, folder / f"{name}.onnx_adapter", model=folder)
    return folder


def _engines(folder):
    """The same engine twice: one that merges (`step`), one that runs the two apart; adapters loaded in each."""
    out = []
    for merge in (True, False):
        engine = Engine(folder, slots=6, max_len=48, prefix_cache_bytes=0, unified_steps=merge)
        store = Adapters(engine.lora_inputs)
        out.append((engine, {n: store.load(folder / f"{n}.onnx_adapter") for n in ("a1", "a2")}))
    return out


def _fill(engine, adapters, plan):
    """Prefill slots: plan = [(slot, tokens, adapter name or None)]."""
    for slot, tokens, name in plan:
        engine.run([Row(slot, tokens, adapters.get(name), 1)])


def _case(engine, adapters, decode, prompt):
    return ([Row(s, [t], adapters.get(n)) for s, t, n in decode],
            [Row(s, toks, adapters.get(n), k) for s, toks, n, k in prompt])


@pytest.mark.parametrize("arch,precision", [(a, "fp32") for a in ARCHITECTURES]
                         + [("qwen2", "int4"), ("qwen2", "int8"), ("llama", "int8")])
def test_a_unified_step_equals_its_decode_and_prompt_runs_apart(tiny, arch, precision):
    """Decode rows over pasts of different lengths (a1, a2, none; a slot between them idle) with, in the same run,
    (1) fresh prompts of different lengths and adapters packed, every position's logits of one; (2) a chunk over a
    past (a slot the decode rows do not bind); then decode again: logits equal the two runs apart, and the caches
    they leave equal too."""
    folder = _folder(tiny, arch, precision)
    (merged, ad_m), (apart, ad_a) = _engines(folder)
    assert merged.unified and not apart.unified
    plan = [(0, PAST[0], "a1"), (1, PAST[1], None), (3, PAST[2], "a2"), (5, PAST[1][:2], "a2")]
    for engine, ad in ((merged, ad_m), (apart, ad_a)):
        _fill(engine, ad, plan)
    decode = [(0, 7, "a1"), (1, 9, None), (3, 11, "a2")]
    steps = [
        [(2, [4, 5, 6, 7, 8], "a2", 5), (4, [30, 31, 32], None, 1)],  # fresh, packed, a slot among the decode rows
        [(5, [60, 61, 62, 63], "a1", 2)],  # over a past, in a slot past the decode rows, another adapter
        [(2, [70, 71], "a2", 1)],  # over a past inside the decode rows' slots: not mergeable, two runs
    ]
    for prompt in steps:
        rows_m, prompt_m = _case(merged, ad_m, decode, prompt)
        rows_a, prompt_a = _case(apart, ad_a, decode, prompt)
        want_prompt = apart.run(prompt_a)
        want = apart.decode(rows_a)
        assert merged.mergeable(rows_m, prompt_m) == (prompt != steps[2])  # a past among the decode rows' slots: not
        if merged.mergeable(rows_m, prompt_m):
            got, got_prompt = merged.step(rows_m, prompt_m)
        else:
            assert prompt[0][0] == 2  # the one case above that is not
            got_prompt, got = merged.run(prompt_m), merged.decode(rows_m)
        np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
        assert [len(x) for x in got_prompt] == [k for *_, k in prompt]
        for g, w in zip(got_prompt, want_prompt):
            np.testing.assert_allclose(g, w, atol=2e-4, rtol=1e-4)
        decode = [(s, int(np.argmax(w)), n) for (s, _, n), w in zip(decode, want)]
    np.testing.assert_array_equal(merged.lengths, apart.lengths)
    for name in merged.kv:
        for s in range(6):
            n = int(apart.lengths[s])
            np.testing.assert_allclose(merged.kv[name][s, :, :n], apart.kv[name][s, :, :n], atol=2e-4, rtol=1e-4)


def test_a_base_model_without_lora_inputs_merges_too(tiny):
    """No LoRA inputs at all: the prompt group is added without a LoRA part, and a step equals its two runs."""
    folder = tiny.export(tiny.model("qwen2"), "u-base")
    merged = Engine(folder, slots=4, max_len=32, prefix_cache_bytes=0, unified_steps=True)
    apart = Engine(folder, slots=4, max_len=32, prefix_cache_bytes=0, unified_steps=False)
    assert merged.unified and not merged.lora_inputs
    for engine in (merged, apart):
        engine.run([Row(0, PAST[0], None, 1)])
    got, got_prompt = merged.step([Row(0, [3])], [Row(1, [9, 8, 7], None, 3)])
    np.testing.assert_allclose(got, apart.decode([Row(0, [3])]), atol=1e-5)
    np.testing.assert_allclose(got_prompt[0], apart.run([Row(1, [9, 8, 7], None, 3)])[0], atol=1e-5)


def test_graphs_of_another_form_keep_two_runs(tiny):
    """A graph the prompt group does not know is left as it was: the rotary positions computed from the ids and
    the mask (longrope), a graph without GroupQueryAttention, a mask read by something else."""
    import onnx

    from ortlora.adapters.validate import load_model_proto, model_lora_inputs
    from ortlora.runtime import combined
    from ortlora.testing import build_model

    hf = build_model(tiny.root / "hf" / "phi3-longrope-u", "phi3", max_position_embeddings=128,
                     original_max_position_embeddings=32, rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                      "original_max_position_embeddings": 32,
                                      "short_factor": [1.0] * 8, "long_factor": [2.0] * 8})
    folder = tiny.export(hf, "u-longrope")
    engine = Engine(folder, slots=2, max_len=64, prefix_cache_bytes=0, unified_steps=True)
    assert not engine.unified
    assert not engine.mergeable([Row(0, [1])], [Row(1, [2, 3])])

    plain = tiny.export(tiny.model("qwen2"), "u-base")
    path = plain / "model.onnx"
    proto = combined.engine_model(path, model_lora_inputs(load_model_proto(path)))
    before = proto.SerializeToString()
    gqa = next(n for n in proto.graph.node if n.op_type == unified.GQA)
    gqa.op_type = "MultiHeadAttention"
    assert not unified.add_prompt_group(proto)
    gqa.op_type = unified.GQA
    assert proto.SerializeToString() == before
    proto.graph.node.append(onnx.helper.make_node("Identity", ["attention_mask"], ["mask_copy"]))
    proto.graph.output.append(onnx.helper.make_tensor_value_info("mask_copy", onnx.TensorProto.INT64, None))
    assert not unified.add_prompt_group(proto)
