"""The README's second step: `ortlora serve` on the folders `ortlora quickstart` wrote (a model whose context is
128 tokens, shorter than start-up calibration's longest run used to be), fp32 and int4, each adapter answering its
own task on held-out prompts through a real server process; and a model that cannot run makes `serve` exit with
one line, not a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import httpx
import pytest

from serve_helpers import ServerProcess

from ortlora.quickstart import PRECISIONS, tasks

HELD_OUT = 16  # of the quickstart's held-out prompts, per task


@pytest.mark.parametrize("precision", PRECISIONS)
def test_serve_answers_each_quickstart_adapters_task(quickstarted, precision, tmp_path):
    work, _ = quickstarted
    folder = work / "onnx" / precision
    assert json.loads((folder / "genai_config.json").read_text())["model"]["context_length"] == 128
    server = ServerProcess(folder, "--adapters", str(folder), log=tmp_path / "server.log")
    try:
        for task in tasks.ADAPTER_TASKS:
            rows = tasks.load(f"{task}_test")[:HELD_OUT]
            for model in ("base", *tasks.ADAPTER_TASKS):
                r = httpx.post(server.url + "/v1/completions", timeout=120, json={
                    "model": model, "prompt": [row["prompt"] for row in rows], "max_tokens": 16, "temperature": 0})
                assert r.status_code == 200, r.text
                right = sum(c["text"] == rows[c["index"]]["response"] for c in r.json()["choices"]) / len(rows)
                # as the quickstart's own table: 100% on the adapter's task, 0% for the base and the other adapter
                assert right >= 0.9 if model == task else right <= 0.1, (precision, model, task, right)
    finally:
        server.stop()


def test_a_model_that_cannot_run_fails_serve_in_one_line(quickstarted, tmp_path):
    """A folder whose genai_config claims more context than its graph holds: the first run (start-up
    calibration) fails in onnxruntime; `serve` says so in one line and exits 1."""
    work, _ = quickstarted
    folder = tmp_path / "model"
    shutil.copytree(work / "onnx" / "fp32", folder)
    config = json.loads((folder / "genai_config.json").read_text())
    config["model"]["context_length"] = 4096
    (folder / "genai_config.json").write_text(json.dumps(config))
    r = subprocess.run([sys.executable, "-m", "ortlora.cli", "serve", "-m", str(folder), "--port", "0",
                        "--log-level", "warning"], capture_output=True, text=True, timeout=300)
    lines = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1, r.stdout + r.stderr
    assert lines[0].startswith("ortlora serve: error: the model in") and "failed its start-up run" in lines[0]
