"""Unit tests of the runtime's and the scheduler's pure pieces, no model run: the adapter pool (grouping, LRU, rank
growth), the mixed-adapter graph against a plain numpy evaluation, stop-string scanning, the scheduler's fair
queue, and the scheduler driven with a fake batch."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from ortlora.adapters.validate import LoraInput
from ortlora.runtime.multi_lora import index_names, mixed_adapter_model, module_classes
from ortlora.runtime.pool import AdapterPool, group_rows

M = "model.layers.0.mlp.up_proj"
A, B = f"{M}.lora_A.weight", f"{M}.lora_B.weight"
IN, OUT = 6, 5
LORA = {A: LoraInput(A, np.dtype(np.float32), (IN, f"{M}.lora_r")),
        B: LoraInput(B, np.dtype(np.float32), (f"{M}.lora_r", OUT))}


def _adapter(uid, rank, seed):
    rng = np.random.default_rng(seed)
    return SimpleNamespace(uid=uid, rank=rank, name=f"x{uid}", params={
        A: rng.standard_normal((IN, rank)).astype(np.float32), B: rng.standard_normal((rank, OUT)).astype(np.float32)})


# -- the adapter pool --------------------------------------------------------------------------------------------
def test_pool_groups_rows_by_slot_and_scatters_them_back():
    idx = index_names(0)
    g = group_rows([3, 1, 3, 0, 1, 3], idx)  # rows -> slots: slot 0 (no adapter) only when a row has none
    assert (g.first, g.count) == (0, 4)  # slots 0..3 bound
    width = 3  # slot 3 has the most rows
    gather, scatter = g.feeds[idx.gather], g.feeds[idx.scatter]
    assert len(gather) == 4 * width
    rows = np.arange(6) * 10
    grouped = rows[gather]  # [S·G]: each slot's rows, padded with copies of row 0
    for slot, members in {0: [3], 1: [1, 4], 2: [], 3: [0, 2, 5]}.items():
        block = grouped[slot * width:(slot + 1) * width]
        assert list(block[:len(members)]) == [rows[m] for m in members]
    assert list(grouped[scatter]) == list(rows)  # every row back in its place
    assert list(g.feeds[idx.group_shape]) == [4, -1, 0] and list(g.feeds[idx.ungroup_shape]) == [4 * width, -1, 0]
    assert g.feeds[idx.live].ravel().tolist() == [False, True, True, True]  # slot 0's group: zeroed
    only = group_rows([2, 2], idx)
    assert (only.first, only.count) == (2, 1)  # no row without an adapter: slot 0 is not bound
    assert only.feeds[idx.live].ravel().tolist() == [True]
    # rows at slot 0 add nothing: one of them is computed (then zeroed), all read it, and they widen no group
    z = group_rows([0, 2, 0, 0, 2], idx)
    assert (z.first, z.count) == (0, 3) and len(z.feeds[idx.gather]) == 3 * 2  # width 2: slot 2's rows
    assert z.feeds[idx.gather][:2].tolist() == [0, 0] and z.feeds[idx.gather][4:].tolist() == [1, 4]
    assert z.feeds[idx.scatter].tolist() == [0, 4, 0, 0, 5] and z.feeds[idx.live].ravel().tolist() == [False, True, True]


def test_pool_places_each_adapter_once_evicts_lru_and_grows_rank():
    pool = AdapterPool(LORA, capacity=2, dtype=np.float32)
    run = pool.runs[0]  # one module class
    a, b, c = _adapter(1, 2, 0), _adapter(2, 4, 1), _adapter(3, 3, 2)
    slots = pool.place({1: a, 2: b})
    assert sorted(v[0] for v in slots.values()) == [1, 2] and run.rank == 4 and pool.generation == 1
    np.testing.assert_array_equal(run.buffers[A][slots[1][0]][:, :2], a.params[A])
    assert not run.buffers[A][slots[1][0]][:, 2:].any()  # rank padded with zeros: exact
    assert not run.buffers[A][0].any() and not run.buffers[B][0].any()  # slot 0 stays zero
    pool.place({1: a})  # a used more recently than b
    slots = pool.place({1: a, 3: c})  # needs a slot: b (least recently used, not needed) goes
    assert 2 not in run.where and run.where[3] == slots[3][0] and pool.generation == 1  # rank 3 fits in 4
    np.testing.assert_array_equal(run.buffers[B][slots[3][0]][:3], c.params[B])
    big = _adapter(4, 8, 3)
    before = dict(run.where)
    slots = pool.place({4: big, 3: c})
    assert run.rank == 8 and pool.generation == 2  # rebuilt: bindings of the old buffers must go
    assert run.where[3] == before[3]  # a placed adapter keeps its slot across the rebuild
    np.testing.assert_array_equal(run.views(slots[3][0], 1)[A][0][:, :3], c.params[A])
    with pytest.raises(Exception, match="3 adapters in one batch, but the pool has 2 slots"):
        pool.place({1: a, 3: c, 4: big})
    pool.forget(c)
    assert 3 not in run.where


def test_a_placed_adapter_is_held_once_in_its_slot_and_gets_its_weights_back():
    """The adapters' owner's `Adapter` lends its weights to the pool: while placed, the slot holds the only copy
    (`params` copies it out); when the slot goes (LRU, rank growth, forget) the weights are private again, equal."""
    from ortlora.runtime.adapters import Adapter

    pool = AdapterPool(LORA, capacity=1, dtype=np.float32)
    run = pool.runs[0]  # one module class
    raw = [_adapter(0, r, seed) for r, seed in ((2, 0), (3, 1), (8, 2))]
    a, b, big = (Adapter(f"x{i}", dict(x.params)) for i, x in enumerate(raw))
    pool.place({a.uid: a})
    assert a._params is None and a._home is pool  # one copy: the slot's
    for k, v in raw[0].params.items():
        np.testing.assert_array_equal(a.params[k], v)
        assert a.params[k].shape == v.shape and not np.shares_memory(a.params[k], run.buffers[k])
    pool.place({b.uid: b})  # one slot: a goes, with its weights
    assert a._home is None and a.uid not in run.where and b._params is None
    for k, v in raw[0].params.items():
        np.testing.assert_array_equal(a._params[k], v)
    pool.place({big.uid: big})  # rank 8 > 3: buffers rebuilt; b leaves first (LRU), big holds the slot
    assert run.rank == 8 and b._home is None and big._params is None
    np.testing.assert_array_equal(b.params[B], raw[1].params[B])
    pool.forget(big)
    assert big._home is None and not run.where
    np.testing.assert_array_equal(big.params[A], raw[2].params[A])


def test_a_reused_slot_holds_exactly_its_new_adapter_whatever_the_last_one_wrote():
    """A slot is cleared only where its previous occupant wrote beyond the new weights: after any sequence of
    adapters of other ranks, other module subsets and with or without DoRA factors, the slot equals the new
    adapter zero-padded (ones for a factor it lacks), as a fresh slot would."""
    m2 = "model.layers.0.self_attn.q_proj"
    a2, b2, dora = f"{m2}.lora_A.weight", f"{m2}.lora_B.weight", f"{m2}.dora_scale"
    lora = {**LORA, a2: LoraInput(a2, np.dtype(np.float32), (4, f"{m2}.lora_r")),
            b2: LoraInput(b2, np.dtype(np.float32), (f"{m2}.lora_r", 3)),
            dora: LoraInput(dora, np.dtype(np.float32), (3,))}
    rng = np.random.default_rng(7)

    def adapter(uid, modules, rank):
        params = {}
        if "up" in modules:
            params[A], params[B] = rng.standard_normal((IN, rank)), rng.standard_normal((rank, OUT))
        if "q" in modules:
            params[a2], params[b2] = rng.standard_normal((4, rank)), rng.standard_normal((rank, 3))
        if "dora" in modules:
            params[dora] = rng.standard_normal(3)
        params = {k: v.astype(np.float32) for k, v in params.items()}
        return SimpleNamespace(uid=uid, rank=rank, name=f"x{uid}", params=params)

    pool = AdapterPool(lora, capacity=2, dtype=np.float32)
    assert [sorted(run.lora_inputs) for run in pool.runs] == [[A, B], sorted([a2, b2, dora])]  # mlp, self_attn
    keeper = adapter(0, "up q", 8)  # placed with each: every class's rank stays 8 (no rebuild: slots are reused)
    sequence = [("up q dora", 8), ("q", 2), ("up", 5), ("up q", 8), ("q dora", 3), ("up", 1), ("up q dora", 6)]
    slots = set()
    generation = None
    for uid, (modules, rank) in enumerate(sequence, start=1):
        x = adapter(uid, modules, rank)
        placed = pool.place({0: keeper, uid: x})[uid]
        assert all(run.rank == 8 for run in pool.runs)
        generation = generation or pool.generation
        assert pool.generation == generation
        for run, slot in zip(pool.runs, placed):
            if not any(k in x.params for k in run.lora_inputs):
                assert slot == 0  # no slot in a class it has no module of
                continue
            slots.add(slot)
            for key in run.lora_inputs:
                want = np.ones(3, np.float32) if key == dora else np.zeros(run.buffers[key].shape[1:], np.float32)
                got = x.params.get(key)
                if got is not None:
                    if key == dora:
                        want = got
                    elif key in (A, a2):
                        want[:, :rank] = got
                    else:
                        want[:rank] = got
                np.testing.assert_array_equal(run.buffers[key][slot], want, err_msg=f"{modules} rank {rank}: {key}")
    assert slots == {2}  # one slot per class, reused by each in turn


def test_an_adapter_takes_slots_only_in_the_module_classes_it_has():
    """Per module class its own slots: an attention-only adapter has no MLP slot, so a step's MLP binds only the
    slots of adapters with MLP modules; each class packs its busy adapters from slot 1 and grows its own rank."""
    m2 = "model.layers.0.self_attn.q_proj"
    a2, b2 = f"{m2}.lora_A.weight", f"{m2}.lora_B.weight"
    lora = {**LORA, a2: LoraInput(a2, np.dtype(np.float32), (4, f"{m2}.lora_r")),
            b2: LoraInput(b2, np.dtype(np.float32), (f"{m2}.lora_r", 3))}
    assert module_classes(lora) == [[A, B], [a2, b2]]
    rng = np.random.default_rng(3)

    def adapter(uid, rank, mlp, attn):
        params = {}
        if mlp:
            params[A], params[B] = rng.standard_normal((IN, rank)), rng.standard_normal((rank, OUT))
        if attn:
            params[a2], params[b2] = rng.standard_normal((4, rank)), rng.standard_normal((rank, 3))
        return SimpleNamespace(uid=uid, rank=rank, name=f"x{uid}", refs=1,
                               params={k: v.astype(np.float32) for k, v in params.items()})

    pool = AdapterPool(lora, capacity=4, dtype=np.float32)
    mlp_run, attn_run = pool.runs
    both, attn_only, attn_big, mlp_only = adapter(1, 4, True, True), adapter(2, 2, False, True), \
        adapter(3, 8, False, True), adapter(4, 2, True, False)
    slots = pool.place({x.uid: x for x in (both, attn_only, attn_big, mlp_only)})
    assert slots == {1: (1, 1), 2: (0, 2), 3: (0, 3), 4: (2, 0)}
    assert (mlp_run.rank, attn_run.rank) == (4, 8)  # the MLP slots are not padded to the attention-only rank 8
    assert mlp_run.buffers[A].shape == (5, IN, 4) and attn_run.buffers[a2].shape == (5, 4, 8)
    rows = [both, attn_only, mlp_only, attn_big]
    g = mlp_run.groups([slots[x.uid][0] for x in rows])
    assert (g.first, g.count) == (0, 3)  # slot 0 for the two rows without MLP modules, then slots 1 and 2
    h = attn_run.groups([slots[x.uid][1] for x in rows])
    assert (h.first, h.count) == (0, 4)
    np.testing.assert_array_equal(mlp_run.buffers[B][2][:2], mlp_only.params[B])
    np.testing.assert_array_equal(attn_run.buffers[a2][3], attn_big.params[a2])
    both.refs = 0
    slots = pool.place({x.uid: x for x in (attn_only, attn_big, mlp_only)})  # `both` idle: it leaves (a hole)
    assert slots == {2: (0, 2), 3: (0, 1), 4: (1, 0)} and 1 not in pool.placed  # the last busy ones moved in
    np.testing.assert_array_equal(attn_run.buffers[b2][1], attn_big.params[b2])
    np.testing.assert_array_equal(mlp_run.buffers[A][1][:, :2], mlp_only.params[A])
    assert mlp_run.rank == 2  # shrunk to what the MLP's adapters need
    generation = pool.generation
    pool.forget(mlp_only)  # the MLP class left empty keeps its buffers: no rebuild (and no bindings dropped) ...
    assert not mlp_run.where and mlp_run.rank == 2 and pool.generation == generation
    again = adapter(5, 2, True, False)
    assert pool.place({again.uid: again, attn_only.uid: attn_only}) == {5: (1, 0), 2: (0, 2)}
    assert pool.generation == generation  # ... when an adapter with MLP modules comes back


def test_the_pool_closes_holes_in_the_run_of_busy_slots():
    """A step binds the run of slots from its lowest to its highest: an idle adapter between busy ones is read for
    nothing. The last busy adapter moves into such a hole (an idle one leaves the pool; a busy one, held by a
    running request though not in this batch, never does), its weights intact."""
    pool = AdapterPool(LORA, capacity=5, dtype=np.float32)
    run = pool.runs[0]  # one module class
    xs = [_adapter(uid, rank, uid) for uid, rank in ((1, 2), (2, 4), (3, 3), (4, 4), (5, 1))]
    for x in xs:
        x.refs = 1
    pool.place({x.uid: x for x in xs})
    assert [run.where[x.uid] for x in xs] == [1, 2, 3, 4, 5]
    xs[1].refs = xs[3].refs = 0  # slots 2 and 4 go idle; slot 3's adapter is held by a request, not in this batch
    slots = pool.place({1: xs[0], 5: xs[4]})
    assert slots == {1: (1,), 5: (2,)} and run.where[3] == 3  # 5 moved into the first hole; the busy one stayed
    assert 2 not in run.where and 4 in run.where  # the idle adapter in the hole left; the other one stays placed
    for key in LORA:  # the moved adapter's slot equals it, zero-padded to the pool's rank (4; it has rank 1)
        want = np.zeros(run.buffers[key].shape[1:], np.float32)
        if key == A:
            want[:, :1] = xs[4].params[A]
        else:
            want[:1] = xs[4].params[B]
        np.testing.assert_array_equal(run.buffers[key][2], want)
    xs[2].refs = 0
    pool.place({1: xs[0]})  # busy: slots 1 and 2, no hole between: nothing moves
    assert run.where[5] == 2 and run.where[3] == 3


def test_a_full_pool_gives_a_new_adapter_the_idle_slot_nearest_the_busy_ones():
    pool = AdapterPool(LORA, capacity=3, dtype=np.float32)
    run = pool.runs[0]  # one module class
    a, b, c, d, e = (_adapter(uid, 2, uid) for uid in (1, 2, 3, 4, 5))
    for x in (a, b, c):
        x.refs = 0
    pool.place({1: a, 2: b, 3: c})  # slots 1, 2, 3
    a.refs = 1  # a request holds a
    pool.place({1: a, 2: b})
    pool.place({1: a})  # c is the least recently used, b the idle one nearest the busy slot
    assert pool.place({4: d}) == {4: (2,)}  # next to the busy slot, not the least recently used (c, slot 3)
    assert 2 not in pool.placed and run.where[3] == 3
    pool.place({1: a})
    a.refs = 0  # nothing busy: the least recently used goes (c, slot 3), whatever its place
    assert pool.place({5: e}) == {5: (3,)} and 3 not in pool.placed and run.where[1] == 1


# -- the mixed-adapter graph ---------------------------------------------------------------------------------------
def _toy_model(path):
    """y = x @ W + (x @ A) @ B: the exported graph's shape of a LoRA module."""
    w = helper.make_tensor("W", TensorProto.FLOAT, [IN, OUT], np.random.default_rng(9).standard_normal(IN * OUT))
    zeros_a = helper.make_tensor(A, TensorProto.FLOAT, [IN, 0], [])
    zeros_b = helper.make_tensor(B, TensorProto.FLOAT, [0, OUT], [])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["base"]), helper.make_node("MatMul", ["x", A], ["xa"]),
             helper.make_node("MatMul", ["xa", B], ["delta"]), helper.make_node("Add", ["base", "delta"], ["y"])]
    graph = helper.make_graph(
        nodes, "toy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch_size", "seq", IN]),
                       helper.make_tensor_value_info(A, TensorProto.FLOAT, [IN, f"{M}.lora_r"]),
                       helper.make_tensor_value_info(B, TensorProto.FLOAT, [f"{M}.lora_r", OUT])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch_size", "seq", OUT])], [w, zeros_a, zeros_b])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return onnx.numpy_helper.to_array(w)


def test_mixed_adapter_graph_gives_each_row_its_own_slot(tmp_path):
    """y[b] = x[b] @ W + (x[b] @ A[slot[b]]) @ B[slot[b]], for rows in any order over pool slots."""
    import onnxruntime as ort

    w = _toy_model(tmp_path / "toy.onnx")
    proto = mixed_adapter_model(tmp_path / "toy.onnx", LORA)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    pool = AdapterPool(LORA, capacity=3, dtype=np.float32)
    adapters = [_adapter(1, 2, 0), _adapter(2, 3, 1), _adapter(3, 1, 2)]
    slot_of = pool.place({a.uid: a for a in adapters})
    row_adapters = [adapters[1], None, adapters[0], adapters[1], adapters[2]]
    (run,) = pool.runs
    groups = run.groups([slot_of[a.uid][0] if a else 0 for a in row_adapters])
    x = np.random.default_rng(4).standard_normal((5, 2, IN)).astype(np.float32)
    y = sess.run(["y"], {"x": x, **run.views(groups.first, groups.count), **groups.feeds})[0]
    for b, adapter in enumerate(row_adapters):
        want = x[b] @ w + (x[b] @ adapter.params[A] @ adapter.params[B] if adapter else 0)
        np.testing.assert_allclose(y[b], want, rtol=1e-5, atol=1e-5)


def test_mixed_adapter_graph_refuses_unknown_uses(tmp_path):
    from ortlora.errors import ModelError

    _toy_model(tmp_path / "toy.onnx")
    proto = onnx.load(str(tmp_path / "toy.onnx"))
    proto.graph.node.append(helper.make_node("Add", [A, A], ["odd"]))
    onnx.save(proto, str(tmp_path / "odd.onnx"))
    with pytest.raises(ModelError, match="uses LoRA input .* in a way the mixed-adapter graph does not know"):
        mixed_adapter_model(tmp_path / "odd.onnx", LORA)


# -- stop strings --------------------------------------------------------------------------------------------------
class _CharTokenizer:
    """One token per character (ids = code points): stop-string scanning without a model."""

    def stream(self, skip_special_tokens: bool = True):
        return SimpleNamespace(add=chr, flush=lambda: "")


@pytest.mark.parametrize("stops,pieces,want_text,want_hit", [
    (["END"], ["a", "b", "E", "N", "D", "x"], "ab", True),  # held back until the match completes
    (["END"], ["a", "E", "N", "x"], "aENx", False),  # a false start is released
    (["xy", "yz"], ["a", "y", "z"], "a", True),  # the earliest match wins
    (["ab"], ["a"], "a", False),  # the end of the text releases what was held
])
def test_stop_string_scan(stops, pieces, want_text, want_hit):
    from ortlora.runtime.request import Request
    from ortlora.runtime.sampling import SamplingParams

    req = Request([1], SamplingParams(stop=tuple(stops), max_new_tokens=len(pieces)), _CharTokenizer())
    out, hit = "", False
    for i, p in enumerate(pieces):
        text, hit = req._scan(p, final=i == len(pieces) - 1)
        out += text
        if hit:
            break
    assert (out, hit) == (want_text, want_hit)


# -- the scheduler's fair queue, and the scheduler over a fake batch ---------------------------------------------------
def _job(tenant, i=0, sink=None):
    from ortlora.runtime.sampling import SamplingParams
    from ortlora.runtime.scheduler import Job

    return Job(index=i, prompt_ids=[1, 2], adapter=None, adapter_name=None, params=SamplingParams(max_new_tokens=2),
               sink=sink or (lambda ev: None), tenant=tenant)


def test_fair_queue_round_robin_and_flooder_gives_way():
    from ortlora.serve.errors import QueueFull
    from ortlora.runtime.scheduler import FairQueue

    q = FairQueue(limit=6)
    flood = [_job("a", i) for i in range(5)]
    for j in flood:
        q.put([j], "a")
    q.put([_job("b", 0)], "b")
    assert len(q) == 6
    evicted = q.put([_job("b", 1)], "b")  # full: the tenant holding the most gives up its newest
    assert evicted == [flood[-1]] and len(q) == 6
    with pytest.raises(QueueFull):
        q.put([_job("a", 9)], "a")  # the flooder itself is refused
    order = [q.take().tenant for _ in range(6)]
    assert order == ["a", "b", "a", "b", "a", "a"]  # round-robin while both wait
    assert q.take() is None and len(q) == 0


class FakeBatch:
    """A batch whose requests each take `steps` steps, then finish; records what it ran."""

    def __init__(self, slots: int, steps: int = 3):
        self.slots, self.steps = slots, steps
        self.running, self.waiting = [], []
        self.order = []
        self.forgotten = []
        self.last_runs = []  # the prompt runs of the last step (none: this fake has no prompt work)
        self.last_merged = None  # and the one that shared the decode run

    @property
    def free_slots(self):
        return self.slots - len(self.running) - len(self.waiting)

    def __bool__(self):
        return bool(self.running or self.waiting)

    def add(self, req):
        self.waiting.append(req)
        self.order.append(req)

    def forget_adapter(self, adapter):
        self.forgotten.append(adapter)

    def cancel(self, req):
        self.preempt(req)

    def preempt(self, req):
        for group in (self.running, self.waiting):
            if req in group:
                group.remove(req)

    def step(self):
        from ortlora.runtime.request import Chunk

        self.running += self.waiting
        self.waiting = []
        events = []
        for req in list(self.running):
            req.token_ids.append(7)
            done = len(req.token_ids) >= self.steps
            if done:
                req.finish_reason = "length"
                self.running.remove(req)
            events.append((req, Chunk("x", [7], "length" if done else None)))
        time.sleep(0.001)
        return events


def test_scheduler_over_a_fake_batch_admits_fairly_and_finishes_everything():
    from ortlora.serve.metrics import Metrics
    from ortlora.runtime.scheduler import Scheduler

    batch = FakeBatch(slots=2)
    tokenizer = SimpleNamespace(stream=lambda skip_special_tokens=True: None)
    sched = Scheduler(batch, tokenizer, frozenset(), Metrics(2), max_queue=64)
    events, lock = [], threading.Lock()

    def sink(tenant):
        return lambda ev: (lock.acquire(), events.append((tenant, ev)), lock.release())

    flood = [_job("a", 0, sink("a")) for _ in range(20)]
    for j in flood:
        sched.submit([j])
    few = [_job("b", 0, sink("b")) for _ in range(3)]
    for j in few:
        sched.submit([j])
    sched.start()
    assert sched.shutdown(timeout=10)
    finished = [(t, ev) for t, ev in events if ev.finish_reason == "length"]
    assert len(finished) == 23 and all(j.done for j in flood + few)
    tenant_of = {j.request: j.tenant for j in flood + few}
    tenants = [tenant_of[r] for r in batch.order]
    assert tenants[:3] == ["b", "b", "b"]  # a's own backlog counts against it: b's three go before a's twenty


def test_scheduler_preempts_a_tenant_over_its_share_for_one_below_it():
    """Tenant a holds all 4 slots with long jobs; b's 2 jobs arrive: a gives up 2 slots at once (fair share 4/2),
    b's jobs finish long before a's, and a's preempted jobs resume and finish with all their tokens."""
    from ortlora.serve.metrics import Metrics
    from ortlora.runtime.scheduler import Scheduler

    batch = FakeBatch(slots=4, steps=40)
    sched = Scheduler(batch, SimpleNamespace(stream=lambda skip_special_tokens=True: None), frozenset(), Metrics(4), max_queue=64)
    done: dict[int, float] = {}
    jobs = [_job("a", 0) for _ in range(4)]
    for j in jobs:
        j.sink = lambda ev, j=j: done.setdefault(id(j), time.monotonic()) if ev.finish_reason else None
        sched.submit([j])
    sched.start()
    deadline = time.monotonic() + 5
    while len(batch.running) < 4 and time.monotonic() < deadline:
        time.sleep(0.001)
    late = [_job("b", 0) for _ in range(2)]
    for j in late:
        j.sink = lambda ev, j=j: done.setdefault(id(j), time.monotonic()) if ev.finish_reason else None
        sched.submit([j])
    assert sched.shutdown(timeout=20)
    assert sched.metrics.preemptions.get() == 2
    assert all(len(j.request.token_ids) == 40 and j.request.finish_reason == "length" for j in jobs + late)
    assert max(done[id(j)] for j in late) < max(done[id(j)] for j in jobs)
