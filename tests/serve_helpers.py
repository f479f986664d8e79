"""Shared by the serve tests: the tiny model and adapters they serve, and a real server process on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from reference import OnnxDecoder, targets_for

DATA = Path(__file__).parent / "data"

ADMIN, ACME, BETA = "admin-secret", "acme-secret", "beta-secret"
BOPS = "beta-ops-secret"  # an admin scoped to beta's uploads: adapters = ["b-*"]
ADAPTERS = {  # name -> build_adapter kwargs: different ranks and target sets
    "a1": dict(r=4, target_modules=["q_proj", "v_proj"]),
    "a2": dict(r=8, target_modules=targets_for("llama")),
    "a3": dict(r=2, target_modules=["o_proj", "down_proj"]),
    "a4": dict(r=16, target_modules=["k_proj", "up_proj", "gate_proj"]),
}


def build_serve_setup(tiny, root: Path) -> dict:
    """A tiny llama exported with LoRA inputs on every linear layer, the ADAPTERS as .onnx_adapter files in
    root/adapters (plus a symlink escaping it), and a tenants file for the four keys."""
    from ortlora.adapters.onnx_adapter import write_onnx_adapter
    from ortlora.adapters.peft import read_peft
    from ortlora.serve.tenants import hash_key

    model = tiny.model("llama", max_position_embeddings=1024)  # room for requests long enough to interrupt
    folder = tiny.export(model, "serve-lora", lora_targets=targets_for("llama"))
    adapters = root / "adapters"
    adapters.mkdir()
    params = {}
    for name, kw in ADAPTERS.items():
        params[name] = read_peft(tiny.adapter(model, name, **kw)).onnx_tensors()
        write_onnx_adapter(adapters / f"{name}.onnx_adapter", params[name])
    outside = root / "outside.onnx_adapter"  # a valid adapter file outside the adapters directory
    shutil.copy(adapters / "a1.onnx_adapter", outside)
    (adapters / "escape.onnx_adapter").symlink_to(outside)
    tenants = root / "tenants.toml"
    tenants.write_text(f"""
[tenants.admin]
api_key_sha256 = ["{hash_key(ADMIN)}"]
adapters = ["*"]
admin = true
[tenants.acme]
api_key_sha256 = ["{hash_key(ACME)}"]
adapters = ["a1", "a2"]
base_model = false
[tenants.beta]
api_key_sha256 = ["sha256:{hash_key(BETA)}"]
adapters = ["a3", "a4", "b-*"]
[tenants.bops]
api_key_sha256 = ["{hash_key(BOPS)}"]
adapters = ["b-*"]
admin = true
""")
    return dict(folder=folder, adapters=adapters, params=params, tenants=tenants, root=root)


class ServerProcess:
    """`python -m ortlora.cli serve ...` on a free loopback port, up once /health answers. `preexec_fn` runs in the
    child before it starts (limits: `resource.setrlimit`); `prefix` goes before the command (a wrapper such as
    `unshare`)."""

    def __init__(self, folder: Path, *args: str, log: Path, preexec_fn=None, prefix: tuple[str, ...] = ()):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [*prefix, sys.executable, "-m", "ortlora.cli", "serve", "-m", str(folder), "--port", str(self.port),
               "--model-name", "base", "--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=preexec_fn)
        deadline = time.monotonic() + 90
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not come up:\n{log.read_text()}")
            time.sleep(0.2)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def openai_validator(name: str):
    """A validator for components.schemas[name] of OpenAI's OpenAPI document (the excerpt in tests/data). The
    document is OpenAPI 3.1 but a few schemas still say `nullable: true` (3.0's spelling): read as "null allowed",
    which is what it means."""
    import json

    import jsonschema

    doc = json.loads((DATA / "openai_openapi_responses.json").read_text())

    def nullable(x):
        if isinstance(x, dict):
            x = {k: nullable(v) for k, v in x.items()}
            if x.pop("nullable", False):
                return {"anyOf": [x, {"type": "null"}]}
            return x
        return [nullable(v) for v in x] if isinstance(x, list) else x

    return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}", **nullable(doc)})


PROMPTS = ["The quick brown fox", "LoRA adapters share one base model; many adapters"]
TOKENS = 12


# -- the shared server (module fixtures: each test module gets its own) -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    return build_serve_setup(tiny, tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(setup):
    s = ServerProcess(setup["folder"], "--adapters", str(setup["adapters"]), "--tenants", str(setup["tenants"]),
                      "--max-batch", "8", "--max-queue", "16", "--max-loaded-adapters", "5",
                      log=setup["root"] / "server.log")
    yield s
    s.stop()


def http_client(server, key=ADMIN, timeout=60, **kw) -> httpx.Client:
    """An httpx client of `server` with API key `key`."""
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"} if key else {},
                        timeout=timeout, **kw)


# -- references ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(setup):
    """Greedy text per (adapter or None, prompt) from a plain onnxruntime loop, decoded with `tokenizers`."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(setup["folder"] / "tokenizer.json"))
    cache = {}

    def run(adapter: str | None, prompt: str, tokens: int = TOKENS) -> str:
        out = cache.setdefault((adapter, prompt), [])
        if len(out) < tokens:
            dec = OnnxDecoder(setup["folder"], setup["params"][adapter] if adapter else None)
            ids = tok.encode(prompt).ids
            while len(out) < tokens:
                prefill, _ = dec.run([ids + out], [[]])
                out.append(int(np.argmax(prefill[0][-1])))
        return tok.decode(out[:tokens], skip_special_tokens=True)

    return run
