"""The step planner and the batch over a fake engine (no onnxruntime): each step's budget is kept, prompts arriving
together share runs, padding is weighed against a run's fixed cost, prompts with a past run alone, nobody starves,
the fair queue's order is kept, and the tokens do not depend on how prompts were packed."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest

from ortlora.runtime import planner
from ortlora.runtime.planner import Limits, Prompt


def _cost(runs, limits):
    return sum(limits.overhead + r.padded for r in runs)


# -- the planner alone ---------------------------------------------------------------------------------------------
def test_prompts_arriving_together_share_one_run():
    limits = Limits(overhead=40)
    runs = planner.plan([Prompt(i, 32) for i in range(16)], budget=600, limits=limits)
    assert len(runs) == 1 and len(runs[0].pieces) == 16 and runs[0].width == 32
    assert _cost(runs, limits) == 40 + 16 * 32


def test_padding_is_weighed_against_another_run():
    """Three short prompts and a long one: padding the short ones to 200 costs more than a second run."""
    limits = Limits(overhead=40)
    runs = planner.plan([Prompt("a", 8), Prompt("b", 8), Prompt("long", 200), Prompt("c", 8)], 1000, limits)
    assert sorted(len(r.pieces) for r in runs) == [1, 3]
    assert _cost(runs, limits) == 2 * 40 + 3 * 8 + 200
    # with a run costing more than the padding would, one run
    heavy = Limits(overhead=1000)
    assert len(planner.plan([Prompt("a", 8), Prompt("b", 8), Prompt("long", 200)], 5000, heavy)) == 1


def test_begun_prompts_run_alone_and_the_budget_is_kept():
    limits = Limits(overhead=10, min_chunk=4)
    rng = random.Random(0)
    for _ in range(300):
        prompts = [Prompt(i, rng.randint(1, 300), begun=rng.random() < 0.3, all_logits=rng.random() < 0.1)
                   for i in range(rng.randint(1, 12))]
        budget = rng.randint(20, 1500)
        runs = planner.plan(prompts, budget, limits)
        by_key = {p.key: p for p in prompts}
        head = prompts[0]
        head_min = limits.overhead + min(head.left, limits.min_chunk, limits.logit_rows if head.all_logits else 10**9)
        assert _cost(runs, limits) <= max(budget, head_min) + 1e-9
        for run in runs:
            assert run.padded <= limits.run_tokens and sum(p.logits for p in run.pieces) <= limits.logit_rows
            if any(by_key[p.key].begun for p in run.pieces):
                assert len(run.pieces) == 1  # the engine packs only prompts not yet begun
            for p in run.pieces:
                assert 1 <= p.tokens <= by_key[p.key].left
                want = p.tokens if by_key[p.key].all_logits else int(p.tokens == by_key[p.key].left)
                assert p.logits == want
        served = [p.key for r in runs for p in r.pieces]
        assert len(served) == len(set(served))
        assert served and head.key in served  # the first prompt always gets some tokens: no starvation
        # FIFO: a prompt is served only if every earlier one is (a later one never jumps a skipped one)
        order = sorted(served)
        assert order == list(range(len(order)))


def test_the_first_prompt_always_progresses_even_over_budget():
    limits = Limits(overhead=100, min_chunk=8)
    runs = planner.plan([Prompt("long", 5000, begun=True), Prompt("next", 10)], budget=50, limits=limits)
    assert [(p.key, p.tokens) for r in runs for p in r.pieces] == [("long", 8)]


def test_prompt_logprobs_rows_are_bounded_per_run():
    limits = Limits(logit_rows=64)
    runs = planner.plan([Prompt("score", 500, all_logits=True), Prompt("b", 30)], budget=2000, limits=limits)
    pieces = {p.key: p for r in runs for p in r.pieces}
    assert pieces["score"].tokens == 64 and pieces["score"].logits == 64
    assert all(sum(p.logits for p in r.pieces) <= 64 for r in runs)


# -- the batch over a fake engine ----------------------------------------------------------------------------------
class FakeEngine:
    """Slots of tokens and the engine's rules: a run packs rows only while their slots are empty. A position's
    logits pick the token `sum(the tokens so far) % vocab`, so a slot holding the wrong tokens shows."""

    def __init__(self, slots=4, max_len=512, vocab=97):
        self.slots, self.max_len = slots, max_len
        self.info = SimpleNamespace(vocab_size=vocab, context_length=max_len)
        self.lengths = np.zeros(slots, np.int64)
        self.held = [[] for _ in range(slots)]
        self._free = list(range(slots))
        self.prefix_cache = None
        self.runs: list[list[tuple[int, int]]] = []  # per prefill run: (slot, tokens) of each row

    @property
    def free_slots(self):
        return len(self._free)

    def acquire_slot(self):
        self._free.sort()
        slot = self._free.pop(0)
        self.lengths[slot], self.held[slot] = 0, []
        return slot

    def release_slot(self, slot):
        self.lengths[slot] = 0
        if slot not in self._free:
            self._free.append(slot)

    def truncate(self, slot, n):
        self.lengths[slot] = min(int(self.lengths[slot]), n)
        del self.held[slot][n:]

    def forget_adapter(self, adapter):
        pass

    def _logits(self, tokens):
        out = np.zeros(self.info.vocab_size, np.float32)
        out[sum(tokens) % self.info.vocab_size] = 1
        return out

    def run(self, rows):
        assert len(rows) == 1 or not any(self.lengths[r.slot] for r in rows), "a row with a past shares a run"
        self.runs.append([(r.slot, len(r.tokens)) for r in rows])
        out = []
        for r in rows:
            base = self.held[r.slot][:int(self.lengths[r.slot])]
            seq = base + list(r.tokens)
            self.held[r.slot], self.lengths[r.slot] = seq, len(seq)
            out.append(np.stack([self._logits(seq[:len(seq) - k]) for k in range(r.logits - 1, -1, -1)])
                       if r.logits else np.zeros((0, self.info.vocab_size), np.float32))
        return out

    def decode(self, rows):
        return np.stack([self.run([r])[0][-1] for r in rows]) if rows else np.zeros((0, self.info.vocab_size))


class _Tok:
    eos_ids = ()

    def stream(self, skip_special_tokens: bool = True):
        return SimpleNamespace(add=lambda t: "", flush=lambda: "")


def _request(prompt, n=4, **kw):
    from ortlora.runtime.request import Request
    from ortlora.runtime.sampling import SamplingParams

    return Request(list(prompt), SamplingParams(max_new_tokens=n, **kw), _Tok())


def _batch(engine, overhead=20.0, decode_tokens=40.0):
    """A batch whose budget knows its costs: a run's fixed cost `overhead` tokens, a decode step `decode_tokens`."""
    from ortlora.runtime.batch import Batch

    batch = Batch(engine)
    batch.budget.per_token, batch.budget.fixed = 1.0, overhead
    batch.budget.decode_s = decode_tokens
    batch.budget.observe_prefill = lambda padded, seconds: None  # fake times: keep the costs set
    batch.budget.observe_decode = lambda seconds, rows=0: None
    return batch


def _run(batch, requests, arrivals=None):
    """Step until done; `arrivals`: step -> requests added then. Returns the budgets and plans of every step."""
    arrivals = arrivals or {0: requests}
    steps = []
    k = 0
    while batch or any(s >= k for s in arrivals):
        for r in arrivals.get(k, ()):
            batch.add(r)
        batch.step()
        steps.append((batch.last_budget, list(batch.last_runs)))
        k += 1
        assert k < 10_000
    return steps


def test_batch_packs_a_burst_keeps_budgets_and_gives_the_tokens_of_one_at_a_time():
    rng = random.Random(1)
    prompts = [[rng.randint(1, 90) for _ in range(rng.randint(3, 60))] for _ in range(10)]
    alone = []
    for p in prompts:
        engine = FakeEngine(slots=1)
        req = _request(p, n=5)
        _run(_batch(engine), [req])
        alone.append(req.token_ids)
    engine = FakeEngine(slots=6)
    batch = _batch(engine)
    reqs = [_request(p, n=5) for p in prompts]
    steps = _run(batch, reqs, {0: reqs[:6], 3: reqs[6:]})  # a second burst while the first decodes
    assert [r.token_ids for r in reqs] == alone
    limits = batch.budget.limits()
    for budget, runs in steps:
        assert _cost(runs, limits) <= max(budget, limits.overhead + limits.min_chunk) + 1e-9
    assert max(len(run) for run in engine.runs) >= 3  # prompts shared runs
    assert all(len(run) == 1 or all(n for _, n in run) for run in engine.runs)


def test_a_long_prompt_is_chunked_while_others_decode_and_no_prompt_starves():
    """Streams decode; a long prompt and then short ones arrive: every step stays within its budget, the long one
    progresses every step (FIFO head), and the short ones behind it finish too."""
    engine = FakeEngine(slots=6)
    batch = _batch(engine, overhead=20, decode_tokens=30)  # while decoding: (2.5 - 1) x 30 = 45 tokens a step
    streams = [_request([i + 1] * 5, n=40) for i in range(3)]
    long = _request(list(range(1, 301)), n=2)
    shorts = [_request([7, 8, 9], n=2) for _ in range(2)]
    steps = _run(batch, streams + [long] + shorts, {0: streams, 2: [long], 3: shorts})
    assert all(r.finished and len(r.token_ids) == r.params.max_new_tokens for r in streams + [long] + shorts)
    chunks = [p.tokens for _, runs in steps for r in runs for p in r.pieces if p.key is long]
    assert len(chunks) >= 300 // 45 and max(chunks) <= 45
    for budget, runs in steps[3:]:
        if runs:
            assert _cost(runs, batch.budget.limits()) <= budget + 1e-9


def test_a_burst_next_to_few_streams_joins_at_once_and_one_prompt_next_to_many_is_chunked():
    """The budget follows who waits: twelve short prompts arriving next to one stream go in one step (each newcomer
    may stall the stream as much as one prompt next to a stream would, once), while one long prompt next to four
    streams is chunked within the gap bound of the batch it joins."""
    from ortlora.runtime.budget import GAP

    def batch_with(slots):
        engine = FakeEngine(slots=slots)
        batch = _batch(engine, overhead=20.0, decode_tokens=21.0)
        batch.budget.decode_rows = 1.0  # a decode step of 1 row measured at 21 tokens (= fixed + 1 x per_token)
        return engine, batch

    engine, batch = batch_with(13)
    stream = _request([3] * 5, n=12)
    burst = [_request([i + 2] * 20, n=2) for i in range(12)]
    steps = _run(batch, [stream, *burst], {0: [stream], 2: burst})
    first = steps[2][1]  # the step the burst arrived in
    assert {p.key for run in first for p in run.pieces} == set(burst)
    assert all(p.tokens == 20 for run in first for p in run.pieces)  # whole prompts, in one step
    decode_13 = 21.0 * (20.0 + 13) / (20.0 + 1)
    assert steps[2][0] == pytest.approx((GAP - 1) * decode_13 * 12)

    engine, batch = batch_with(6)
    streams = [_request([i + 1] * 5, n=40) for i in range(4)]
    long = _request(list(range(1, 301)), n=2)
    steps = _run(batch, [*streams, long], {0: streams, 2: [long]})
    chunks = [p.tokens for _, runs in steps for r in runs for p in r.pieces if p.key is long]
    assert len(chunks) >= 5 and all(budget == pytest.approx((GAP - 1) * 21.0 * 25 / 21)  # rows 4 + 1
                                    for budget, runs in steps[2:2 + len(chunks)])
    assert all(r.finished and len(r.token_ids) == r.params.max_new_tokens for r in streams + [long])


@pytest.mark.parametrize("scored", [False, True])
def test_prompt_logprobs_cover_every_prompt_token_however_chunked(scored):
    engine = FakeEngine(slots=2)
    batch = _batch(engine)
    batch.budget.prefill_chunk = 7  # small chunks while the other request decodes
    other = _request([5, 6], n=30)
    req = _request(list(range(3, 50)), n=0 if scored else 2, prompt_logprobs=1)
    events = []
    batch.add(other)
    batch.step()
    batch.add(req)
    while batch:
        events += [c for r, c in batch.step() if r is req]
    lps = events[0].prompt_logprobs
    assert lps[0] is None and len(lps) == len(req.prompt_ids)
    for i, lp in enumerate(lps[1:], start=1):  # position i - 1 predicts token i: the fake's pick is sum % vocab
        assert lp.token == req.prompt_ids[i]
        assert lp.top[0][0] == sum(req.prompt_ids[:i]) % engine.info.vocab_size
    if scored:
        assert events[0].finish_reason == "length" and not req.token_ids


def test_the_fair_queue_order_survives_packing():
    """The scheduler over a real Batch on the fake engine: tenant a floods 12 jobs, tenant b sends 3 after; b's are
    admitted before a's backlog (the least-served tenant first), all finish, and runs pack prompts of both."""
    import threading

    from ortlora.runtime.metrics import Metrics
    from ortlora.runtime.sampling import SamplingParams
    from ortlora.runtime.scheduler import Job, Scheduler

    engine = FakeEngine(slots=4)
    batch = _batch(engine)
    sched = Scheduler(batch, _Tok(), frozenset(), Metrics(4), max_queue=64)
    admitted, lock = [], threading.Lock()
    add = batch.add
    batch.add = lambda req: (admitted.append(req), add(req))
    done = threading.Event()
    finished = []

    def sink(ev, tenant):
        if ev.finish_reason:
            with lock:
                finished.append(tenant)
                if len(finished) == 15:
                    done.set()

    jobs = [Job(i, [3 + i, 4, 5], None, None, SamplingParams(max_new_tokens=6), lambda ev: sink(ev, "a"), "a")
            for i in range(12)]
    jobs += [Job(i, [9, 8, 7 + i], None, None, SamplingParams(max_new_tokens=6), lambda ev: sink(ev, "b"), "b")
             for i in range(3)]
    for job in jobs:
        sched.submit([job])
    sched.start()
    assert done.wait(30) and sched.shutdown(timeout=10)
    tenant_of = {j.request: j.tenant for j in jobs}
    order = [tenant_of[r] for r in admitted]
    assert order[:3] == ["b", "b", "b"]  # a's own backlog counts against it
    assert sched.metrics.prefill_run_rows.snapshot()[1.0] < sched.metrics.prefill_runs.get()  # some runs packed
