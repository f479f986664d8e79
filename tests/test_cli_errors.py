"""Every CLI failure a user can cause: `ortlora CMD: error: ...` on stderr, exit 1 (2 for a command line argparse
refuses), no traceback, and nothing half-written.

Each case runs `ortlora.cli.main`, the console script's function; one case of each kind (and every `serve`) runs
`python -m ortlora.cli` in a subprocess, which proves the exit status and stderr of a real process (in process, a
traceback would be an exception failing the test; a subprocess costs ~1.5 s of CPU for its imports)."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from reference import targets_for

ROOT = Path(__file__).resolve().parents[1]


def run(*argv, process: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    """`ortlora ARGV`, in this process or (`process`) as `python -m ortlora.cli` in a subprocess."""
    argv = [str(a) for a in argv]
    if process or env:
        return subprocess.run([sys.executable, "-m", "ortlora.cli", *argv], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    from ortlora.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return subprocess.CompletedProcess(argv, status, out.getvalue(), err.getvalue())


def assert_error(res: subprocess.CompletedProcess, command: str, *fragments: str, status: int = 1) -> None:
    """Exit `status`, one `ortlora COMMAND: error:` message holding each fragment, no traceback."""
    err = res.stderr
    assert res.returncode == status, (res.returncode, err)
    assert "Traceback" not in err, err
    assert err.count(f"ortlora {command}: error: ") == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def assert_not_written(target: Path) -> None:
    """Neither `target` nor a temporary of it (fileutil's `.<name>.<random>.tmp`) exists."""
    assert not target.exists(), target
    if target.parent.is_dir():
        left = [p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.")]
        assert not left, left


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    from ortlora.adapters.convert import convert_adapter

    hf = tiny.model("llama")
    folder = tiny.export(hf, "serve-lora", lora_targets=targets_for("llama"))
    other = tiny.model("llama", hidden_size=32, intermediate_size=96)  # another base model: other sizes
    root = tmp_path_factory.mktemp("cli")
    files = {"qv": convert_adapter(tiny.adapter(hf, "qv", target_modules=["q_proj", "v_proj"]),
                                   root / "qv.onnx_adapter", model=folder),
             "other": convert_adapter(tiny.adapter(other, "qv-other", target_modules=("q_proj", "v_proj")),
                                      root / "other.onnx_adapter")}
    plain_file = root / "a-file"
    plain_file.write_text("not a folder")
    return {"hf": hf, "folder": folder, "root": root, "files": files, "file": plain_file,
            "peft": tiny.adapter(hf, "qv", target_modules=["q_proj", "v_proj"])}


def broken(setup, name: str, edit) -> Path:
    """A copy of the exported folder with one thing broken by `edit(folder)`."""
    folder = setup["root"] / name
    if not folder.exists():
        shutil.copytree(setup["folder"], folder)
        edit(folder)
    return folder


def _empty_model(f: Path):
    (f / "model.onnx").write_bytes(b"")


def _no_data(f: Path):
    (f / "model.onnx.data").unlink()


def _truncated_data(f: Path):
    os.truncate(f / "model.onnx.data", 1000)


def _garbage_tokenizer(f: Path):
    (f / "tokenizer.json").write_text("garbage")


def _broken_genai(f: Path):
    (f / "genai_config.json").write_text("{broken")


def _no_genai(f: Path):
    (f / "genai_config.json").unlink()


def _typed_genai(f: Path):
    config = json.loads((f / "genai_config.json").read_text())
    config["model"]["context_length"] = "4096"
    config["model"]["decoder"]["num_hidden_layers"] = [2]
    (f / "genai_config.json").write_text(json.dumps(config))


BROKEN = {  # name -> (edit, what the message says)
    "empty-model": (_empty_model, "model.onnx is empty"),
    "no-data": (_no_data, "model.onnx.data is missing"),
    "truncated-data": (_truncated_data, "model.onnx.data is truncated: 1000 bytes"),
    "typed-genai": (_typed_genai, 'model.context_length must be an integer >= 1, got "4096"'),
    "broken-genai": (_broken_genai, "genai_config.json is not a valid genai_config.json: JSONDecodeError"),
    "no-genai": (_no_genai, "has no genai_config.json"),
    "garbage-tokenizer": (_garbage_tokenizer, "tokenizer.json cannot be loaded by the tokenizers package"),
}


# -- outputs that cannot be written ---------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_export_and_convert_to_an_unwritable_output(setup, where):
    if where == "proc" and not Path("/proc/self").is_dir():
        pytest.skip("no /proc")
    base = setup["file"] if where == "under-a-file" else Path("/proc")
    why = f"{setup['file']} is a file, not a folder" if where == "under-a-file" else "cannot create it"
    out = base / "ortlora-out"
    before = sorted(os.listdir(setup["root"]))
    assert_error(run("export", "-m", setup["hf"], "-o", out, "--no-progress", process=where == "under-a-file"),
                 "export", str(out), why)
    assert_error(run("convert-adapters", "-a", setup["peft"], "-o", out / "x.onnx_adapter"), "convert-adapters",
                 str(out / "x.onnx_adapter"), why)
    assert_error(run("merge-adapters", setup["files"]["qv"], "-o", out / "x.onnx_adapter"), "merge-adapters",
                 str(out / "x.onnx_adapter"), why)
    assert not out.exists() and sorted(os.listdir(setup["root"])) == before
    assert setup["file"].read_text() == "not a folder"


# -- merge-adapters ---------------------------------------------------------------------------------------------------

def test_merge_adapters_of_different_models(setup):
    out = setup["root"] / "mix.onnx_adapter"
    res = run("merge-adapters", setup["files"]["qv"], setup["files"]["other"], "-o", out, process=True)
    assert_error(res, "merge-adapters", "the adapters do not share a base model",
                 f"in_features 64 in {setup['files']['qv']}, 32 in {setup['files']['other']}")
    assert_not_written(out)
    # with the model given, each adapter is checked against it first and the misfit is named by its file
    res = run("merge-adapters", setup["files"]["qv"], setup["files"]["other"], "-o", out, "-m", setup["folder"])
    assert_error(res, "merge-adapters", f"{setup['files']['other']} does not fit the model")
    assert_not_written(out)


def test_merge_adapters_refuses_non_finite_results(setup, tmp_path):
    from ortlora.adapters.onnx_adapter import read_onnx_adapter, write_onnx_adapter

    out = tmp_path / "mix.onnx_adapter"
    qv = setup["files"]["qv"]
    for flags, why in [(["-w", "1e39"], "the weights [1e+39] overflow float32"),
                       (["-w", "70000", "--dtype", "float16"], "overflow float16; give smaller --weights or --dtype "
                                                               "float32")]:
        assert_error(run("merge-adapters", qv, "-o", out, *flags), "merge-adapters", "hold NaN or infinite", why)
        assert_not_written(out)
    params = dict(read_onnx_adapter(qv))
    name = sorted(params)[0]
    params[name] = np.full_like(params[name], np.nan)
    nan_file = write_onnx_adapter(tmp_path / "nan.onnx_adapter", params)
    res = run("merge-adapters", qv, nan_file, "-o", out)
    assert_error(res, "merge-adapters", f"{nan_file}: 1 of {len(params)} tensors hold NaN or infinite values ({name})")
    assert_not_written(out)
    # inspect refuses the same file: the runtime would not load it
    assert_error(run("inspect", nan_file), "inspect", "hold NaN or infinite values")
    # a finite mix is written: B's side by side, each times its weight
    assert run("merge-adapters", qv, qv, "-w", "0.5", "0.25", "-o", out).returncode == 0
    b = next(k for k in params if k.endswith("lora_B.weight"))
    source = read_onnx_adapter(qv)[b]
    np.testing.assert_allclose(read_onnx_adapter(out)[b], np.concatenate([0.5 * source, 0.25 * source]), rtol=1e-6)


# -- quickstart -----------------------------------------------------------------------------------------------------

def test_quickstart_bad_workdir_and_steps(setup, tmp_path):
    assert_error(run("quickstart", "--workdir", setup["file"], process=True), "quickstart",
                 f"workdir {setup['file']} is a file, not a folder")
    assert_error(run("quickstart", "--workdir", setup["file"] / "sub"), "quickstart",
                 f"{setup['file']} is a file, not a folder")
    work = tmp_path / "qs"
    assert_error(run("quickstart", "--workdir", work, "--pretrain-steps", "-1"), "quickstart",
                 "argument --pretrain-steps: must be an integer >= 1, got -1", status=2)
    assert not work.exists()
    # the function itself refuses too (every problem at once), before it creates anything
    from ortlora.errors import OrtloraError
    from ortlora.quickstart import quickstart

    with pytest.raises(OrtloraError, match="pretrain_steps must be an integer >= 1, got -1; n_eval must be"):
        quickstart(work, pretrain_steps=-1, n_eval=0)
    assert not work.exists()


def test_quickstart_base_is_written_atomically(tmp_path, monkeypatch):
    """A failure while the base model trains leaves no half-built base folder (the next run would reuse it)."""
    from ortlora.quickstart import base

    def fail(*args, **kwargs):
        raise RuntimeError("stopped")

    monkeypatch.setattr(base, "_batch", fail)
    with pytest.raises(RuntimeError, match="stopped"):
        base.build_base(tmp_path / "base", steps=2)
    assert os.listdir(tmp_path) == []


# -- quantize and inspect of broken folders -------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["truncated-data", "garbage-tokenizer", "broken-genai", "no-genai"])
def test_quantize_refuses_a_broken_folder_before_writing(setup, case):
    edit, why = BROKEN[case]
    folder = broken(setup, case, edit)
    out = setup["root"] / f"q-{case}"
    res = run("quantize", "-m", folder, "-o", out, "--no-progress", "--eval_samples", "0",
              process=case == "truncated-data")
    assert_error(res, "quantize", "cannot quantize", why)
    assert_not_written(out)


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_inspect_reports_a_broken_folder(setup, case):
    edit, why = BROKEN[case]
    assert_error(run("inspect", broken(setup, case, edit), process=case == "empty-model"), "inspect", why)


def test_inspect_lists_every_problem_and_passes_a_good_folder(setup):
    def two(f: Path):
        _truncated_data(f)
        _typed_genai(f)

    res = run("inspect", broken(setup, "two-problems", two))
    assert_error(res, "inspect", "2 problems", "model.onnx.data is truncated",
                 "model.decoder.num_hidden_layers must be an integer >= 1, got [2]")
    good = run("inspect", setup["folder"])
    assert good.returncode == 0 and good.stdout.startswith("model folder: "), good.stderr


# -- serve start-up -------------------------------------------------------------------------------------------------

def test_serve_start_up_failures_are_one_line(setup, tmp_path):
    bad_toml = tmp_path / "tenants.toml"
    bad_toml.write_text("x = [")
    folder = setup["folder"]
    for argv, why in [(["-m", tmp_path / "missing"], "no such model folder"),
                      (["-m", broken(setup, "empty-model", _empty_model)], "model.onnx"),
                      (["-m", folder, "--tenants", bad_toml], "not valid TOML"),
                      (["-m", folder, "--tenants", tmp_path], str(tmp_path))]:
        assert_error(run("serve", *argv, "--port", "1", process=True), "serve", why)


# -- the command line itself: usage errors exit 2 --------------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["serve", "-m", "m", "--port", "99999"], "ortlora serve: error: argument --port: must be an integer from 0 to "
                                              "65535, got 99999"),
    (["serve", "-m", "m", "--threads", "-1"], "ortlora serve: error: argument --threads: must be an integer >= 1, "
                                              "got -1"),
    (["serve", "-m", "m", "--max-model-len", "-5"], "argument --max-model-len: must be an integer >= 2, got -5"),
    (["generate", "-m", "m", "-p", "x", "--top-p", "5"], "ortlora generate: error: argument --top-p: must be a "
                                                         "finite number in (0, 1], got 5"),
    (["generate", "-m", "m", "-p", "x", "--threads", "0"], "argument --threads: must be an integer >= 1, got 0"),
    (["export", "-m", "m", "--threads", "-1"], "ortlora export: error: argument --threads: must be an integer"),
    (["merge-adapters", "a", "-w", "nan", "-o", "x"], "argument -w/--weights: must be a finite number, got nan"),
    (["frob"], "ortlora: error: argument COMMAND: invalid choice: 'frob'"),
    (["generate"], "ortlora generate: error: the following arguments are required: -m/--model"),
])
def test_usage_errors_exit_2_in_one_line(argv, message):
    res = run(*argv, process=argv[0] == "serve")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and message in res.stderr, res.stderr


def test_no_command_prints_usage_and_exits_2():
    res = run(process=True)
    assert res.returncode == 2 and res.stderr.startswith("usage: ortlora ") and res.stdout == ""
    assert "convert-adapters" in res.stderr and res.stderr.rstrip().endswith("ortlora: error: give a command "
                                                                             "(`ortlora COMMAND -h` lists its options)")
    for argv in (["-h"], ["--version"]):
        assert run(*argv).returncode == 0


# -- the handler: user errors vs bugs -------------------------------------------------------------------------------

def test_debug_shows_the_traceback_of_a_user_error(setup):
    folder = broken(setup, "truncated-data", _truncated_data)
    for res in (run("inspect", folder, env={"ORTLORA_DEBUG": "1"}), run("--debug", "inspect", folder, process=True)):
        assert res.returncode == 1 and "Traceback" in res.stderr and "ModelError: " in res.stderr, res.stderr


def test_a_bug_keeps_its_traceback(monkeypatch, capsys):
    from ortlora import cli, inspect

    def bug(*args, **kwargs):
        raise KeyError("oops")

    monkeypatch.setattr(inspect, "inspect", bug)
    with pytest.raises(KeyError) as exc:
        cli.main(["inspect", "x"])
    if sys.version_info >= (3, 11):
        assert "this is a bug in ortlora" in exc.value.__notes__[0]
    assert "error:" not in capsys.readouterr().err


def test_user_error_messages():
    from ortlora.cli import user_error
    from ortlora.errors import AdapterInvalid

    assert user_error(AdapterInvalid("bad adapter")) == "bad adapter"
    assert user_error(PermissionError(errno.EACCES, "Permission denied", "/x/y")) == "/x/y: Permission denied"
    assert user_error(OSError(errno.ENOSPC, "No space left on device")) == "No space left on device"
    assert user_error(OSError("Can't load tokenizer")) == "Can't load tokenizer"
    for bug in (KeyError("k"), ValueError("v"), TypeError("t"), AssertionError()):
        assert user_error(bug) is None


def test_atomic_writes_name_the_target_not_the_temporary(tmp_path):
    """An OSError while writing is re-raised about the target the user named (type and errno kept, e.g. ENOSPC
    for a server's 507); the temporary is gone; an input's error passes through unchanged."""
    from ortlora.fileutil import atomic_dir, atomic_file

    target = tmp_path / "out.onnx_adapter"
    with pytest.raises(OSError) as exc:
        with atomic_file(target) as tmp:
            tmp.write_text("partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(target)
    assert "No space left on device" in exc.value.strerror and os.listdir(tmp_path) == []
    with pytest.raises(PermissionError) as exc:
        with atomic_dir(tmp_path / "folder") as tmp:
            raise PermissionError(errno.EACCES, "Permission denied", str(tmp / "model.onnx"))
    assert exc.value.filename == str(tmp_path / "folder") and os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError) as exc:
        with atomic_file(target):
            open(tmp_path / "missing-input")
    assert exc.value.filename == str(tmp_path / "missing-input") and os.listdir(tmp_path) == []
