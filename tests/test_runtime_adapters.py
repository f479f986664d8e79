"""The adapter store (mmap, checks, refcounts, LRU), streaming, stop strings, seeds and the errors that name the
problem, on the tiny exported model of test_runtime."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from ortlora.adapters.onnx_adapter import read_onnx_adapter, write_onnx_adapter
from ortlora.errors import AdapterError, ModelError, OrtloraError
from runtime_helpers import PROMPTS


def _owner(arr):
    """The object whose memory `arr` views (through numpy bases and memoryviews)."""
    while True:
        base = arr.obj if isinstance(arr, memoryview) else getattr(arr, "base", None)
        if base is None:
            return arr
        arr = base


def test_loaded_adapters_are_private_copies(lora, model, tmp_path):
    """A loaded adapter owns its weights: rewriting its file in place (truncate + write, as `cp` does) while a
    generation uses it cannot crash or change that generation; a re-load picks the new file up."""
    import shutil

    a1 = model.adapters.get("a1")
    assert all(_owner(arr).flags.owndata for arr in a1.params.values())  # its own memory, not the file's mapping
    assert a1.rank == 4 and model.adapters.get("a2").rank == 8
    assert sorted(model.adapters.names()) == ["a1", "a2"]
    _, _, _, files = lora
    path = shutil.copy(files["a1"], tmp_path / "live.onnx_adapter")
    model.adapters.load(path, name="live")
    want = model.complete(PROMPTS[0], "live", max_new_tokens=12, ignore_eos=True)[0].token_ids
    gen = model.stream(PROMPTS[0], adapter="live", max_new_tokens=12, ignore_eos=True)
    got = list(next(gen).token_ids)
    with open(path, "r+b") as f:  # in place: the same inode, first emptied, then other bytes
        f.truncate(0)
        f.write(files["a2"].read_bytes())
    got += [t for c in gen for t in c.token_ids]
    assert got == want
    model.adapters.load(path, name="live")  # a new version from the rewritten file: a2's weights
    assert model.complete(PROMPTS[0], "live", max_new_tokens=6, ignore_eos=True)[0].token_ids == \
        model.complete(PROMPTS[0], "a2", max_new_tokens=6, ignore_eos=True)[0].token_ids
    model.adapters.unload("live")


def test_adapter_that_does_not_fit(lora, model, tmp_path):
    _, _, _, files = lora
    params = dict(read_onnx_adapter(files["a1"]))
    key = "model.layers.0.self_attn.q_proj.lora_A.weight"
    params[key] = np.zeros((7, 4), np.float32)  # wrong in-features
    params["model.layers.0.mlp.foo.lora_A.weight"] = np.zeros((64, 4), np.float32)  # not a module of the model
    bad = write_onnx_adapter(tmp_path / "bad.onnx_adapter", params)
    with pytest.raises(AdapterError) as e:
        model.adapters.load(bad, name="bad")
    msg = str(e.value)
    assert "bad.onnx_adapter" in msg and key in msg and "mlp.foo" in msg  # every misfit, one error
    assert "bad" not in model.adapters
    with pytest.raises(AdapterError, match="no such adapter file"):
        model.adapters.load(tmp_path / "missing.onnx_adapter")
    assert "missing" not in model.adapters


def test_unknown_adapter_names_the_loaded_ones(model):
    with pytest.raises(AdapterError, match=r"no adapter named 'nope' is loaded \(loaded: a1, a2\)"):
        model.generate("hello", adapter="nope")
    with pytest.raises(AdapterError, match="nope"):
        model.stream("hello", adapter="nope")
    with pytest.raises(AdapterError, match="nope"):
        model.complete(["a", "b"], ["a1", "nope"])
    assert not any(a.refs for a in model.adapters)  # nothing left held


def _slow_steps(model, monkeypatch, seconds=0.05):
    """Decode steps take `seconds` (the engine thread generates on its own: a tiny model would finish at once)."""
    decode = model.engine.decode
    monkeypatch.setattr(model.engine, "decode", lambda rows: (time.sleep(seconds), decode(rows))[1])


def test_unload_while_generating_fails_or_waits(lora, model, monkeypatch):
    _, folder, _, files = lora
    _slow_steps(model, monkeypatch)
    model.adapters.load(files["a1"], name="busy")
    gen = model.stream(PROMPTS[0], adapter="busy", max_new_tokens=20, ignore_eos=True)
    next(gen)  # running: the adapter is held
    with pytest.raises(AdapterError, match="running generation"):
        model.adapters.unload("busy")
    t0 = time.monotonic()
    with pytest.raises(AdapterError, match="running generation"):
        model.adapters.unload("busy", wait=0.2)
    assert time.monotonic() - t0 >= 0.2
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (model.adapters.unload("busy", wait=True), done.set()))
    waiter.start()
    time.sleep(0.1)
    assert not done.is_set() and "busy" in model.adapters
    rest = list(gen)  # the generation finishes, then the waiting unload goes through
    waiter.join(5)
    assert done.is_set() and "busy" not in model.adapters
    assert rest[-1].finish_reason == "length"


def test_closing_a_stream_releases_slot_and_adapter(model, monkeypatch):
    _slow_steps(model, monkeypatch)
    gen = model.stream(PROMPTS[1], adapter="a2", max_new_tokens=20, ignore_eos=True)
    next(gen)
    assert model.adapters.get("a2").refs == 1 and model.engine.free_slots == 3
    gen.close()
    assert model.adapters.get("a2").refs == 0 and model.engine.free_slots == 4


def test_capacity_evicts_least_recently_used_idle(lora):
    """Loaded adapters are an LRU of `capacity`; an evicted adapter stays registered and loads again on use."""
    from ortlora.errors import AdapterBusy
    from ortlora.runtime.adapters import Adapters
    from ortlora.runtime.engine import Engine

    _, folder, _, files = lora
    store = Adapters(Engine(folder, max_len=16).lora_inputs, capacity=2)
    dropped = []
    store.on_unload(lambda a: dropped.append(a.name))
    store.load(files["a1"], name="x")
    store.load(files["a2"], name="y")
    held = store.acquire("x")  # x is used more recently and held
    store.load(files["a1"], name="z")  # evicts y, the idle one
    assert store.loaded() == ["x", "z"] and dropped == ["y"] and store.names() == ["x", "y", "z"]
    store.acquire("z")
    with pytest.raises(AdapterBusy, match="all 2 loaded adapters are in use"):
        store.load(files["a2"], name="w")
    assert "w" not in store  # a refused load registers nothing
    with pytest.raises(AdapterBusy, match="all 2 loaded adapters are in use"):
        store.acquire("y")
    store.release(held)
    store.load(files["a2"], name="w")
    assert store.loaded() == ["z", "w"]
    y = store.acquire("y")  # registered, evicted: loaded again (evicting idle w)
    assert store.loaded() == ["z", "y"] and y.rank == 8


# -- streaming, stop strings, seeds -----------------------------------------------------------------------
def test_stream_pieces_join_to_the_text(model):
    chunks = list(model.stream("The quick brown fox", adapter="a1", max_new_tokens=24, ignore_eos=True))
    text = "".join(c.text for c in chunks)
    ids = [t for c in chunks for t in c.token_ids]
    assert len(ids) == 24 and chunks[-1].finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])
    assert text == model.tokenizer.decode(ids)
    same = model.complete("The quick brown fox", "a1", max_new_tokens=24, ignore_eos=True)[0]
    assert same.text == text and same.token_ids == ids


def test_stop_strings(model):
    prompt = "The quick brown fox"
    full = model.complete(prompt, "a2", max_new_tokens=30, ignore_eos=True)[0]
    # three whole characters well inside the text (the random model also writes U+FFFD for stray bytes)
    starts = [i for i in range(4, len(full.text) - 3) if "\ufffd" not in full.text[i:i + 3]]
    assert starts, f"the random model must write some text for this test: {full.text!r}"
    stop = full.text[starts[0]:starts[0] + 3]
    cut = full.text.find(stop)
    out = list(model.stream(prompt, "a2", max_new_tokens=30, ignore_eos=True, stop=[stop, "never-there"]))
    assert "".join(c.text for c in out) == full.text[:cut]
    assert out[-1].finish_reason == "stop" and len(out) < 30
    assert stop not in "".join(c.text for c in out)


def test_eos_and_stop_tokens_end_the_generation(model, monkeypatch):
    greedy = model.complete(PROMPTS[0], max_new_tokens=6, min_new_tokens=6)[0].token_ids
    first = greedy.index(greedy[3])
    stopped = model.complete(PROMPTS[0], max_new_tokens=6, stop_token_ids=(greedy[3],))[0]
    assert stopped.token_ids == greedy[:first + 1] and stopped.finish_reason == "stop"
    assert stopped.text == model.tokenizer.decode(greedy[:first])  # the stop token's text is not output
    # the same token as the model's EOS: it ends the text, unless ignore_eos or min_new_tokens say otherwise
    monkeypatch.setattr(model, "eos_ids", frozenset({greedy[3]}))
    assert model.complete(PROMPTS[0], max_new_tokens=6)[0].token_ids == greedy[:first + 1]
    assert model.complete(PROMPTS[0], max_new_tokens=6, ignore_eos=True)[0].token_ids == greedy
    held_off = model.complete(PROMPTS[0], max_new_tokens=6, min_new_tokens=6)[0].token_ids
    assert greedy[3] not in held_off


def test_seeded_sampling_is_reproducible(model):
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.95, min_p=0.01, repetition_penalty=1.1)
    a = model.generate(PROMPTS[0], "a2", seed=123, **kw)
    assert model.generate(PROMPTS[0], "a2", seed=123, **kw) == a
    assert len({model.generate(PROMPTS[0], "a2", seed=s, **kw) for s in range(4)}) > 1


# -- errors -------------------------------------------------------------------------------------------------
def test_prompt_longer_than_context(model):
    with pytest.raises(OrtloraError, match="64 tokens long but the context holds 64"):
        model.generate(list(range(1, 65)))
    out = model.complete(list(range(1, 60)), max_new_tokens=50, ignore_eos=True)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 64 - 59  # stops when the context is full


def test_bad_inputs(lora, model, tmp_path):
    from ortlora import Model

    with pytest.raises(ModelError, match="no such model folder"):
        Model(tmp_path / "nothing")
    with pytest.raises(OrtloraError, match="2 prompts but 3 adapters"):
        model.complete(["a", "b"], ["a1", None, "a2"])
    with pytest.raises(OrtloraError, match="outside the vocabulary"):
        model.generate([1, 10**6])
    with pytest.raises(OrtloraError, match="empty"):
        model.generate("")
    with pytest.raises(OrtloraError, match="unknown sampling setting"):
        model.generate("a", temprature=1.0)


def test_conversation_lease_reuses_the_cached_prefix(model, monkeypatch):
    fed = []
    engine_run = model.engine.run

    def counting(rows):
        fed.append(sum(len(r.tokens) for r in rows))
        return engine_run(rows)

    monkeypatch.setattr(model.engine, "run", counting)
    lease = model.reserve_slot()
    try:
        first = PROMPTS[0]
        run = lambda p, a, n: [t for c in model.stream(p, a, lease=lease, max_new_tokens=n, ignore_eos=True)  # noqa
                               for t in c.token_ids]
        out1 = run(first, "a1", 5)
        assert lease.ids == first + out1[:-1] and fed == [len(first)]
        second = first + out1 + PROMPTS[1]  # the next turn: history + output + new text
        out2 = run(second, "a1", 5)
        assert fed[-1] == 1 + len(PROMPTS[1])  # out1's last token (never fed) + the new text
        assert out2 == model.complete(second, "a1", max_new_tokens=5, ignore_eos=True)[0].token_ids  # = no reuse
        third = PROMPTS[2]  # nothing in common: everything is prefilled again
        out3 = run(third, None, 3)
        assert fed[-1] == len(third)
        assert out3 == model.complete(third, max_new_tokens=3, ignore_eos=True)[0].token_ids
    finally:
        model.release_slot(lease)
    assert model.engine.free_slots == 4


def test_peft_folders_in_an_adapters_directory_are_converted_on_first_use(lora, tmp_path):
    """A PEFT folder dropped into an adapters directory is served by its folder name: converted once on first use
    (checked against the model), cached, and its weights equal `convert-adapters`' file."""
    import shutil

    from ortlora.adapters.onnx_adapter import read_onnx_adapter
    from ortlora.runtime.adapters import Adapters
    from ortlora.runtime.engine import Engine

    _, folder, peft, files = lora
    root = tmp_path / "adapters"
    root.mkdir()
    shutil.copytree(peft["a1"], root / "support-bot")
    engine = Engine(folder, max_len=16)
    store = Adapters.for_engine(engine, directory=root)
    assert store.names() == ["support-bot"] and store.loaded() == []
    got = store.acquire("support-bot")
    want = read_onnx_adapter(files["a1"])
    assert sorted(got.params) == sorted(want)
    for k, v in want.items():
        np.testing.assert_allclose(got.params[k], v, rtol=1e-6)
    cached = list((root / ".ortlora-cache").iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("support-bot-")
    store.release(got)
    again = Adapters.for_engine(engine, directory=root)  # a restart finds the conversion
    assert again.acquire("support-bot").rank == got.rank and list((root / ".ortlora-cache").iterdir()) == cached
