"""`ortlora generate` and examples/app.py: the tutorial app's output, text equal to the Python API's."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ortlora.cli import main as cli
from ortlora.errors import OrtloraError
from ortlora.generate import generate

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"


def sections(out: str, names: list[str]) -> dict[str, str]:
    """`[name]: text\n` blocks in order (the random model's text may hold newlines)."""
    starts, pos = [], 0
    for name in names:
        pos = out.index(f"[{name}]: ", pos)
        starts.append((name, pos))
        pos += 1
    ends = [p for _, p in starts[1:]] + [len(out)]
    return {name: out[p + len(name) + 4:end].removesuffix("\n") for (name, p), end in zip(starts, ends)}


def test_each_adapter_in_turn(lora, model, capsys):
    _, folder, _, files = lora
    rc = cli(["generate", "-m", str(folder), "-a", str(files["a1"]), str(files["a2"]), "-t", TEMPLATE,
              "-s", "Be brief.", "-p", "Hello there", "--max-new-tokens", "12", "--ignore-eos"])
    assert rc == 0
    got = sections(capsys.readouterr().out, ["a1", "a2"])
    prompt = TEMPLATE.replace("{system}", "Be brief.").replace("{input}", "Hello there")
    for name in ("a1", "a2"):
        assert got[name] == model.generate(prompt, adapter=name, max_new_tokens=12, ignore_eos=True)
    assert got["a1"] != got["a2"]


def test_base_with_the_chat_template_and_sampling(lora, model, capsys):
    _, folder, _, _ = lora
    assert cli(["generate", "-m", str(folder), "-p", "Hi", "-s", "sys", "--max-new-tokens", "10",
                "--temperature", "0.9", "--top-p", "0.9", "--seed", "4"]) == 0
    out = capsys.readouterr().out
    got = sections(out, ["Base"])
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "Hi"}]
    ids = model.encode(messages=messages)
    assert out.count("[Base]: ") == 1 and out.startswith("[Base]: ")
    assert got["Base"] == model.generate(ids, max_new_tokens=10, temperature=0.9, top_p=0.9, seed=4)


def test_chat_keeps_the_history(lora, model):
    _, folder, _, files = lora
    turns = iter(["q2", ""])
    texts = generate(folder, adapters=[files["a1"]], prompt="q1", chat=True, max_new_tokens=4,
                     ignore_eos=True, read=lambda _: next(turns), out=open("/dev/null", "w"))
    first = model.generate(model.encode(messages=[{"role": "user", "content": "q1"}]), "a1",
                           max_new_tokens=4, ignore_eos=True)
    history = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "q2"}]
    assert texts == {"a1": model.generate(model.encode(messages=history), "a1", max_new_tokens=4, ignore_eos=True)}


def test_errors_are_one_line(lora, capsys, tmp_path):
    _, folder, _, _ = lora
    assert cli(["generate", "-m", str(folder)]) == 1
    assert "give a prompt with -p" in capsys.readouterr().err
    assert cli(["generate", "-m", str(tmp_path), "-p", "x"]) == 1
    assert "genai_config.json" in capsys.readouterr().err
    assert cli(["generate", "-m", str(folder), "-a", str(tmp_path / "none.onnx_adapter"), "-p", "x"]) == 1
    assert "no such adapter file" in capsys.readouterr().err



def test_bad_sampling_settings_are_one_line(lora, capsys):
    """Out-of-range sampling flags are usage errors: one line naming the flag, exit 2, no traceback; a value in range
    that generate() cannot use is exit 1; generate() itself refuses what the flags' types refuse."""
    _, folder, _, _ = lora
    res = subprocess.run([sys.executable, "-m", "ortlora.cli", "generate", "-m", str(folder), "-p", "x",
                          "--temperature", "nan"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr == "ortlora generate: error: argument --temperature: must be a finite number >= 0, got nan\n"
    for flags, text in [(["--temperature", "inf"], "argument --temperature: must be a finite number >= 0, got inf"),
                        (["--temperature", "-1"], "argument --temperature: must be a finite number >= 0, got -1"),
                        (["--top-p", "nan"], "argument --top-p: must be a finite number in (0, 1], got nan"),
                        (["--top-p", "5"], "argument --top-p: must be a finite number in (0, 1], got 5"),
                        (["--top-p", "0"], "argument --top-p: must be a finite number in (0, 1], got 0"),
                        (["--top-k", "-2"], "argument --top-k: must be an integer >= 0, got -2"),
                        (["--seed", "-3"], "argument --seed: must be an integer >= 0, got -3"),
                        (["--max-new-tokens", "0"], "argument --max-new-tokens: must be an integer >= 1, got 0"),
                        (["--threads", "-1"], "argument --threads: must be an integer >= 1, got -1")]:
        assert cli(["generate", "-m", str(folder), "-p", "x", *flags]) == 2, flags
        assert text in capsys.readouterr().err, flags
    assert cli(["generate", "-m", str(folder), "-p", "x", "--temperature", "1e-30"]) == 1
    assert "too small to sample with" in capsys.readouterr().err
    for kwargs, text in [({"temperature": float("nan")}, "temperature must be a finite number >= 0, got nan"),
                         ({"top_p": 5.0}, "top_p must be in (0, 1], got 5"),  # greedy, but still refused
                         ({"seed": -3}, "seed must be an integer >= 0"),
                         ({"max_new_tokens": 0}, "max_new_tokens must be at least 1")]:
        with pytest.raises(OrtloraError, match=re.escape(text)):
            generate(folder, prompt="x", out=io.StringIO(), **kwargs)


def test_example_app(lora, model):
    _, folder, _, files = lora
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "app.py"), "-m", str(folder), "-a", str(files["a2"]),
                          "-t", "{input}!", "-p", "Hello", "--max-new-tokens", "8"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("[a2]: ")
    assert sections(res.stdout, ["a2"]) == {"a2": model.generate("Hello!", adapter="a2", max_new_tokens=8)}
