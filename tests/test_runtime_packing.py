"""Packed prefill and the one engine loop, on a real (tiny) model: the same greedy tokens however prompts are
packed, chunked, cached or preempted; a prompt's logprobs through the engine's prefill equal transformers'; calls
from several threads share decode steps; ranks above the limit are refused."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from ortlora.runtime.engine import Engine, Row
from ortlora.runtime.sampling import SamplingParams
from reference import hf_logits
from runtime_helpers import PROMPTS

N = 6
LONG = [(11 * i + 5) % 300 + 3 for i in range(40)]  # longer than the 16-token prefix-cache block, twice


@pytest.fixture(scope="module")
def model(lora):
    from ortlora import Model

    _, folder, _, files = lora
    m = Model(folder, slots=4, max_len=96, unified_steps=True)  # prompt runs share decode steps' runs
    for name, path in files.items():
        m.adapters.load(path, name=name)
    return m


def _singles(model, prompts, adapters):
    return [model.complete([p], [a], max_new_tokens=N, min_new_tokens=N)[0].token_ids
            for p, a in zip(prompts, adapters)]


def test_engine_packs_rows_in_any_slots_and_refuses_rows_with_a_past(lora):
    """Rows over empty slots, not adjacent, right-padded in one run = each row alone, logits of every position;
    a row with a past shares no run (onnxruntime's GroupQueryAttention takes one such row per run)."""
    _, folder, _, _ = lora
    from ortlora.errors import OrtloraError
    from ortlora.runtime.adapters import Adapters

    engine = Engine(folder, slots=5, max_len=64, prefix_cache_bytes=0)
    store = Adapters(engine.lora_inputs)
    a1, a2 = (store.load(folder / f"{n}.onnx_adapter") for n in ("a1", "a2"))
    rows = [Row(4, PROMPTS[0], a1, len(PROMPTS[0])), Row(1, PROMPTS[2], None, len(PROMPTS[2])),
            Row(2, PROMPTS[3], a2, 1)]
    packed = engine.run(rows)
    alone = Engine(folder, slots=5, max_len=64, prefix_cache_bytes=0)
    for row, got in zip(rows, packed):
        want = alone.run([Row(row.slot, row.tokens, row.adapter, row.logits)])[0]
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert [len(x) for x in packed] == [7, 12, 1]
    np.testing.assert_allclose(engine.decode([Row(r.slot, [7], r.adapter) for r in rows]),
                               alone.decode([Row(r.slot, [7], r.adapter) for r in rows]), atol=1e-5)
    with pytest.raises(OrtloraError, match="one such row per run"):
        engine.run([Row(4, [5, 6]), Row(0, [5, 6])])


@pytest.mark.parametrize("budget", [dict(max_num_batched_tokens=8, prefill_chunk=3),
                                    dict(max_num_batched_tokens=256, prefill_chunk=16),
                                    dict(max_num_batched_tokens=2048)])
def test_the_same_greedy_tokens_whatever_the_packing(lora, model, budget):
    """Prompts of several lengths arriving in two waves (the second while the first decodes, so prompt runs share
    decode steps' runs), with prefix-cache hits (a shared 40-token head), pasts of different lengths, and a request
    preempted and resumed: every row gets the tokens it gets alone, under small and large step budgets."""
    from ortlora.runtime.batch import Batch
    from ortlora.runtime.request import Request

    prompts = [LONG + [1, 2], PROMPTS[0], LONG + [9], PROMPTS[2], LONG[:20] + PROMPTS[1], PROMPTS[3]]
    adapters = ["a1", None, "a1", "a2", None, "a1"]
    singles = _singles(model, prompts, adapters)
    assert len({tuple(s) for s in singles}) > 3
    model.engine.prefix_cache.clear()
    batch = Batch(model.engine, model.adapters, **budget)
    # set costs (measured ones vary with the machine's load): a run's fixed cost is 100 tokens' worth, so packing
    # pays; a decode step 50 tokens' worth
    batch.budget.per_token, batch.budget.fixed, batch.budget.decode_s = 1e-3, 0.1, 0.05
    batch.budget.observe_prefill = batch.budget.observe_decode = lambda *args: None
    reqs = [Request(p, SamplingParams(max_new_tokens=N, min_new_tokens=N), model.tokenizer,
                    model.adapters.acquire(a), eos_ids=model.eos_ids) for p, a in zip(prompts, adapters)]
    for r in reqs[:3]:
        batch.add(r)
    step, packed, merged = 0, 0, 0
    while batch:
        batch.step()
        packed = max(packed, max((len(r.pieces) for r in batch.last_runs), default=0))
        merged += batch.last_merged is not None
        step += 1
        if step == 2:
            for r in reqs[3:]:
                batch.add(r)
        if step == 4 and reqs[0] in batch.running:
            batch.preempt(reqs[0])  # out of its slot, then back: its prompt and output prefilled again
            batch.add(reqs[0])
    assert [r.token_ids for r in reqs] == singles
    assert model.engine.prefix_cache.hits > 0  # the second wave found the first's prefix
    assert merged > 0  # prompt work shared decode steps' runs (Engine.step)
    if budget["max_num_batched_tokens"] >= 64:
        assert packed >= 2  # prompts shared runs (a budget of 8 tokens chunks every prompt: each runs alone)
    assert model.engine.free_slots == 4 and not any(a.refs for a in model.adapters)


@pytest.mark.parametrize("adapter", [None, "a2"])
def test_prompt_logprobs_through_the_engine_equal_transformers(lora, model, adapter, monkeypatch):
    """`prompt_logprobs` from the engine's own prefill (chunked while another request decodes, the prompt's head in
    the prefix cache) equal log-softmax of transformers' + PEFT's full-sequence logits; max_new_tokens=0 only
    scores."""
    hf_dir, _, peft, _ = lora
    prompt = LONG + PROMPTS[0]
    model.complete([prompt], [adapter], max_new_tokens=1)  # its blocks are now cached: scoring must not use them
    ref = hf_logits(hf_dir, [prompt], peft[adapter] if adapter else None)[0].astype(np.float64)
    ref = ref - ref.max(-1, keepdims=True)
    ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    monkeypatch.setattr(model.batch.budget, "prefill_chunk", 5)  # 5 prompt tokens a step while others decode
    runs = []
    engine_run = model.engine.run
    monkeypatch.setattr(model.engine, "run", lambda rows: (runs.append(len(rows[0].tokens)), engine_run(rows))[1])
    engine_step = model.engine.step  # a chunk may share a decode step's run (Engine.step)
    monkeypatch.setattr(model.engine, "step",
                        lambda rows, prompt: (runs.append(len(prompt[0].tokens)), engine_step(rows, prompt))[1])
    busy = model.stream(PROMPTS[1], "a1", max_new_tokens=80, ignore_eos=True)
    next(busy)  # decoding: the prompt below is prefilled in chunks between its steps
    chunks = list(model.stream(prompt, adapter, max_new_tokens=0, prompt_logprobs=3))
    busy.close()
    assert max(runs[1:]) <= 5 and len(runs) > len(prompt) // 5  # scored in chunks
    assert len(chunks) == 1 and chunks[0].finish_reason == "length" and not chunks[0].token_ids
    lps = chunks[0].prompt_logprobs
    assert lps[0] is None and len(lps) == len(prompt)
    for i in range(1, len(prompt)):
        assert lps[i].token == prompt[i] and abs(lps[i].logprob - ref[i - 1, prompt[i]]) < 1e-4
        best = np.argsort(-ref[i - 1])[:3]
        assert [t for t, _ in lps[i].top] == best.tolist()
        assert lps[i].rank == 1 + int((ref[i - 1] > ref[i - 1, prompt[i]] + 1e-6).sum())
    with_tokens = list(model.stream(prompt, adapter, max_new_tokens=3, prompt_logprobs=0, ignore_eos=True))
    assert [lp and lp.logprob for lp in with_tokens[0].prompt_logprobs] == [lp and lp.logprob for lp in lps]
    assert sum(len(c.token_ids) for c in with_tokens) == 3


def test_streams_from_several_threads_share_decode_steps(model):
    """Four threads stream at once: their rows decode in shared steps (batch-size metric above 1) and each gets the
    tokens it gets alone."""
    prompts, adapters = [PROMPTS[0], PROMPTS[1], LONG, PROMPTS[2]], ["a1", "a2", None, "a1"]
    singles = _singles(model, prompts, adapters)
    metrics = model.scheduler.metrics
    before = metrics.batch_size.snapshot()
    out: dict[int, list[int]] = {}
    start = threading.Barrier(4)

    def worker(i):
        start.wait()
        out[i] = [t for c in model.stream(prompts[i], adapters[i], max_new_tokens=N, min_new_tokens=N)
                  for t in c.token_ids]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [out[i] for i in range(4)] == singles
    after = metrics.batch_size.snapshot()
    single_steps = after[1.0] - before[1.0]
    all_steps = after[float("inf")] - before[float("inf")]
    assert all_steps > single_steps  # some decode steps carried more than one thread's row


def test_ranks_above_the_limit_are_refused_by_name(lora, tmp_path):
    """An adapter of rank above `max_lora_rank`, or a combination whose ranks sum above it, is refused with the
    limit in the message; the same adapters under a higher limit serve."""
    from ortlora import Model
    from ortlora.errors import AdapterInvalid

    _, folder, _, files = lora  # a1: rank 4, a2: rank 8
    m = Model(folder, slots=2, max_len=64, max_lora_rank=6)
    m.adapters.load(files["a1"], name="a1")
    with pytest.raises(AdapterInvalid, match=r"rank 8 .*limit of 6 \(--max-lora-rank\)"):
        m.adapters.load(files["a2"], name="a2")
    assert "a2" not in m.adapters
    m.adapters.load(files["a1"], name="a1b")
    with pytest.raises(AdapterInvalid, match="rank 8 .*limit of 6"):  # 4 + 4 in the modules both target
        m.complete([PROMPTS[0]], [{"a1": 0.5, "a1b": 0.5}], max_new_tokens=1)
    assert m.complete([PROMPTS[0]], [{"a1": 0.5, "a1b": 0.0}], max_new_tokens=1)  # a zero weight adds no rank
    assert not any(a.refs for a in m.adapters)
    # a file larger than any adapter within the limit can be is refused before it is read into memory: by its
    # rank when its metadata says one above the limit, else by its size (here a rank-4 file with 64 MiB of tail)
    padded = tmp_path / "padded.onnx_adapter"
    padded.write_bytes(files["a1"].read_bytes() + bytes(64 << 20))
    with pytest.raises(AdapterInvalid, match=r"padded\.onnx_adapter is \d+ bytes, more than any adapter this server "
                                             r"takes for this model can be \(rank <= 6\)"):
        m.adapters.load(padded, name="padded")
    big = tmp_path / "big.onnx_adapter"
    big.write_bytes(files["a2"].read_bytes() + bytes(64 << 20))
    with pytest.raises(AdapterInvalid, match=r"rank 8 .*limit of 6"):
        m.adapters.load(big, name="big")
    assert "padded" not in m.adapters and "big" not in m.adapters
