"""PEFT folders converted on first use: once per content, checked against the model, written atomically."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from reference import targets_for


@pytest.fixture(scope="module")
def model(tiny):
    hf = tiny.model("llama")
    folder = tiny.export(hf, "serve-lora", lora_targets=targets_for("llama"))
    return hf, folder


def test_converted_once_per_content_and_equal_to_convert_adapter(tiny, model, tmp_path, monkeypatch):
    from ortlora.adapters import cached
    from ortlora.adapters.cached import convert_cached
    from ortlora.adapters.convert import convert_adapter
    from ortlora.adapters.onnx_adapter import read_onnx_adapter
    from ortlora.adapters.validate import model_lora_inputs

    hf, folder = model
    inputs = model_lora_inputs(folder)
    peft = tmp_path / "acme"
    shutil.copytree(tiny.adapter(hf, "qv", target_modules=["q_proj", "v_proj"]), peft)
    (tmp_path / "not-an-adapter").mkdir()
    assert cached.peft_folders(tmp_path) == [peft]
    cache = tmp_path / "cache"
    first = convert_cached(peft, inputs, cache)
    expected = read_onnx_adapter(convert_adapter(peft, tmp_path / "ref.onnx_adapter", model=folder))
    got = read_onnx_adapter(first)
    assert got.keys() == expected.keys() and all(np.array_equal(got[k], expected[k]) for k in got)

    def no_write(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(cached, "write_onnx_adapter", no_write)
    assert convert_cached(peft, inputs, cache) == first  # unchanged content: the cached file
    monkeypatch.undo()

    # retrained (other weights in the same folder): a new file, the old one gone
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(tiny.adapter(hf, "all", target_modules=targets_for("llama")) / name, peft / name)
    second = convert_cached(peft, inputs, cache)
    assert second != first and second.is_file() and not first.exists()
    assert [p.name for p in cache.iterdir()] == [second.name]


def test_an_adapter_for_another_model_is_refused_and_nothing_written(tiny, model, tmp_path):
    from ortlora.adapters.cached import convert_cached
    from ortlora.adapters.validate import model_lora_inputs
    from ortlora.errors import AdapterError

    _, folder = model
    other = tiny.model("llama", hidden_size=32, intermediate_size=96)
    adapter = tiny.adapter(other, "qv-other", target_modules=("q_proj", "v_proj"))
    with pytest.raises(AdapterError, match="mis-shaped"):
        convert_cached(adapter, model_lora_inputs(folder), tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    with pytest.raises(AdapterError, match="not a PEFT adapter folder"):
        convert_cached(tmp_path, model_lora_inputs(folder), tmp_path / "cache")
