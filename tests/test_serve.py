"""`ortlora serve` end to end: a real server process on 127.0.0.1, real clients (the `openai` package, httpx).

The model is a tiny random llama exported with LoRA inputs on every linear layer; four PEFT adapters of different
ranks and targets are converted to `.onnx_adapter` files. Reference tokens come from a plain onnxruntime loop
(tests/reference.py's OnnxDecoder, no KV cache, adapter tensors fed as inputs): independent of ortlora's runtime.
Greedy requests use `ignore_eos` so every completion has exactly `max_tokens` tokens.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from serve_helpers import ACME, ADAPTERS, ADMIN, BETA, PROMPTS, TOKENS, ServerProcess, http_client

def _metrics(server) -> dict[str, float]:
    text = http_client(server).get("/metrics").text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _complete(server, model, prompt, key=ADMIN, **kw) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True, **kw}
    r = http_client(server, key).post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


# -- the OpenAI client --------------------------------------------------------------------------------------------
def test_openai_client_completions_and_streamed_chat(server, reference):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=ADMIN)
    ids = {m.id for m in client.models.list()}
    assert {"base", "a1", "a2", "a3", "a4"} <= ids and "escape" not in ids  # the symlink escaping the folder

    out = client.completions.create(model="a1", prompt=PROMPTS[0], max_tokens=TOKENS, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == reference("a1", PROMPTS[0])
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == TOKENS
    assert out.usage.prompt_tokens > 0 and out.usage.total_tokens == out.usage.prompt_tokens + TOKENS

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is two plus two?"}]
    whole = client.chat.completions.create(model="a2", messages=messages, max_tokens=TOKENS, temperature=0,
                                           extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(model="a2", messages=messages, max_tokens=TOKENS, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1  # really streamed, piece by piece
    assert "".join(pieces) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == TOKENS == whole.usage.completion_tokens
    assert chunks[0].choices[0].delta.role == "assistant"

    # a stop string cuts the text before it, finish_reason "stop"; a seed makes sampling reproducible
    text = reference("a3", PROMPTS[1])
    stop = text[5:7]
    cut = client.completions.create(model="a3", prompt=PROMPTS[1], max_tokens=TOKENS, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    sampled = [client.completions.create(model="a4", prompt=PROMPTS[0], max_tokens=TOKENS, temperature=1.0,
                                         seed=7, n=2).choices for _ in range(2)]
    assert [c.text for c in sampled[0]] == [c.text for c in sampled[1]]

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong").models.list()


# -- the heart: different adapters in one decode batch -------------------------------------------------------------
def test_concurrent_requests_for_four_adapters_equal_single_requests_and_share_batches(server, reference):
    cases = [(a, p) for a in ADAPTERS for p in PROMPTS]  # 8 requests, 4 adapters, 2 prompt lengths
    n = 40
    single = {(a, p): _complete(server, a, p, max_tokens=n)["choices"][0]["text"] for a, p in cases}  # one at a time
    for (a, p), text in single.items():
        assert text == reference(a, p, n), (a, p)
    base = {p: reference(None, p, n) for p in PROMPTS}
    for p in PROMPTS:  # each adapter changes the output: equality below means something
        assert len({single[a, p] for a in ADAPTERS} | {base[p]}) == len(ADAPTERS) + 1

    before = _metrics(server)
    barrier = threading.Barrier(len(cases))
    results: dict = {}

    def stream(case):
        a, p = case
        body = {"model": a, "prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True}
        with http_client(server) as client:
            client.get("/health")  # connected before the barrier: the 8 requests arrive within milliseconds
            barrier.wait()
            with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        results[case] = ("".join(c["choices"][0]["text"] for c in chunks), chunks[-1]["choices"][0]["finish_reason"])

    threads = [threading.Thread(target=stream, args=(c,)) for c in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == len(cases)
    for case in cases:
        assert results[case] == (single[case], "length"), case

    after = _metrics(server)
    key = "ortlora_decode_batch_adapters_bucket{le=\"1\"}"
    count = "ortlora_decode_batch_adapters_count"
    mixed_steps = (after[count] - after[key]) - (before[count] - before[key])
    assert mixed_steps >= n // 2, f"only {mixed_steps} decode steps mixed adapters"
    assert after["ortlora_decode_batch_adapters_max"] >= 4
    assert after["ortlora_decode_batch_size_sum"] - before["ortlora_decode_batch_size_sum"] >= 8 * (n - 1)


# -- tenants, auth, confinement --------------------------------------------------------------------------------------
def test_auth_401_cross_tenant_404_without_leak(server):
    body = {"model": "a1", "prompt": "The", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {ADMIN}"}):
        r = httpx.post(server.url + "/v1/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert r.headers["www-authenticate"] == "Bearer"
    acme, beta = http_client(server, ACME), http_client(server, BETA)
    assert [m["id"] for m in acme.get("/v1/models").json()["data"]] == ["a1", "a2"]
    assert [m["id"] for m in beta.get("/v1/models").json()["data"]] == ["base", "a3", "a4"]
    assert acme.post("/v1/completions", json=body).status_code == 200

    def answer(client, model):
        r = client.post("/v1/completions", json={**body, "model": model})
        return r.status_code, json.dumps(r.json()).replace(model, "MODEL")

    missing = answer(acme, "no-such-adapter")
    assert missing[0] == 404
    assert answer(acme, "a3") == missing  # another tenant's adapter: exactly a missing one
    assert answer(acme, "base") == missing  # base_model = false
    assert acme.get("/v1/models/a3").status_code == 404 and acme.get("/v1/models/a1").status_code == 200
    assert acme.delete("/v1/adapters/a3").status_code == 403  # not an admin key
    assert acme.post("/v1/adapters", json={"name": "a9", "path": "a1.onnx_adapter"}).status_code == 403
    assert acme.get("/metrics").status_code == 403
    assert beta.post("/v1/completions", json={**body, "model": "a3"}).status_code == 200


def test_adapter_names_and_paths_are_confined(server, setup):
    admin = http_client(server)
    for path in ("../outside.onnx_adapter", str(setup["root"] / "outside.onnx_adapter"), "escape.onnx_adapter",
                 "/etc/passwd", "../../../../etc/passwd", "a1.onnx_adapter/..", "."):
        r = admin.post("/v1/adapters", json={"name": "evil", "path": path})
        assert r.status_code == 400, (path, r.text)
    for name in ("../evil", "a/b", "", ".hidden", "x" * 200, "a1.onnx_adapter"):
        r = admin.post("/v1/adapters", json={"name": name, "path": "a1.onnx_adapter"})
        assert r.status_code == 400, (name, r.text)
    assert admin.get("/v1/models/escape").status_code == 404
    assert admin.delete("/v1/adapters/..%2Fa1").status_code == 404
    assert "evil" not in {a["name"] for a in admin.get("/v1/adapters").json()["data"]}


# -- bad input -------------------------------------------------------------------------------------------------------
BAD = [
    ("malformed JSON", b'{"model": "a1", "prompt": ', 400, "not valid JSON"),
    ("wrong type", {"model": "a1", "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ("negative max_tokens", {"model": "a1", "prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ("known field of wrong type", {"model": "a1", "prompt": "x", "stream_options": 3}, 400, "stream_options"),
    ("temperature out of range", {"model": "a1", "prompt": "x", "temperature": 9}, 400, "temperature"),
    ("prompt object", {"model": "a1", "prompt": {"text": "x"}}, 400, "prompt"),
    ("empty prompt", {"model": "a1", "prompt": ""}, 400, "prompt"),
    ("token outside vocabulary", {"model": "a1", "prompt": [1, 10**9]}, 400, "outside the vocabulary"),
    ("huge prompt", {"model": "a1", "prompt": "The quick brown fox " * 1000}, 400, "maximum context length"),
    ("max_tokens past context", {"model": "a1", "prompt": "x", "max_tokens": 10**6}, 400, "maximum context length"),
    ("too many choices", {"model": "a1", "prompt": "x", "n": 500}, 400, "n"),
    ("unsupported option", {"model": "a1", "prompt": "x", "suffix": "y"}, 400, "suffix is not supported"),
    ("logprobs out of range", {"model": "a1", "prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("no model", {"prompt": "x"}, 400, "model: required field missing"),
    ("array body", [1, 2], 400, ""),
]


@pytest.mark.parametrize("label,body,status,message", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_4xx_with_a_clear_message_and_the_server_keeps_serving(server, label, body, status,
                                                                                 message):
    client = http_client(server)
    if isinstance(body, bytes):
        r = client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    else:
        r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"
    assert _complete(server, "a1", "The", max_tokens=2)["usage"]["completion_tokens"] == 2


def test_huge_bodies_and_bad_chat_input(server):
    client = http_client(server)
    r = client.post("/v1/completions", content=b'{"model": "a1", "prompt": "' + b"x" * (17 << 20) + b'"}',
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]
    for messages, fragment in (([], "messages"), ([{"role": "robot", "content": "hi"}], "role"),
                               ([{"role": "user", "content": 5}], "content")):
        r = client.post("/v1/chat/completions", json={"model": "a1", "messages": messages})
        assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text
    r = client.post("/v1/chat/completions", json={"model": "a1", "messages": [{"role": "user", "content": "Hi"}],
                                                  "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


# -- adapter management ------------------------------------------------------------------------------------------------
def test_upload_load_and_delete_while_a_request_runs(server, setup, reference):
    from ortlora.adapters.onnx_adapter import write_onnx_adapter

    admin = http_client(server)
    data = (setup["adapters"] / "a1.onnx_adapter").read_bytes()
    r = admin.post("/v1/adapters", data={"name": "b-up"}, files={"file": ("x.onnx_adapter", data)})
    assert r.status_code == 200 and r.json() == {"name": "b-up", "loaded": True, "path": "b-up.onnx_adapter"}, r.text
    assert _complete(server, "b-up", PROMPTS[0], key=BETA)["choices"][0]["text"] == reference("a1", PROMPTS[0])
    assert admin.post("/v1/adapters", data={"name": "b-up"}, files={"file": ("x", data)}).status_code == 409

    r = admin.post("/v1/adapters", data={"name": "b-bad"}, files={"file": ("x", b"not an adapter at all")})
    assert r.status_code == 400 and "not a valid .onnx_adapter" in r.json()["error"]["message"]
    misfit = {k: np.ascontiguousarray(v[:-1]) if k.endswith("lora_A.weight") else v  # A [in - 1, r]
              for k, v in setup["params"]["a2"].items()}
    bad = write_onnx_adapter(setup["root"] / "misfit.onnx_adapter", misfit)
    r = admin.post("/v1/adapters", data={"name": "b-misfit"}, files={"file": ("x", bad.read_bytes())})
    assert r.status_code == 400 and "does not fit" in r.json()["error"]["message"], r.text
    assert not (setup["adapters"] / "b-bad.onnx_adapter").exists()
    assert not (setup["adapters"] / "b-misfit.onnx_adapter").exists()

    r = admin.post("/v1/adapters", json={"name": "b-alias", "path": "a2.onnx_adapter"})
    assert r.status_code == 200 and r.json()["loaded"], r.text
    long = {"model": "b-alias", "prompt": PROMPTS[0], "max_tokens": 150, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with http_client(server, BETA).stream("POST", "/v1/completions", json=long) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert admin.delete("/v1/adapters/b-alias").json() == {"name": "b-alias", "deleted": True}
        assert http_client(server, BETA).post("/v1/completions", json={**long, "stream": False}).status_code == 404
        rest = [line[6:] for line in lines if line.startswith("data: ")]
    assert rest[-1] == "[DONE]"
    chunks = [json.loads(first[6:])] + [json.loads(e) for e in rest[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # the request ran to its end
    assert "b-alias" not in {a["name"] for a in admin.get("/v1/adapters").json()["data"]}

    assert admin.delete("/v1/adapters/b-up").status_code == 200
    assert not (setup["adapters"] / "b-up.onnx_adapter").exists()  # uploaded through the API: removed
    assert (setup["adapters"] / "a2.onnx_adapter").exists()  # placed by hand: kept
    assert admin.delete("/v1/adapters/b-up").status_code == 404


def test_adapters_load_on_first_use_into_an_lru(server, setup, reference):
    for i in range(10):  # dropped into the folder while the server runs
        shutil.copy(setup["adapters"] / "a1.onnx_adapter", setup["adapters"] / f"c{i}.onnx_adapter")
    admin = http_client(server)
    assert {f"c{i}" for i in range(10)} <= {m["id"] for m in admin.get("/v1/models").json()["data"]}
    before = _metrics(server)
    for i in range(10):
        assert _complete(server, f"c{i}", PROMPTS[0])["choices"][0]["text"] == reference("a1", PROMPTS[0])
    middle = _metrics(server)
    assert middle["ortlora_adapter_loads_total"] - before["ortlora_adapter_loads_total"] == 10
    assert middle["ortlora_loaded_adapters"] == 5  # --max-loaded-adapters
    evicted = sum(v - before.get(k, 0) for k, v in middle.items() if k.startswith("ortlora_adapter_evictions_total"))
    assert evicted >= 5
    loaded = sorted((a["name"] for a in admin.get("/v1/adapters").json()["data"] if a["loaded"]
                     and a["name"].startswith("c")), key=lambda n: int(n[1:]))
    # the least recently used went first; other tenants' adapters (from earlier tests) keep their shares
    assert loaded == [f"c{i}" for i in range(10 - len(loaded), 10)] and len(loaded) >= 1
    _complete(server, "c9", PROMPTS[1])
    after = _metrics(server)
    assert after["ortlora_adapter_loads_total"] == middle["ortlora_adapter_loads_total"]
    hits, misses = 'ortlora_adapter_cache_hits_total{tenant="admin"}', 'ortlora_adapter_cache_misses_total{tenant="admin"}'
    assert after[hits] == middle[hits] + 1 and after[misses] - before.get(misses, 0) == 10
    assert after["ortlora_adapter_load_seconds_count"] - before["ortlora_adapter_load_seconds_count"] == 10
    assert after["ortlora_loaded_adapter_bytes"] > 0
    assert after['ortlora_adapter_requests_total{adapter="c9"}'] == 2
    for i in range(10):
        (setup["adapters"] / f"c{i}.onnx_adapter").unlink()
    assert "c0" not in {m["id"] for m in admin.get("/v1/models").json()["data"]}


def test_adapter_that_overflows_is_refused_by_name_and_hurts_no_one(server, setup, reference):
    """An adapter file of finite but huge weights (the model's logits overflow to NaN) dropped into the folder is
    refused at its first use by that request's first step (loads for requests skip the probe run; the first step is
    the probe): 400 naming it (never a server path), in a stream too, the second time from the remembered verdict,
    while a request for another adapter decoding meanwhile runs to its end with the reference text."""
    import openai

    from ortlora.adapters.onnx_adapter import write_onnx_adapter

    huge = {k: np.sign(v) * np.float32(1e20) for k, v in setup["params"]["a2"].items()}
    write_onnx_adapter(setup["adapters"] / "huge.onnx_adapter", huge)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=ADMIN, max_retries=0)
    long = {"model": "a4", "prompt": PROMPTS[1], "max_tokens": 60, "temperature": 0, "ignore_eos": True,
            "stream": True}
    try:
        with http_client(server).stream("POST", "/v1/completions", json=long) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            for _ in range(2):  # the second time from the remembered verdict, as fast
                with pytest.raises(openai.BadRequestError, match="'huge' makes the model's logits NaN") as e:
                    client.completions.create(model="huge", prompt=PROMPTS[0], max_tokens=5, temperature=0.8)
                assert str(setup["adapters"]) not in str(e.value)
            failing = http_client(server).post("/v1/completions", json={**long, "model": "huge", "max_tokens": 5})
            assert failing.status_code == 400 and "'huge'" in failing.json()["error"]["message"]
            rest = [line[6:] for line in lines if line.startswith("data: ")]
        assert rest[-1] == "[DONE]"
        text = "".join(json.loads(e)["choices"][0]["text"] for e in [first[6:]] + rest[:-1])
        assert text == reference("a4", PROMPTS[1], tokens=60)
        assert _complete(server, "a1", PROMPTS[0])["choices"][0]["text"] == reference("a1", PROMPTS[0])
    finally:
        (setup["adapters"] / "huge.onnx_adapter").unlink()


@pytest.mark.parametrize("spoil", ["nan", "huge", "shape", "truncated"])
def test_failed_registration_leaves_nothing_behind(server, setup, spoil):
    """An upload or a path registration that is refused (NaN weights, weights that overflow the model, a tensor
    of the wrong shape, a truncated file) answers 400 naming the adapter, and leaves no file, no listing entry and
    no blocked name: the same name registers fine right after with a good file."""
    from ortlora.adapters.onnx_adapter import write_onnx_adapter

    admin = http_client(server)
    good = dict(setup["params"]["a1"])
    bad = {k: np.array(v) for k, v in good.items()}
    key = next(iter(bad))
    if spoil == "nan":
        bad[key][0, 0] = np.nan
    elif spoil == "huge":
        bad = {k: np.sign(v) * np.float32(1e20) for k, v in bad.items()}
    elif spoil == "shape":
        bad[key] = np.zeros((bad[key].shape[0] + 1, bad[key].shape[1]), np.float32)
    staging = setup["root"] / f"staging-{spoil}.onnx_adapter"
    write_onnx_adapter(staging, bad)
    data = staging.read_bytes()
    if spoil == "truncated":
        data = (setup["adapters"] / "a1.onnx_adapter").read_bytes()[:-100]
    before = sorted(p.name for p in setup["adapters"].iterdir())
    name = f"spoiled-{spoil}"
    r = admin.post("/v1/adapters", data={"name": name}, files={"file": ("x.onnx_adapter", data)})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert f"'{name}'" in message and str(setup["root"]) not in message, message
    assert sorted(p.name for p in setup["adapters"].iterdir()) == before  # no file, no temporary left
    assert name not in {a["name"] for a in admin.get("/v1/adapters").json()["data"]}
    assert admin.get(f"/v1/models/{name}").status_code == 404
    # by path: the same refusal, nothing registered
    placed = setup["adapters"] / f".{name}-placed.onnx_adapter"
    placed.write_bytes(data)
    try:
        r = admin.post("/v1/adapters", json={"name": name, "path": placed.name})
        assert r.status_code == 400 and f"'{name}'" in r.json()["error"]["message"], r.text
        assert admin.get(f"/v1/models/{name}").status_code == 404
    finally:
        placed.unlink()
    ok = admin.post("/v1/adapters", data={"name": name},
                    files={"file": ("x.onnx_adapter", (setup["adapters"] / "a1.onnx_adapter").read_bytes())})
    assert ok.status_code == 200, ok.text
    assert admin.delete(f"/v1/adapters/{name}").status_code == 200
    assert sorted(p.name for p in setup["adapters"].iterdir()) == before


def test_client_disconnect_cancels_the_request(server):
    before = _metrics(server)
    body = {"model": "a2", "prompt": PROMPTS[1], "max_tokens": 1000, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with http_client(server).stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # leave after the first chunk: closing the connection
    key = 'ortlora_requests_finished_total{reason="cancelled"}'
    deadline = time.monotonic() + 10
    while _metrics(server).get(key, 0) <= before.get(key, 0):
        assert time.monotonic() < deadline, "the disconnected request was not cancelled"
        time.sleep(0.05)
    after = _metrics(server)
    assert after["ortlora_running_requests"] == 0
    assert after["ortlora_generation_tokens_total"] - before["ortlora_generation_tokens_total"] < 1000

    # not streamed: the client gives up waiting, the server notices. Four 1000-token choices take seconds, so the
    # request cannot finish on its own between the client's leaving and the server's noticing (it once did with
    # one choice and a 0.3 s timeout).
    with pytest.raises(httpx.ReadTimeout):
        http_client(server, timeout=0.1).post("/v1/completions", json={**body, "stream": False, "n": 4})
    deadline = time.monotonic() + 10
    while _metrics(server).get(key, 0) <= after.get(key, 0):
        assert time.monotonic() < deadline, "the abandoned request was not cancelled"
        time.sleep(0.05)
    assert _metrics(server)["ortlora_running_requests"] == 0


# -- load ----------------------------------------------------------------------------------------------------------
async def _burst(url: str, total: int, concurrency: int) -> dict[int, int]:
    limit = asyncio.Semaphore(concurrency)
    statuses: dict[int, int] = {}
    models = ["a1", "a2", "a3", "a4", "base"]
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one(i):
            async with limit:
                stream = i % 2 == 0
                body = {"model": models[i % len(models)], "prompt": PROMPTS[i % 2], "max_tokens": 8,
                        "temperature": 0.7, "seed": i, "stream": stream}
                r = await client.post("/v1/completions", json=body)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 200 and stream:
                    assert r.text.rstrip().endswith("data: [DONE]")

        await asyncio.gather(*(one(i) for i in range(total)))
    return statuses


def test_bounded_burst_only_429s_and_memory_returns(server):
    asyncio.run(_burst(server.url, 64, 32))  # warm-up: allocator arenas, every batch shape
    start = server.rss_mb()
    results = [asyncio.run(_burst(server.url, 200, 32)) for _ in range(2)]
    for statuses in results:
        assert set(statuses) <= {200, 429}, statuses
        assert statuses.get(200, 0) >= 100 and sum(statuses.values()) == 200
    end = server.rss_mb()
    m = _metrics(server)
    assert m["ortlora_running_requests"] == 0 and m["ortlora_queue_depth"] == 0
    print(f"burst statuses {results}; RSS {start:.1f} MB -> {end:.1f} MB")
    assert end - start < 10, f"RSS grew from {start:.1f} MB to {end:.1f} MB"
    assert _complete(server, "a1", "The", max_tokens=2)["usage"]["completion_tokens"] == 2


# -- the OpenAPI document under a fuzzer -------------------------------------------------------------------------------
FUZZ_EXAMPLES = 200  # per operation, in schemathesis' fuzzing phase (its coverage phase adds the schema's edges)
FUZZ_SECONDS = 600  # the run's time limit (it takes about a minute)


def test_schemathesis_finds_no_server_error_and_no_answer_off_the_document(setup, tmp_path):
    """A property-based fuzz of every operation of the server's own OpenAPI document (schemathesis: coverage,
    fuzzing and stateful phases), with tests/fuzz_hooks.py steering half the generation bodies to a served model and
    putting hostile values (lone surrogates, non-ASCII digits, names ending in a newline, numbers past float and
    int64) anywhere in bodies and path parameters: no 5xx, and every answer's status, content type and body as the
    document says."""
    pytest.importorskip("schemathesis")
    work = tmp_path / "adapters"
    shutil.copytree(setup["adapters"], work, symlinks=True)  # the fuzzer deletes and loads adapters: its own copy
    s = ServerProcess(setup["folder"], "--adapters", str(work), "--tenants", str(setup["tenants"]),
                      "--max-model-len", "64", log=tmp_path / "server.log")
    try:
        assert httpx.get(s.url + "/openapi.json").json()["paths"].keys() >= {"/v1/completions", "/v1/adapters"}
        st = shutil.which("st") or str(Path(sys.executable).parent / "st")
        tests = str(Path(__file__).parent)
        env = {**os.environ, "SCHEMATHESIS_HOOKS": "fuzz_hooks",
               "PYTHONPATH": os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)}
        report = tmp_path / "report.json"
        run = subprocess.run(
            [st, "run", s.url + "/openapi.json", "--checks", "not_a_server_error,status_code_conformance,"
             "content_type_conformance,response_schema_conformance", "-n", str(FUZZ_EXAMPLES), "--seed", "1",
             "-w", "1", "-H", f"Authorization: Bearer {ADMIN}",
             "--generation-database", "none", "--no-color", "--request-timeout", "30", "--report", "json",
             "--report-json-path", str(report)],
            capture_output=True, text=True, timeout=FUZZ_SECONDS, cwd=tmp_path, env=env)
        out = re.sub(r"x{200,}", "x...", run.stdout)
        assert run.returncode == 0, out[-6000:] + run.stderr[-2000:]
        figures = json.loads(report.read_text())
        assert figures["test_cases"]["with_failures"] == 0 and not figures["errors"], out[-6000:]
        per_operation = {op: sum(sum(phase.values()) for phase in rates.values())
                         for op, rates in figures["valid_rates"].items()}
        print(f"fuzz: {figures['test_cases']['generated']} cases in {figures['running_time']:.0f} s; per operation "
              f"{per_operation}")
        assert figures["operations"]["tested"] == figures["operations"]["total"]
        assert httpx.get(s.url + "/health").status_code == 200
        assert "Traceback" not in (tmp_path / "server.log").read_text()
    finally:
        s.stop()


# -- without tenants; SIGTERM drains --------------------------------------------------------------------------------
def test_open_server_accepts_any_key_and_sigterm_finishes_in_flight_requests(setup, tmp_path):
    s = ServerProcess(setup["folder"], "--adapters", str(setup["adapters"]), log=tmp_path / "server.log")
    try:
        for headers in ({}, {"Authorization": "Bearer anything"}):
            assert httpx.get(s.url + "/v1/models", headers=headers).status_code == 200
        n, tokens = 4, 800
        received = {i: [] for i in range(n)}
        started = threading.Barrier(n + 1)

        def stream(i):
            body = {"model": f"a{i + 1}", "prompt": PROMPTS[0], "max_tokens": tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True}
            with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
                first = True
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        received[i].append(line[6:])
                        if first:
                            first = False
                            started.wait()

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        started.wait(30)
        s.proc.send_signal(signal.SIGTERM)
        at_signal = [len(received[i]) for i in range(n)]
        for t in threads:
            t.join(60)
        assert s.proc.wait(60) == 0
        assert min(at_signal) < tokens // 2, f"requests had nearly finished before SIGTERM: {at_signal}"
        for i in range(n):
            assert received[i][-1] == "[DONE]"
            chunks = [json.loads(e) for e in received[i][:-1]]
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        with pytest.raises(httpx.TransportError):
            httpx.get(s.url + "/health", timeout=2)
    finally:
        s.stop()
