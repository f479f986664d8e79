"""Shared by the runtime tests: the tiny qwen2 with two adapters of different ranks and targets (fixtures `lora`,
`model`), its prompts, and the scenario check every mixed-batch test uses (`assert_batch_equals_singles`)."""

from __future__ import annotations

import pytest

from ortlora.adapters.convert import convert_adapter

N = 8  # new tokens per greedy comparison
# logits through the static buffer vs the reference loop's growing cache: same kernels, observed |diff| < 1e-5;
# the mixed graph multiplies each row's group by its slot's weights in a batched MatMul: another summation order.
ATOL = 1e-4
PROMPTS = [[5, 17, 33, 9, 81, 100, 7], [12, 40, 66, 3], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [99]]


@pytest.fixture(scope="module")
def lora(tiny):
    """A tiny qwen2 with two adapters of different ranks and targets, exported with the union of their targets."""
    model = tiny.model("qwen2", tie_word_embeddings=True)
    a1 = tiny.adapter(model, "rt-a1", r=4, target_modules=["q_proj", "v_proj", "down_proj"], seed=11)
    a2 = tiny.adapter(model, "rt-a2", r=8, target_modules=["q_proj", "k_proj", "o_proj", "gate_proj", "up_proj"],
                      seed=12)
    folder = tiny.export(model, "rt", adapter_path=[a1, a2])
    files = {name: convert_adapter(peft, folder / f"{name}.onnx_adapter", model=folder)
             for name, peft in (("a1", a1), ("a2", a2))}
    return model, folder, {"a1": a1, "a2": a2}, files


@pytest.fixture(scope="module")
def model(lora):
    from ortlora import Model

    _, folder, _, files = lora
    m = Model(folder, slots=4, max_len=64)
    for name, path in files.items():
        m.adapters.load(path, name=name)
    return m


def greedy(m, prompt, adapter=None, n=N):
    return m.complete([prompt], [adapter], max_new_tokens=n, min_new_tokens=n)[0].token_ids


def assert_batch_equals_singles(m, prompts, adapters, singles=None, n=N, **sampling):
    """The scenario check: every row of one batch (each with its own adapter) gets the tokens it gets alone, and
    nothing stays held afterwards. Greedy unless `sampling` says otherwise (seeded rows draw from their own
    generator, so a batch changes nothing for them either)."""
    kw = sampling or dict(max_new_tokens=n, min_new_tokens=n)
    if singles is None:
        singles = [m.complete([p], [a], **kw)[0].token_ids for p, a in zip(prompts, adapters)]
    batch = m.complete(prompts, adapters, **kw)
    assert [c.token_ids for c in batch] == singles
    assert [c.adapter for c in batch] == list(adapters)
    assert m.engine.free_slots == m.engine.slots and not any(a.refs for a in m.adapters)
    return singles
