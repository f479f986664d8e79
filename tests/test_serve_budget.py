"""All work through the scheduler's budget, through a real server: a tenant's flood of echo + logprobs scoring
requests and a high-rank adapter leave another tenant's stream its pace and the server's memory where it was;
a model whose context is 128 tokens starts (its start-up calibration fits the context) and answers."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from serve_helpers import ACME, ADMIN, BETA, ServerProcess, build_serve_setup

FLOOD = """
import asyncio, json, sys, httpx
url, key, n, length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
async def main():
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": "Bearer " + key}, timeout=300,
                                 limits=httpx.Limits(max_connections=n)) as c:
        async def one(i):
            prompt = [(7 * k + i) % 300 + 3 for k in range(length)]
            r = await c.post("/v1/completions", json={"model": "a3", "prompt": prompt, "max_tokens": 1,
                                                      "echo": True, "logprobs": 5, "temperature": 0})
            return r.status_code, len(r.json()["choices"][0]["logprobs"]["tokens"]) if r.status_code == 200 else 0
        print(json.dumps(await asyncio.gather(*(one(i) for i in range(n)))))
asyncio.run(main())
"""


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    return build_serve_setup(tiny, tmp_path_factory.mktemp("serve-budget"))


@pytest.fixture(scope="module")
def server(setup):
    s = ServerProcess(setup["folder"], "--adapters", str(setup["adapters"]), "--tenants", str(setup["tenants"]),
                      "--max-lora-rank", "64", log=setup["root"] / "budget.log")
    yield s
    s.stop()


def _client(server, key=ADMIN, timeout=120) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)


def _stream(server, times: list[float], started: threading.Event, tokens: int) -> None:
    body = {"model": "a1", "prompt": "The quick brown fox", "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with _client(server, ACME).stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                assert "error" not in json.loads(line[6:])
                times.append(time.monotonic())
                started.set()


def _adapter_of_rank(setup, rank: int, seed: int) -> bytes:
    """An adapter on every linear layer of the served model with rank `rank` (small random weights)."""
    from ortlora.adapters.onnx_adapter import write_onnx_adapter
    from ortlora.naming import is_lora_a

    rng = np.random.default_rng(seed)
    params = {}
    for name, arr in setup["params"]["a2"].items():
        shape = (arr.shape[0], rank) if is_lora_a(name) else (rank, arr.shape[1])
        params[name] = (rng.standard_normal(shape) * 0.01).astype(np.float32)
    path = setup["root"] / f"rank{rank}.onnx_adapter"
    write_onnx_adapter(path, params)
    return path.read_bytes()


def test_an_echo_flood_and_a_high_rank_adapter_leave_another_tenant_alone(server, setup):
    """Beta sends 40 concurrent echo + logprobs requests of ~900 prompt tokens (scored by the engine's own prefill,
    within the step budget) and uses a rank-64 adapter (a rank-4096 one is refused at upload, naming the limit);
    acme's stream meanwhile never waits 3 s for a token, and the server's RSS ends within 300 MB of the start."""
    admin = _client(server)
    assert _client(server, ACME).post("/v1/completions", json={"model": "a1", "prompt": "warm up",
                                                               "max_tokens": 4}).status_code == 200
    rss = server.rss_mb()
    times, started = [], threading.Event()
    streamer = threading.Thread(target=_stream, args=(server, times, started, 700))
    streamer.start()
    assert started.wait(60)
    flood = subprocess.Popen([sys.executable, "-c", FLOOD, server.url, BETA, "40", "900"], stdout=subprocess.PIPE,
                             text=True)
    try:
        r = admin.post("/v1/adapters", data={"name": "b-huge"},
                       files={"file": ("x.onnx_adapter", _adapter_of_rank(setup, 4096, 1))})
        assert r.status_code == 400 and "rank 4096" in r.text and "limit of 64" in r.text, r.text
        r = admin.post("/v1/adapters", data={"name": "b-r64"},
                       files={"file": ("x.onnx_adapter", _adapter_of_rank(setup, 64, 2))})
        assert r.status_code == 200, r.text
        r = _client(server, BETA).post("/v1/completions", json={"model": "b-r64", "prompt": "hello", "max_tokens": 8,
                                                                "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        assert admin.delete("/v1/adapters/b-r64").status_code == 200
        out, _ = flood.communicate(timeout=600)
    finally:
        if flood.poll() is None:
            flood.kill()
            flood.wait()
    streamer.join(600)
    results = json.loads(out)
    assert all(status == 200 for status, _ in results) and {n for _, n in results} == {901}
    gaps = np.diff(times)
    assert len(times) == 700 and gaps.max() < 3.0, gaps.max()
    assert server.rss_mb() - rss < 300, (rss, server.rss_mb())


def test_a_model_with_a_128_token_context_serves(tiny, tmp_path):
    """Start-up measures run costs with prompts the context holds (a 144-token probe would not fit 128)."""
    from ortlora.testing import build_model

    model = build_model(tmp_path / "hf", "llama", max_position_embeddings=128,  # the quickstart base's rope, context
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    folder = tiny.export(model, "ctx128")
    s = ServerProcess(folder, log=tmp_path / "ctx128.log")
    try:
        r = httpx.post(s.url + "/v1/completions", timeout=60,
                       json={"model": "base", "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0,
                             "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        long = httpx.post(s.url + "/v1/completions", timeout=60,
                          json={"model": "base", "prompt": [5] * 120, "max_tokens": 8, "temperature": 0})
        assert long.status_code == 200 and long.json()["usage"]["prompt_tokens"] == 120
    finally:
        s.stop()


def test_prompt_logprobs_and_scoring_only_through_the_engine(server, setup):
    """vLLM's `prompt_logprobs` (token id -> logprob, rank, text; None first) and completions' `echo` with
    `max_tokens: 0` (the prompt scored, nothing generated) come from the engine's prefill and agree with each other
    and with a plain onnxruntime run of the whole prompt."""
    from reference import OnnxDecoder

    prompt = [5, 17, 33, 9, 81, 100, 7, 12]
    client = _client(server, BETA)
    scored = client.post("/v1/completions", json={"model": "a3", "prompt": prompt, "max_tokens": 0, "echo": True,
                                                  "logprobs": 2})
    assert scored.status_code == 200, scored.text
    choice = scored.json()["choices"][0]
    assert choice["finish_reason"] == "length" and scored.json()["usage"]["completion_tokens"] == 0
    echo = choice["logprobs"]["token_logprobs"]
    assert echo[0] is None and len(echo) == len(prompt)
    vllm = client.post("/v1/completions", json={"model": "a3", "prompt": prompt, "max_tokens": 2, "temperature": 0,
                                                "prompt_logprobs": 2}).json()["choices"][0]["prompt_logprobs"]
    assert vllm[0] is None and len(vllm) == len(prompt)
    logits, _ = OnnxDecoder(setup["folder"], setup["params"]["a3"]).run([prompt], [[]])
    for i in range(1, len(prompt)):
        ref = logits[0][i - 1].astype(np.float64)
        ref = ref - ref.max() - np.log(np.exp(ref - ref.max()).sum())
        entry = vllm[i][str(prompt[i])]
        assert abs(entry["logprob"] - ref[prompt[i]]) < 1e-4 and abs(echo[i] - entry["logprob"]) < 1e-6
        assert entry["rank"] == 1 + int((ref > ref[prompt[i]] + 1e-6).sum())
        assert len(vllm[i]) in (2, 3)  # the token and the 2 most likely (the token may be one of them)


def test_unified_steps_share_decode_runs_and_give_the_same_tokens(setup, server):
    """`--unified-steps`: completions arriving while a stream decodes run their prompts in its steps' runs
    (ortlora_prefill_runs_merged counts them) and get the tokens the default server gives them."""
    uni = ServerProcess(setup["folder"], "--adapters", str(setup["adapters"]), "--tenants", str(setup["tenants"]),
                        "--max-lora-rank", "64", "--unified-steps", log=setup["root"] / "unified.log")
    try:
        bodies = [{"model": m, "prompt": p, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
                  for m, p in (("a1", "The lazy dog"), ("a2", "A quiet river"), ("a3", "The old model reads"),
                               ("base", "Small red cat"), ("a2", "Tiny session"))]
        times: list[float] = []
        started = threading.Event()
        stream = threading.Thread(target=_stream, args=(uni, times, started, 400))  # decoding while the others come
        stream.start()
        assert started.wait(60)
        got: dict[int, str] = {}

        def one(i: int) -> None:
            r = _client(uni).post("/v1/completions", json=bodies[i])
            assert r.status_code == 200, r.text
            got[i] = r.json()["choices"][0]["text"]

        workers = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
        stream.join(120)
        metrics = dict(line.rsplit(" ", 1) for line in _client(uni).get("/metrics").text.splitlines()
                       if line and not line.startswith("#"))
    finally:
        uni.stop()
    assert float(metrics["ortlora_prefill_runs_merged_total"]) > 0
    want = {i: _client(server).post("/v1/completions", json=b).json()["choices"][0]["text"] for i, b in enumerate(bodies)}
    assert got == want
