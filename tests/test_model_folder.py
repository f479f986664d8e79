"""The exported folder's format (ortlora.model_folder) and fileutil's atomic writes and stale-temporary clean-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ortlora import model_folder as mf
from ortlora.errors import ModelError, OrtloraError
from ortlora.fileutil import atomic_file, remove_stale_temps, write_json

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tiny):
    model = tiny.model("llama")
    adapter = tiny.adapter(model, "qv")
    return model, adapter, tiny.export(model, "mf", adapter_path=[adapter])


def test_what_export_writes_reads_back(exported):
    model, _, folder = exported
    info = mf.ModelInfo.read(folder)
    config = json.loads((model / "config.json").read_text())
    assert (info.num_layers, info.kv_heads, info.head_dim, info.vocab_size) == (
        config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"], config["vocab_size"])
    assert info.eos_ids == (0,) and info.filename == mf.MODEL_FILE and info.threads >= 1
    assert info.kv_names()[:2] == [("past_key_values.0.key", "present.0.key"),
                                   ("past_key_values.0.value", "present.0.value")]
    manifest = mf.read_manifest(folder)
    assert manifest["lora_targets"] == ["q_proj", "v_proj"] and manifest["precision"] == "fp32"
    assert manifest["lora_modules"]["model.layers.1.self_attn.v_proj"] == {"in": 64, "out": 32}
    lora = mf.model_lora_inputs(folder)
    assert sorted(lora) == sorted(f"model.layers.{i}.self_attn.{p}.lora_{k}.weight"
                                  for i in (0, 1) for p in ("q_proj", "v_proj") for k in "AB")
    a = lora["model.layers.0.self_attn.v_proj.lora_A.weight"]
    assert a.dtype == np.float32 and a.shape == (64, "model.layers.0.self_attn.v_proj.lora_r")
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(folder))
    assert not [p for p in os.listdir(folder) if p.startswith(".")]  # no temporaries of the JSON writes


def test_a_folder_of_symlinks_reads_and_runs_the_same(exported, tmp_path):
    """Every file a symlink to the export (as a benchmark's tuned copy is): same info, inputs, tokens."""
    from ortlora import Model
    from ortlora.runtime.tokenizer import Tokenizer

    _, adapter, folder = exported
    links = tmp_path / "links"
    links.mkdir()
    for f in folder.iterdir():
        (links / f.name).symlink_to(f)
    assert all(p.is_symlink() for p in links.iterdir())
    assert mf.ModelInfo.read(links).context_length == mf.ModelInfo.read(folder).context_length
    assert mf.model_lora_inputs(links) == mf.model_lora_inputs(folder)
    assert mf.read_manifest(links) == mf.read_manifest(folder) and mf.is_model_folder(links)
    assert Tokenizer(links).eos_ids == Tokenizer(folder).eos_ids
    from ortlora.adapters.convert import convert_adapter

    file = convert_adapter(adapter, tmp_path / "a.onnx_adapter", model=links)
    texts = []
    for f in (folder, links):
        m = Model(f, slots=1, max_len=32)
        m.adapters.load(file, name="a")
        texts.append([m.complete([[5, 6, 7]], [a], max_new_tokens=6, min_new_tokens=6)[0].token_ids
                      for a in (None, "a")])
    assert texts[0] == texts[1] and texts[0][0] != texts[0][1]  # the adapter changes the tokens, alike on both


def test_broken_files_name_themselves(exported, tmp_path):
    _, _, folder = exported
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).symlink_to(f)
    (bad / mf.MANIFEST).unlink()
    (bad / mf.MANIFEST).write_text("[1, 2]")
    with pytest.raises(ModelError, match="ortlora.json does not hold a JSON object"):
        mf.read_manifest(bad)
    (bad / mf.GENAI_CONFIG).unlink()
    (bad / mf.GENAI_CONFIG).write_text("{not json")
    with pytest.raises(ModelError, match="genai_config.json is not a valid genai_config.json"):
        mf.ModelInfo.read(bad)
    with pytest.raises(ModelError, match="genai_config.json cannot be read as JSON"):
        mf.read_genai_config(bad)
    assert mf.read_manifest(tmp_path) == {}  # absent: a folder exported by another tool


def test_check_output_folder(exported, tmp_path):
    _, _, folder = exported
    mf.check_output_folder(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    mf.check_output_folder(tmp_path / "empty")
    mf.check_output_folder(folder)  # a previous export may be replaced
    (tmp_path / "file").write_text("x")
    with pytest.raises(OrtloraError, match="is a file"):
        mf.check_output_folder(tmp_path / "file")
    with pytest.raises(OrtloraError, match="holds other files"):
        mf.check_output_folder(tmp_path)


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "sub" / "x.json"
    write_json(path, {"path": tmp_path, "n": [1, 2]})
    assert json.loads(path.read_text()) == {"path": str(tmp_path), "n": [1, 2]}
    circular: list = []
    circular.append(circular)
    with pytest.raises(ValueError, match="Circular reference"):
        write_json(path, {"bad": circular})
    assert json.loads(path.read_text())["n"] == [1, 2] and os.listdir(path.parent) == ["x.json"]


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_atomic_dir_replaces_a_folder_readers_always_find(tmp_path, monkeypatch, exchange):
    """Replacing a folder: a reader polling it meanwhile always finds a whole version (old or new, never none);
    nothing is left beside it. Where the system cannot exchange two paths in one step (`_exchange` False: not
    Linux, or a file system without RENAME_EXCHANGE), two renames, the same outcome after each write."""
    import threading

    from ortlora import fileutil

    if exchange and not sys.platform.startswith("linux"):
        pytest.skip("RENAME_EXCHANGE is Linux's")
    if not exchange:
        monkeypatch.setattr(fileutil, "_exchange", lambda a, b: False)
    target = tmp_path / "model"
    with fileutil.atomic_dir(target) as d:
        (d / "version").write_text("0")
    seen, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                seen.append(int((target / "version").read_text()))
            except FileNotFoundError:
                seen.append(-1)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for v in range(1, 61):
            with fileutil.atomic_dir(target) as d:
                (d / "version").write_text(str(v))
            assert (target / "version").read_text() == str(v)
    finally:
        stop.set()
        t.join(10)
    assert seen and max(seen) <= 60
    if exchange:
        assert -1 not in seen  # one step: never a moment without the folder
    assert os.listdir(tmp_path) == ["model"]


# -- remove_stale_temps ------------------------------------------------------------------------------------------

_KILLED_MID_WRITE = """
import os, sys
from pathlib import Path
from ortlora.fileutil import atomic_dir, atomic_file

folder = Path(sys.argv[1])
with atomic_dir(folder / "model") as d, atomic_file(folder / "a.onnx_adapter") as f:
    (d / "model.onnx").write_bytes(b"x" * 1000)
    f.write_bytes(b"y" * 100)
    os._exit(9)  # killed: no clean-up runs
"""


def _age(path: Path, seconds: float) -> None:
    """Set the modification time of `path` and everything below it `seconds` into the past."""
    then = time.time() - seconds
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        os.utime(p, (then, then), follow_symlinks=False)


def test_remove_stale_temps(tmp_path):
    folder = tmp_path / "adapters"
    folder.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert subprocess.run([sys.executable, "-c", _KILLED_MID_WRITE, str(folder)], env=env).returncode == 9
    left = sorted(p.name for p in folder.iterdir())
    assert len(left) == 2 and all(n.endswith(".tmp") for n in left), left  # what a killed writer leaves
    # what must stay: finished files, other hidden names, a temp-named symlink, a temporary inside a subfolder
    keep = {"a.onnx_adapter": b"done", ".hidden": b"h", "b.tmp": b"t", ".x.tmp": b"short", ".y.abc.tmp": b"3 chars"}
    for name, data in keep.items():
        (folder / name).write_bytes(data)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("p")
    (folder / ".link.abcdefgh.tmp").symlink_to(outside)
    (folder / "sub").mkdir()
    (folder / "sub" / ".z.abcdefgh.tmp").write_text("nested")
    old = folder / ".model.old-12345"  # atomic_dir's previous target, left by a kill between its renames
    old.mkdir()
    (old / "model.onnx").write_text("old")
    for p in folder.iterdir():
        _age(p, 7200)
    # a write still going on: old folder, but a file in it written just now
    busy = folder / ".busy.abcdefgh.tmp"
    busy.mkdir()
    (busy / "model.onnx.data").write_text("...")
    _age(busy, 7200)
    os.utime(busy / "model.onnx.data")

    removed = remove_stale_temps(folder, grace=3600)
    assert sorted(p.name for p in removed) == sorted([*left, ".model.old-12345"])
    stay = [*keep, ".link.abcdefgh.tmp", "sub", ".busy.abcdefgh.tmp"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(stay)
    assert (outside / "precious").read_text() == "p" and (folder / "sub" / ".z.abcdefgh.tmp").exists()
    assert remove_stale_temps(folder, grace=3600) == []
    # within the grace period nothing goes, however it is named
    with atomic_file(folder / "c.onnx_adapter") as tmp:
        tmp.write_text("being written")
        assert remove_stale_temps(folder, grace=60) == [] and tmp.exists()
    assert remove_stale_temps(tmp_path / "missing") == []


def test_cli_output_into_a_closed_pipe(exported):
    """`ortlora inspect FOLDER | head -0`: the reader is gone before anything is printed; no traceback."""
    _, _, folder = exported
    proc = subprocess.Popen([sys.executable, "-m", "ortlora.cli", "inspect", str(folder)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    proc.stdout.close()  # before the child has even imported ortlora
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err
