"""`ortlora serve` on Ray Serve (ortlora.serve.ray): a local Ray instance bound to 127.0.0.1, the tiny model and
adapters of test_serve.py, 2 engine replicas with 1 thread each, against the single-process server and the
reference decoder. Requests go through Ray Serve's HTTP proxy like any client's."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before ray's import: Ray listens on 127.0.0.1 only
import ray  # noqa: E402
from ray import serve  # noqa: E402

from adapter_site import Site
from serve_helpers import ACME, ADMIN, BETA, PROMPTS, TOKENS, ServerProcess

from ortlora.errors import OrtloraError
from ortlora.serve.config import ServeConfig
from ortlora.serve.ray import APP_NAME, ENGINE, build_app
from ortlora.serve.ray.client import merge_expositions

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = ["--max-batch", "8", "--max-queue", "16", "--max-loaded-adapters", "5", "--threads", "1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(pred, what: str, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = pred()
        if out:
            return out
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def url_site():
    """A local HTTP server of adapters by URL (the replicas fetch from it into their own cache folders)."""
    s = Site()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def ray_server(setup, url_site, tmp_path_factory):
    # the replicas' processes import ortlora from this checkout
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    ray.init(address="local", include_dashboard=False, num_cpus=4,
             object_store_memory=80 << 20, log_to_driver=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"model": str(setup["folder"]), "adapters": str(setup["adapters"]),
                             "tenants": str(setup["tenants"]), "replicas": "2", "threads": 1, "max_batch": 8,
                             "max_queue": 16, "max_loaded_adapters": 5, "model_name": "base",
                             "allow_adapter_urls": [url_site.url + "/a/"],
                             "adapter_cache": str(tmp_path_factory.mktemp("ray-cache"))}), name=APP_NAME)
        url = f"http://127.0.0.1:{port}"
        _wait(lambda: _get(url, "/health").status_code == 200, "the ingress to see its replicas")
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def single(setup):
    s = ServerProcess(setup["folder"], "--adapters", str(setup["adapters"]), "--tenants", str(setup["tenants"]),
                      *OPTIONS, log=setup["root"] / "single.log")
    yield s.url
    s.stop()


def _get(url: str, path: str, key: str | None = ADMIN) -> httpx.Response:
    try:
        return httpx.get(url + path, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=30)
    except httpx.TransportError as exc:
        return httpx.Response(599, text=str(exc))


def _post(url: str, path: str, body: dict, key: str | None = ADMIN) -> httpx.Response:
    return httpx.post(url + path, json=body, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=120)


def _greedy(model: str, prompt: str, tokens: int = TOKENS) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}


def _replicas() -> list:
    """Every engine replica's state (pid, loaded adapters, metrics), asked through Ray directly."""
    handle = serve.get_deployment_handle(ENGINE, APP_NAME)
    return [s for s in handle.broadcast("state").results(timeout_s=30, return_exceptions=True)
            if not isinstance(s, Exception)]


def _samples(text: str, name: str) -> list[dict[str, str]]:
    """The label sets of metric `name`'s samples whose value is not 0."""
    out = []
    for line in text.splitlines():
        if line.startswith(name + "{") and not line.endswith(" 0"):
            labels = line[len(name) + 1: line.rindex("}")]
            out.append(dict(part.split("=", 1) for part in labels.replace('"', "").split(",")))
    return out


def test_cli_replicas_serves_on_its_own_local_ray_and_stops_on_sigterm(setup, reference):
    """`ortlora serve --replicas 1`: a private Ray instance, the API on --port, SIGTERM ends it all (exit 0)."""
    port = _free_port()
    log = setup["root"] / "cli-ray.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen([sys.executable, "-m", "ortlora.cli", "serve", "-m", str(setup["folder"]),
                             "--adapters", str(setup["adapters"]), "--replicas", "1", "--threads", "1",
                             "--port", str(port), "--model-name", "base", "--log-level", "warning"],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: proc.poll() is not None or _get(url, "/health", None).status_code == 200, "the CLI's server",
              timeout=120)
        assert proc.poll() is None, log.read_text()
        r = _post(url, "/v1/completions", _greedy("a4", PROMPTS[1]), None)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == reference("a4", PROMPTS[1])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    assert code == 0, log.read_text()[-3000:]
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=2)


def test_ray_equals_single_process_and_keeps_adapters_on_one_replica(ray_server, single, reference):
    assert ray.util.get_node_ip_address() == "127.0.0.1"  # the local instance is reachable from here only
    adapters = ["a1", "a2", "a3", "a4"]
    for name in adapters:  # one request each first: traffic that lets the router learn where each adapter is
        assert _post(ray_server, "/v1/completions", _greedy(name, PROMPTS[0])).status_code == 200
        time.sleep(0.3)  # replicas push their adapters to the router every 0.1 s
    time.sleep(1.0)
    bodies = [_greedy(adapters[i % 4], PROMPTS[i // 4 % 2], TOKENS + i % 3) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        through_ray = list(pool.map(lambda b: _post(ray_server, "/v1/completions", b), bodies))
        direct = list(pool.map(lambda b: _post(single, "/v1/completions", b), bodies))
    for body, r, d in zip(bodies, through_ray, direct):
        assert r.status_code == d.status_code == 200, (r.text, d.text)
        assert r.json()["choices"][0]["text"] == d.json()["choices"][0]["text"]
        assert r.json()["usage"] == d.json()["usage"]
    assert through_ray[0].json()["choices"][0]["text"] == reference("a1", PROMPTS[0])

    # streamed: the same text, piece by piece, through the proxy
    r = httpx.post(ray_server + "/v1/completions", json={**_greedy("a2", PROMPTS[1]), "stream": True},
                   headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    pieces = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert len(pieces) == TOKENS and r.text.rstrip().endswith("data: [DONE]")
    assert "".join(p["choices"][0]["text"] for p in pieces) == reference("a2", PROMPTS[1])

    # each adapter was loaded on one replica only, and all its requests went there (the replicas' metrics)
    metrics = _get(ray_server, "/metrics").text
    loaded = _samples(metrics, "ortlora_replica_adapter_loaded")
    served = _samples(metrics, "ortlora_adapter_requests_total")
    assert {s["replica"] for s in loaded} == {s.replica for s in _replicas()}  # both replicas took adapters
    for name in adapters:
        assert len([s for s in loaded if s["adapter"] == name]) == 1, (name, loaded)
        assert len({s["replica"] for s in served if s["adapter"] == name}) == 1, (name, served)
    assert "# TYPE ortlora_requests_total counter" in metrics and 'replica="ingress"' in metrics


ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
CHAT = [{"role": "user", "content": "Add two and three."}]
# every request feature, each answered by one process and by two Ray replicas
MATRIX = [
    ("/v1/completions", _greedy("a1", PROMPTS[0])),
    ("/v1/completions", {**_greedy("a2", PROMPTS[1]), "adapter_scale": 0.5}),
    ("/v1/completions", {**_greedy("base", PROMPTS[0]), "adapters": [{"name": "a1", "weight": 0.7},
                                                                      {"name": "a4", "weight": 0.3}]}),
    ("/v1/completions", {**_greedy("a3", PROMPTS[1]), "echo": True, "logprobs": 2}),
    ("/v1/completions", {**_greedy("a4", [PROMPTS[0], PROMPTS[1]]), "n": 2, "temperature": 0.8, "seed": 7,
                         "logprobs": 1}),
    ("/v1/chat/completions", {"model": "a2", "messages": CHAT, "max_tokens": 40, "temperature": 0, "tools": [ADD],
                              "tool_choice": "required"}),
    ("/v1/chat/completions", {"model": "a1", "messages": CHAT, "max_tokens": 40, "temperature": 0, "tools": [ADD],
                              "tool_choice": {"type": "function", "function": {"name": "add"}}}),
    ("/v1/chat/completions", {"model": "a3", "messages": CHAT, "max_tokens": 30, "temperature": 0, "logprobs": True,
                              "top_logprobs": 2, "response_format": {"type": "json_object"}}),
    ("/v1/chat/completions", {"model": "base", "messages": CHAT, "max_tokens": 8, "temperature": 0,
                              "adapters": [{"name": "a2", "weight": 1.0}], "adapter_scale": 0.25}),
    # vLLM's fields (prompt_logprobs only unstreamed: streamed it is a 400)
    ("/v1/completions", {**_greedy("a2", PROMPTS[0]), "prompt_logprobs": 2, "echo": True, "logprobs": 1,
                         "return_tokens_as_token_ids": True}),
    ("/v1/chat/completions", {"model": "a4", "messages": CHAT, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                              "chat_template_kwargs": {"enable_thinking": False}, "skip_special_tokens": False,
                              "include_stop_str_in_output": True, "stop": ["e"], "prompt_logprobs": 1}),
    ("/v1/chat/completions", {"model": "a1", "messages": CHAT, "max_tokens": 20, "temperature": 0,
                              "structured_outputs": {"regex": "[0-9]{2,4}"}}),
    # the Responses API: text, a required call, text.format on a weighted combination
    ("/v1/responses", {"model": "a2", "input": "Add two and three.", "instructions": "Be brief.",
                       "max_output_tokens": 10, "temperature": 0, "include": ["message.output_text.logprobs"],
                       "top_logprobs": 2}),
    ("/v1/responses", {"model": "a3", "input": CHAT, "max_output_tokens": 40, "temperature": 0,
                       "tool_choice": "required", "tools": [{"type": "function", **ADD["function"]}]}),
    ("/v1/responses", {"model": "base", "input": CHAT, "max_output_tokens": 30, "temperature": 0,
                       "adapters": [{"name": "a1", "weight": 0.5}, {"name": "a4", "weight": 0.5}],
                       "text": {"format": {"type": "json_object"}}}),
]


def _answer(url: str, path: str, body: dict, stream: bool) -> object:
    """The parts of an answer that must not depend on where it ran (ids, times and call ids left out)."""
    if path == "/v1/responses":
        return _response(url, body, stream)
    if not stream:
        r = _post(url, path, body)
        assert r.status_code == 200, (path, body, r.text)
        out = r.json()
        for c in out["choices"]:
            for call in (c.get("message") or {}).get("tool_calls") or ():
                call.pop("id")
        return out["choices"], out["usage"], out.get("prompt_logprobs")
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=120,
                      headers={"Authorization": f"Bearer {ADMIN}"}) as r:
        assert r.status_code == 200, (path, body)
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    texts: dict = {}
    for chunk in chunks:
        for c in chunk["choices"]:
            piece = c.get("text") or (c.get("delta") or {}).get("content") or ""
            calls = (c.get("delta") or {}).get("tool_calls") or ()
            piece += "".join((call.get("function") or {}).get("arguments") or "" for call in calls)
            texts[c["index"]] = texts.get(c["index"], "") + piece
    return texts


def _response(url: str, body: dict, stream: bool) -> object:
    """A Responses API answer without its ids and times: the output items and usage, or the streamed events'
    types and deltas."""
    if not stream:
        r = _post(url, "/v1/responses", body)
        assert r.status_code == 200, (body, r.text)
        out = r.json()
        for item in out["output"]:
            item.pop("id")
            item.pop("call_id", None)
        return out["output"], out["usage"], out["status"]
    with httpx.stream("POST", url + "/v1/responses", json={**body, "stream": True}, timeout=120,
                      headers={"Authorization": f"Bearer {ADMIN}"}) as r:
        assert r.status_code == 200, body
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    return [(e["type"], e.get("delta")) for e in events]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_ray_answers_the_whole_request_matrix_as_the_single_process(ray_server, single, stream):
    """Scales, combinations, echo + logprobs, n > 1, tools, structured outputs, logprobs, vLLM's fields, the
    Responses API, streaming: equal answers from one process and from two Ray replicas."""
    for path, body in MATRIX:
        if stream and "prompt_logprobs" in body:
            continue
        assert _same(_answer(ray_server, path, body, stream), _answer(single, path, body, stream)), (path, body)


def test_ray_serves_the_tokenizer_endpoints_as_the_single_process(ray_server, single):
    for method, path, body in (("POST", "/tokenize", {"prompt": PROMPTS[1], "return_token_strs": True}),
                               ("POST", "/tokenize", {"messages": CHAT, "chat_template_kwargs": {"x": 1}}),
                               ("POST", "/detokenize", {"tokens": [5, 6, 7, 300]}),
                               ("POST", "/detokenize", {"tokens": [10 ** 6]}),
                               ("GET", "/tokenizer_info", None), ("GET", "/version", None)):
        r, d = (_post(u, path, body) if method == "POST" else _get(u, path) for u in (ray_server, single))
        assert (r.status_code, r.json()) == (d.status_code, d.json()), path


def _same(a, b) -> bool:
    """Equal, floats within 1e-4: a logprob's last digits depend on the rows it shared a batch with."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= 1e-4
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_ray_tenants_answer_as_the_single_process(ray_server, single):
    cases = [("/v1/completions", _greedy("a1", "hi"), None), ("/v1/completions", _greedy("a1", "hi"), "wrong"),
             ("/v1/completions", _greedy("a3", "hi"), ACME), ("/v1/completions", _greedy("a1", "hi"), BETA),
             ("/v1/completions", _greedy("base", "hi"), ACME), ("/v1/completions", _greedy("nope", "hi"), ADMIN),
             ("/v1/completions", {**_greedy("a1", "hi"), "max_tokens": 10 ** 6}, ADMIN)]
    for path, body, key in cases:
        r, d = _post(ray_server, path, body, key), _post(single, path, body, key)
        assert (r.status_code, r.json()) == (d.status_code, d.json()), (key, body)
        assert r.status_code in (400, 401, 404)
    for path, key in (("/v1/models", ACME), ("/v1/adapters", BETA), ("/metrics", ACME), ("/v1/models/a4", ACME)):
        r, d = _get(ray_server, path, key), _get(single, path, key)
        assert r.status_code == d.status_code, path
        if r.status_code != 200:
            assert r.json() == d.json()
        elif path.startswith("/v1/"):  # the same names (`created` is each server's start)
            assert [a.get("id", a.get("name")) for a in r.json()["data"]] == \
                [a.get("id", a.get("name")) for a in d.json()["data"]], path


def test_ray_upload_reaches_every_replica_and_delete_unloads_everywhere(ray_server, setup, reference):
    data = (setup["adapters"] / "a3.onnx_adapter").read_bytes()
    headers = {"Authorization": f"Bearer {ADMIN}"}
    r = httpx.post(ray_server + "/v1/adapters", data={"name": "b-up"}, files={"file": ("x", data)}, headers=headers)
    assert r.status_code == 200, r.text
    try:
        body = _greedy("b-up", PROMPTS[0])
        assert _post(ray_server, "/v1/completions", body, BETA).json()["choices"][0]["text"] == \
            reference("a3", PROMPTS[0])
        assert any("b-up" in s.loaded for s in _replicas())
        bad = httpx.post(ray_server + "/v1/adapters", data={"name": "b-bad"}, files={"file": ("x", b"junk")},
                         headers=headers)
        assert bad.status_code == 400 and not (setup["adapters"] / "b-bad.onnx_adapter").exists()
    finally:
        assert httpx.delete(ray_server + "/v1/adapters/b-up", headers=headers).status_code == 200
    assert not (setup["adapters"] / "b-up.onnx_adapter").exists()
    assert not any("b-up" in s.loaded for s in _replicas())
    assert _post(ray_server, "/v1/completions", body, BETA).status_code == 404

    # registered by path under another name: the replica serving it registers that file too; a delete leaves the
    # file (placed by hand) and its own name alone
    r = _post(ray_server, "/v1/adapters", {"name": "b-path", "path": "a4.onnx_adapter"})
    assert r.status_code == 200, r.text
    body = _greedy("b-path", PROMPTS[1])
    assert _post(ray_server, "/v1/completions", body, BETA).json()["choices"][0]["text"] == \
        reference("a4", PROMPTS[1])
    assert httpx.delete(ray_server + "/v1/adapters/b-path", headers=headers).status_code == 200
    assert _post(ray_server, "/v1/completions", body, BETA).status_code == 404
    assert (setup["adapters"] / "a4.onnx_adapter").exists()
    assert _post(ray_server, "/v1/completions", _greedy("a4", PROMPTS[1]), BETA).status_code == 200


def test_ray_client_leaving_mid_stream_frees_the_replicas_slot(ray_server):
    headers = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.stream("POST", ray_server + "/v1/completions", json={**_greedy("a2", PROMPTS[1], 600), "stream": True},
                      headers=headers, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert sum(s.running for s in _replicas()) == 1
    _wait(lambda: sum(s.running for s in _replicas()) == 0, "the replica to drop the abandoned request", 20)


def test_ray_replica_killed_mid_stream_fails_its_requests_cleanly_and_recovers(ray_server, reference):
    headers = {"Authorization": f"Bearer {ADMIN}"}

    def stream(body):
        with httpx.stream("POST", ray_server + "/v1/completions", json=body, headers=headers, timeout=120) as r:
            return r.status_code, list(r.iter_lines())

    def running(replica: str) -> int:
        return next((s.running for s in _replicas() if s.replica == replica), 0)

    with ThreadPoolExecutor(2) as pool:
        killed = pool.submit(stream, {**_greedy("a1", PROMPTS[1], 900), "stream": True})
        # the only request in flight: the replica running it is the one to kill (routing is the router's choice)
        victim = _wait(lambda: next((s for s in _replicas() if s.running), None), "the long stream to start")
        other = next(s for s in _replicas() if s.replica != victim.replica)
        # an adapter the other replica holds goes there (its holder; of two holders, the less loaded one)
        survivor = next((a for a in ("a2", "a3", "a4") if a in other.loaded), "a2")
        unaffected = pool.submit(stream, {**_greedy(survivor, PROMPTS[0], 200), "stream": True})
        _wait(lambda: running(other.replica), "the second stream to start on the other replica", 30)
        os.kill(victim.pid, signal.SIGKILL)  # mid-stream, the headers long gone
        status, lines = killed.result(timeout=120)
        ok_status, ok_lines = unaffected.result(timeout=120)
    assert status == 200
    errors = [json.loads(line[6:]) for line in lines if line.startswith('data: {"error"')]
    assert len(errors) == 1 and errors[0]["error"]["type"] == "service_unavailable", lines[-3:]
    assert "stopped before it finished" in errors[0]["error"]["message"]
    # the other replica's stream went on undisturbed, to its last token
    assert ok_status == 200 and [line for line in ok_lines if line][-1] == "data: [DONE]"
    text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in ok_lines if line.startswith("data: {"))
    assert text == reference(survivor, PROMPTS[0], 200)

    # Ray restarts the replica; the deployment serves a1 again, with the same output
    _wait(lambda: len(_replicas()) == 2 and victim.pid not in {s.pid for s in _replicas()}, "the restarted replica")
    r = _post(ray_server, "/v1/completions", _greedy("a1", PROMPTS[0]))
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == reference("a1", PROMPTS[0])

    # with no replica up, the ingress answers 503 (not a hang) until Ray has restarted one
    for state in _replicas():
        os.kill(state.pid, signal.SIGKILL)
    _wait(lambda: _get(ray_server, "/health").status_code == 503, "/health to say no replica is ready", 30)
    r = _post(ray_server, "/v1/completions", _greedy("a1", PROMPTS[0]))
    assert r.status_code == 503 and "no engine replica is ready" in r.json()["error"]["message"]
    _wait(lambda: _get(ray_server, "/health").status_code == 200, "the replicas to come back")
    assert _post(ray_server, "/v1/completions", _greedy("a2", PROMPTS[0])).status_code == 200


def test_ray_replicas_fetch_a_url_adapter_themselves(ray_server, url_site, setup, reference):
    """A URL registration is checked by one replica and served by whichever replica a request reaches, each
    fetching it into its own cache folder: nothing is written to the adapters directory."""
    _wait(lambda: _get(ray_server, "/health").status_code == 200, "the replicas")
    before = sorted(p.name for p in setup["adapters"].iterdir())
    url_site.put("/a/u.onnx_adapter", (setup["adapters"] / "a3.onnx_adapter").read_bytes())
    r = _post(ray_server, "/v1/adapters", {"name": "b-url", "url": url_site.url + "/a/u.onnx_adapter"})
    assert r.status_code == 200 and r.json()["url"] == url_site.url + "/a/u.onnx_adapter", r.text
    try:
        body = _greedy("b-url", PROMPTS[0])
        assert _post(ray_server, "/v1/completions", body, BETA).json()["choices"][0]["text"] == \
            reference("a3", PROMPTS[0])
        assert any("b-url" in s.loaded for s in _replicas()) and url_site.count("GET") >= 1
        assert sorted(p.name for p in setup["adapters"].iterdir()) == before
        r = _post(ray_server, "/v1/adapters", {"name": "b-out", "url": url_site.url + "/b/u.onnx_adapter"})
        assert r.status_code == 400 and "not under a URL prefix" in r.text
    finally:
        assert httpx.delete(ray_server + "/v1/adapters/b-url", headers={"Authorization": f"Bearer {ADMIN}"}) \
            .status_code == 200
    assert _post(ray_server, "/v1/completions", body, BETA).status_code == 404


def test_example_config_in_the_docs_is_a_valid_serve_config(setup):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    text = (ROOT / "docs" / "ray.md").read_text()
    config = yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])
    app = ServeDeploySchema.model_validate(config).applications[0]
    assert app.import_path == "ortlora.serve.ray:build_app"
    args = ServeConfig.parse(app.args)
    assert args.scaling() == {"autoscaling_config": {"min_replicas": 2, "max_replicas": 8,
                                                     "target_ongoing_requests": 16}}
    with pytest.raises(OrtloraError, match="unknown argument 'replica'.*threads must be an integer"):
        ServeConfig.parse({"model": "m", "replica": 2, "threads": "four"})


def test_merged_metrics_label_every_sample_with_its_replica():
    header = "# HELP x_total x\n# TYPE x_total counter\n"
    text = merge_expositions([("ingress", header + "x_total 3\n"),
                              ("r1", header + 'x_total{a="b c"} 1\n# TYPE g gauge\ng 2\n')])
    assert text.splitlines() == ["# HELP x_total x", "# TYPE x_total counter", 'x_total{replica="ingress"} 3',
                                 'x_total{replica="r1",a="b c"} 1', "# TYPE g gauge", 'g{replica="r1"} 2']


def test_single_process_server_does_not_import_ray():
    code = ("import sys, ortlora.serve, ortlora.serve.app, ortlora.serve.local, ortlora.serve.cli; "
            "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
