"""The runtime against references: greedy tokens = transformers + PEFT = onnxruntime-genai; engine logits = a plain
onnxruntime loop (static KV buffer, dummy rows, continuation); a mixed-adapter batch = the per-adapter single runs."""

from __future__ import annotations

import numpy as np
import pytest

from ortlora.adapters.convert import convert_adapter
from ortlora.adapters.peft import read_peft
from ortlora.runtime.engine import Engine, Row
from ortlora.runtime.sampling import SamplingParams
from reference import OnnxDecoder, genai_greedy, hf_greedy
from runtime_helpers import ATOL, N, PROMPTS, assert_batch_equals_singles, greedy

def test_greedy_equals_transformers_peft_and_genai(lora, model):
    hf_dir, folder, peft, files = lora
    prompt = PROMPTS[0]
    ours = {name: greedy(model, prompt, name) for name in (None, "a1", "a2")}
    # each adapter changes the text, or the comparisons below would not tell adapters apart
    assert ours["a1"] != ours[None] and ours["a2"] != ours[None] and ours["a1"] != ours["a2"]
    assert ours[None] == hf_greedy(hf_dir, prompt, N)
    for name in ("a1", "a2"):
        assert ours[name] == hf_greedy(hf_dir, prompt, N, peft[name]), name
    assert ours[None] == genai_greedy(folder, prompt)
    for name in ("a1", "a2"):
        assert ours[name] == genai_greedy(folder, prompt, files[name]), name


@pytest.mark.parametrize("precision", ["int4", "fp16"])
def test_quantized_and_half_greedy_equal_genai(tiny, lora, precision):
    hf_dir, _, peft, _ = lora
    from ortlora import Model

    folder = tiny.export(hf_dir, f"rt-{precision}", adapter_path=[peft["a1"], peft["a2"]], precision=precision)
    path = convert_adapter(peft["a1"], folder / "a1.onnx_adapter", model=folder)
    m = Model(folder, slots=2, max_len=64)
    m.adapters.load(path, name="a1")
    prompt = PROMPTS[1]
    assert greedy(m, prompt) == genai_greedy(folder, prompt)
    assert greedy(m, prompt, "a1") == genai_greedy(folder, prompt, path)
    assert m.engine.dtype == (np.float16 if precision == "fp16" else np.float32)


def test_model_without_lora_inputs(tiny, lora, model):
    from ortlora import Model
    from ortlora.errors import AdapterError

    hf_dir, _, _, files = lora
    plain = Model(tiny.export(hf_dir, "rt-plain"), max_len=64)
    assert greedy(plain, PROMPTS[0]) == greedy(model, PROMPTS[0])  # rank-0 defaults = no LoRA branch at all
    with pytest.raises(AdapterError, match="no LoRA inputs"):
        plain.adapters.load(files["a1"])


def test_mixed_batch_equals_single_rows(model):
    adapters = ["a1", "a2", None, "a1"]
    singles = assert_batch_equals_singles(model, PROMPTS, adapters)
    assert len({tuple(s) for s in singles}) == 4  # the rows differ: a mix-up would show
    assert_batch_equals_singles(model, PROMPTS, adapters, max_new_tokens=N, temperature=1.0, top_p=0.95, seed=5)


def test_adapter_pool_churn_equals_single_rows(tiny, lora):
    """More adapters than pool slots, ranks 4/8/16 arriving in turn (the pool grows its rank, evicts the least
    recently used adapter, shrinks when the adapters placed need half its rank): every row still gets its own
    adapter's tokens; unloading the rank-16 adapter shrinks the pool to the rank the others need."""
    from ortlora import Model

    hf_dir, folder, _, files = lora
    a3 = tiny.adapter(hf_dir, "rt-a3", r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"], seed=13)
    m = Model(folder, slots=2, max_len=64)
    for name, path in {**files, "a3": convert_adapter(a3, folder / "a3.onnx_adapter", model=folder)}.items():
        m.adapters.load(path, name=name)
    prompts = PROMPTS + PROMPTS[:2]
    adapters = ["a1", "a2", "a3", None, "a2", "a3"]
    singles = [greedy(m, p, a, n=4) for p, a in zip(prompts, adapters)]
    assert len({tuple(s) for s in singles[:3]}) == 3  # the three adapters give three different texts
    assert_batch_equals_singles(m, prompts, adapters, singles, n=4)
    pool = m.adapters.pool

    def rank():  # every module class's slots at the rank of the adapters placed there
        ranks = {run.rank for run in pool.runs}
        assert len(ranks) == 1, ranks  # the fixture's adapters have every module: the classes agree
        return ranks.pop()

    placed = [a.rank for a in pool.placed.values()]
    assert pool.capacity == 2 and rank() == max(placed) and pool.generation >= 3  # ranks 4, 8, 16 in turn
    greedy(m, PROMPTS[0], "a3", n=1)  # a3 (rank 16) placed
    greedy(m, PROMPTS[0], "a1", n=1)
    assert rank() == 16
    m.adapters.unload("a3")
    assert greedy(m, PROMPTS[0], "a1", n=4) == singles[0]  # the engine thread let go of a3 before this step
    assert rank() == 4 and 16 not in [a.rank for a in pool.placed.values()]


def test_adapter_with_nan_or_huge_weights_is_refused_at_registration(tmp_path, lora, model):
    """NaN weights, or finite weights so large that the model's logits overflow (found by a probe step), are
    refused when the adapter is loaded, by name: nothing is registered and every other adapter works on."""
    from ortlora.adapters.onnx_adapter import read_onnx_adapter, write_onnx_adapter
    from ortlora.errors import AdapterInvalid

    _, _, _, files = lora
    params = {k: np.array(v) for k, v in read_onnx_adapter(files["a1"]).items()}
    params[next(iter(params))][0, 0] = np.nan
    with pytest.raises(AdapterInvalid, match="bad.onnx_adapter.*NaN"):
        model.adapters.load(write_onnx_adapter(tmp_path / "bad.onnx_adapter", params), name="bad")
    huge = {k: np.sign(np.asarray(v)) * np.float32(1e20) for k, v in read_onnx_adapter(files["a1"]).items()}
    assert all(np.isfinite(v).all() for v in huge.values())
    with pytest.raises(AdapterInvalid, match="huge.onnx_adapter makes the model's logits NaN or infinite"):
        model.adapters.load(write_onnx_adapter(tmp_path / "huge.onnx_adapter", huge), name="huge")
    assert "bad" not in model.adapters and "huge" not in model.adapters
    assert sorted(model.adapters.names()) == ["a1", "a2"]
    assert model.engine.free_slots == 4 and not any(a.refs for a in model.adapters)
    assert_batch_equals_singles(model, PROMPTS[:2], ["a1", "a2"], n=3)


def test_a_row_whose_logits_turn_nan_ends_alone(lora, model):
    """A row whose logits turn NaN mid-batch (here: an adapter of huge weights handed to the batch directly,
    past the registration probe) ends with a GenerationError naming its adapter, greedy or sampled, while the
    other rows of the same mixed batch finish with their single-run tokens, and nothing stays held."""
    from ortlora.errors import GenerationError
    from ortlora.runtime.adapters import Adapter
    from ortlora.runtime.batch import Batch
    from ortlora.runtime.request import Request

    _, _, _, files = lora
    a1 = model.adapters.get("a1")
    huge = Adapter("huge", {k: np.sign(v) * np.float32(1e20) for k, v in a1.params.items()})
    singles = [greedy(model, p, a, n=4) for p, a in zip(PROMPTS[:3], ["a2", None, "a1"])]
    store = model.adapters
    for sampled in (False, True):
        names = ["a2", "huge", None, "a1"]
        sp = SamplingParams(max_new_tokens=4, min_new_tokens=4)
        hot = SamplingParams(max_new_tokens=4, temperature=1.0, seed=1) if sampled else sp
        reqs = [Request(p, hot if n == "huge" else sp, model.tokenizer,
                        huge if n == "huge" else store.acquire(n) if n else None)
                for p, n in zip([PROMPTS[0], PROMPTS[3], PROMPTS[1], PROMPTS[2]], names)]
        reqs[1].released = True  # not the store's to release
        batch = Batch(model.engine, store)
        for r in reqs:
            batch.add(r)
        while batch:
            batch.step()
        bad = reqs[1]
        assert bad.finish_reason == "error" and isinstance(bad.error, GenerationError)
        assert "'huge'" in str(bad.error) and "NaN" in str(bad.error)
        assert [r.token_ids for r in (reqs[0], reqs[2], reqs[3])] == singles
        assert model.engine.free_slots == 4 and not any(a.refs for a in store)
    model.engine.forget_adapter(huge)
    assert greedy(model, PROMPTS[0], "a2", n=4) == singles[0]


def test_a_row_with_non_finite_activations_at_slot_0_does_not_reach_the_others_there(lora):
    """Rows whose adapter lacks a module class share slot 0's one computed row there (pool.group_rows): when that
    row's own activations are infinite (an attention-only adapter of huge weights, so its MLP input overflows), the
    other rows at the MLP's slot 0 (no adapter, an attention-only adapter) still get exactly their own logits, not
    0 x inf = NaN, in a batch whose MLP LoRA is bound (another row's adapter has the MLP)."""
    from ortlora.runtime.adapters import Adapter, Adapters

    _, folder, _, files = lora
    engine = Engine(folder, slots=4, max_len=32)
    store = Adapters.for_engine(engine)
    a1 = store.load(files["a1"], "a1")
    attention = {k: v for k, v in a1.params.items() if ".self_attn." in k}
    assert attention and len(attention) < len(a1.params)  # a1 also has MLP modules: attention-only is a part
    huge = Adapter("huge", {k: np.sign(v) * np.float32(1e20) for k, v in attention.items()})
    quiet = Adapter("quiet", {k: v.copy() for k, v in attention.items()})
    others = (None, quiet, a1)
    tokens = [7, 8, 9]
    alone = []
    for s, (p, a, t) in enumerate(zip(PROMPTS[1:4], others, tokens), start=1):
        engine.prefill([Row(s, p, a)])
        alone.append(engine.decode([Row(s, [t], a)])[0].copy())
        engine.truncate(s, len(p))  # back to its prompt
    engine.prefill([Row(0, PROMPTS[0], huge)])
    # a decode step's rows are in slot order: huge is the first row at the MLP's slot 0, the row computed there
    got = engine.decode([Row(s, [t], a) for s, (t, a) in enumerate(zip([5, *tokens], (huge, *others)))])
    assert not np.isfinite(got[0]).all()
    for mine, want in zip(got[1:], alone):
        np.testing.assert_allclose(mine, want, atol=ATOL)
    mlp = next(k for k, run in enumerate(engine.pool.runs) if any(".mlp." in key for key in run.lora_inputs))
    assert [engine.pool.runs[mlp].where.get(a.uid, 0) > 0 for a in (huge, quiet, a1)] == [False, False, True]


def test_more_prompts_than_slots(lora, model):
    prompts = PROMPTS + PROMPTS[:3]  # 7 requests through 4 slots: rows leave, waiting ones take their slots
    adapters = ["a1", "a2", None, "a1", None, "a2", "a1"]
    assert_batch_equals_singles(model, prompts, adapters, n=5)


def test_engine_logits_static_buffer(lora):
    """Prefill rows one by one into slots, decode them together with mixed adapters (slot 1 sits out a step as a
    dummy row), against the reference loop run per row with that row's adapter as plain inputs."""
    _, folder, peft, _ = lora
    from ortlora.runtime.adapters import Adapters

    engine = Engine(folder, slots=3, max_len=32)
    store = Adapters(engine.lora_inputs)
    handles = {name: store.load(folder / f"{name}.onnx_adapter") for name in ("a1", "a2")}
    rows = PROMPTS[:3]
    names = ["a1", None, "a2"]
    decode = [[21, 22, 23], [31, 32, 33], [41, 42, 43]]
    ref = []
    for r, name, d in zip(rows, names, decode):
        feeds = read_peft(peft[name]).onnx_tensors() if name else None
        pre, steps = OnnxDecoder(folder, feeds).run([r], [d])
        ref.append([pre[0][-1]] + [s[0] for s in steps])
    got = engine.prefill([Row(i, r, handles.get(n)) for i, (r, n) in enumerate(zip(rows, names))])
    for i in range(3):
        np.testing.assert_allclose(got[i], ref[i][0], atol=ATOL)
    # step 0: all three rows; step 1: slot 1 pauses (dummy row); then slot 1 catches up alone; step 2: all
    out = engine.decode([Row(i, [decode[i][0]], handles.get(names[i])) for i in range(3)])
    for i in range(3):
        np.testing.assert_allclose(out[i], ref[i][1], atol=ATOL)
    out = engine.decode([Row(2, [decode[2][1]], handles["a2"]), Row(0, [decode[0][1]], handles["a1"])])
    np.testing.assert_allclose(out[0], ref[2][2], atol=ATOL)
    np.testing.assert_allclose(out[1], ref[0][2], atol=ATOL)
    out = engine.decode([Row(1, [decode[1][1]], None)])
    np.testing.assert_allclose(out[0], ref[1][2], atol=ATOL)
    out = engine.decode([Row(i, [decode[i][2]], handles.get(names[i])) for i in range(3)])
    for i in range(3):
        np.testing.assert_allclose(out[i], ref[i][3], atol=ATOL)
    assert engine.lengths.tolist() == [len(r) + 3 for r in rows]


def test_engine_continuation_equals_one_prefill(lora):
    """A second prefill into a slot that holds tokens (a chat's next turn) = prefilling everything at once."""
    _, folder, _, _ = lora
    engine = Engine(folder, slots=2, max_len=32)
    first, second = PROMPTS[0], PROMPTS[2]
    whole = engine.prefill([Row(0, first + second)])[0]
    engine.prefill([Row(1, first)])
    cont = engine.prefill([Row(1, second)])[0]
    np.testing.assert_allclose(cont, whole, atol=ATOL)
    engine.truncate(1, len(first))  # keep the shared prefix, prefill a different continuation
    again = engine.prefill([Row(1, second)])[0]
    np.testing.assert_allclose(again, whole, atol=ATOL)


def test_engine_batched_prefill_equals_per_row(lora):
    """Right-padded rows prefilled together (free slot 1 in between gets a dummy row) = one row at a time."""
    _, folder, _, _ = lora
    from ortlora.runtime.adapters import Adapters

    engine = Engine(folder, slots=4, max_len=32)
    store = Adapters(engine.lora_inputs)
    a1, a2 = (store.load(folder / f"{n}.onnx_adapter") for n in ("a1", "a2"))
    rows = [Row(0, PROMPTS[0], a1), Row(2, PROMPTS[1], None), Row(3, PROMPTS[2], a2)]
    results = []
    for batched in (False, True):
        for _ in range(4):
            engine.acquire_slot()
        engine.release_slot(1)
        first = engine.prefill(rows, batched=batched)
        results.append((first, engine.decode([Row(r.slot, [5], r.adapter) for r in rows])))
        for s in (0, 2, 3):
            engine.release_slot(s)
    np.testing.assert_allclose(results[1][0], results[0][0], atol=ATOL)
    np.testing.assert_allclose(results[1][1], results[0][1], atol=ATOL)
    assert not np.allclose(results[0][0][0], results[0][0][1], atol=0.1)  # rows differ: a mix-up would show


def test_prompts_arriving_together_are_prefilled_in_one_run(model, monkeypatch):
    """Prompts queued at once (each with its own adapter) share one prefill run, and each gets its own tokens."""
    calls = []
    run = model.engine.run
    monkeypatch.setattr(model.engine, "run", lambda rows: (calls.append([len(r.tokens) for r in rows]), run(rows))[1])
    prompts = [PROMPTS[2][:10], PROMPTS[2][1:10], PROMPTS[0] + PROMPTS[1][:3]]  # 10, 9, 10 tokens
    adapters = ["a2", None, "a1"]
    singles = [greedy(model, p, a) for p, a in zip(prompts, adapters)]
    assert all(len(c) == 1 for c in calls)  # one prompt at a time: nothing to pack
    calls.clear()
    assert_batch_equals_singles(model, prompts, adapters, singles)
    assert calls == [[9, 10, 10]]


def test_chunked_prefill_and_preemption_keep_every_rows_tokens(model):
    """A prompt prefilled in pieces of 3 tokens between the decode steps of running rows, and rows preempted
    mid-generation then resumed (prompt + output prefilled again), give the tokens of uninterrupted single runs,
    greedy and seeded-sampled."""
    from ortlora.runtime.batch import Batch
    from ortlora.runtime.request import Request

    long_prompt = PROMPTS[2] + PROMPTS[0]
    prompts, names = [PROMPTS[0], PROMPTS[1], long_prompt], ["a1", None, "a2"]
    for kw in (dict(max_new_tokens=8, min_new_tokens=8), dict(max_new_tokens=8, temperature=1.0, seed=3)):
        singles = [model.complete([p], [a], **kw)[0].token_ids for p, a in zip(prompts, names)]
        model.engine.prefix_cache.clear()  # every piece prefilled, none found cached
        reqs = [Request(p, SamplingParams(**kw), model.tokenizer, model.adapters.acquire(a),
                        eos_ids=model.eos_ids)
                for p, a in zip(prompts, names)]
        batch = Batch(model.engine, model.adapters, prefill_chunk=3)
        for r in reqs[:2]:
            batch.add(r)
        batch.step()  # the first two are running ...
        batch.add(reqs[2])  # ... when the long one arrives: 19 tokens in pieces of 3 between their steps
        steps = 0
        while batch.prefilling or batch.waiting:
            batch.step()
            steps += 1
            if steps == 2:
                batch.preempt(reqs[0])  # out of its slot, then back: recomputed, not restarted
                batch.add(reqs[0])
        assert steps >= 6  # ceil(19 / 3) pieces, one per step
        while batch:
            batch.step()
        assert [r.token_ids for r in reqs] == singles
        assert model.engine.free_slots == 4 and not any(a.refs for a in model.adapters)


@pytest.mark.parametrize("arch", ["qwen2", "phi3"])
@pytest.mark.parametrize("unified_steps", [False, True])
def test_adapters_of_different_module_classes_in_one_batch_equal_peft(tiny, arch, unified_steps):
    """The pool gives an adapter slots only in the module classes it has (attention, MLP): rows whose adapters
    are attention-only, MLP-only, both, and none share one prefill and one decode step, each equal to transformers
    + PEFT for its own adapter, and the attention-only adapter holds no MLP slot."""
    from ortlora.runtime.adapters import Adapters
    from reference import hf_logits

    attn, mlp = (["qkv_proj", "o_proj"], ["gate_up_proj", "down_proj"]) if arch == "phi3" else \
        (["q_proj", "v_proj"], ["up_proj", "down_proj"])
    hf_dir = tiny.model(arch)
    peft = {"attn": tiny.adapter(hf_dir, "cls-attn", r=4, target_modules=attn, seed=21),
            "mlp": tiny.adapter(hf_dir, "cls-mlp", r=8, target_modules=mlp, seed=22),
            "both": tiny.adapter(hf_dir, "cls-both", r=2, target_modules=attn + mlp, seed=23)}
    folder = tiny.export(hf_dir, "classes", adapter_path=list(peft.values()))
    engine = Engine(folder, slots=5, max_len=32, unified_steps=unified_steps)
    assert engine.unified == unified_steps  # the unified graph's form is recognized: its prompt group is tested
    store = Adapters.for_engine(engine)
    handles = {n: store.load(convert_adapter(p, folder / f"{n}.onnx_adapter", model=folder), n) for n, p in peft.items()}
    assert len(engine.lora_classes) == 2
    names = ["attn", "mlp", None, "both"]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(4)]
    got = engine.prefill([Row(i, p, handles.get(n)) for i, (p, n) in enumerate(zip(prompts, names))])
    nxt = [int(np.argmax(g)) for g in got]
    rows = [Row(i, [t], handles.get(n)) for i, (t, n) in enumerate(zip(nxt, names))]
    late = Row(4, PROMPTS[1], handles["attn"])  # a prompt arriving during the decode step
    if unified_steps:  # one run: the prompt group meets its own view of each class's slots
        step, (late_logits,) = engine.step(rows, [late])
        late_logits = late_logits[-1]
    else:
        step, late_logits = engine.decode(rows), engine.prefill([late])[0]
    for i, name in enumerate(names):
        want = hf_logits(hf_dir, [prompts[i] + [nxt[i]]], peft.get(name))[0]
        np.testing.assert_allclose(got[i], want[-2], atol=ATOL, err_msg=f"{name} prefill")
        np.testing.assert_allclose(step[i], want[-1], atol=ATOL, err_msg=f"{name} decode")
    np.testing.assert_allclose(late_logits, hf_logits(hf_dir, [PROMPTS[1]], peft["attn"])[0][-1], atol=ATOL)
    slots = {n: tuple(run.where.get(h.uid, 0) for run in engine.pool.runs) for n, h in handles.items()}
    mlp_class = next(k for k, run in enumerate(engine.pool.runs) if any("mlp" in key for key in run.lora_inputs))
    assert slots["attn"][mlp_class] == 0 and slots["mlp"][1 - mlp_class] == 0  # no slot where it has no module
    assert all(slots["both"]) and slots["mlp"][mlp_class] and slots["attn"][1 - mlp_class]
