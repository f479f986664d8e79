"""Adapters from where they live, through the HTTP API: registrations by URL (only under a prefix the operator
allows; loaded once per version; a changed remote file is a new version; failures answered 400/404/503 like a bad
file), a restart served from the cache while the source is down, and listings of thousands that cost no file I/O
per name. URL sources are a local HTTP server (tests/adapter_site.py); servers bind 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import time

import httpx
import pytest

from adapter_site import Site
from serve_helpers import ACME, ADMIN, ServerProcess, build_serve_setup

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    return build_serve_setup(tiny, tmp_path_factory.mktemp("serve-sources"))


@pytest.fixture
def site():
    s = Site()
    yield s
    s.stop()


def _client(server, key=ADMIN) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _text(server, model: str) -> str:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    r = _client(server).post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_url_registrations_load_once_per_version_fail_by_cause_and_restart_from_the_cache(setup, site, tmp_path):
    adapters = setup["adapters"]
    site.put("/a/u.onnx_adapter", (adapters / "a1.onnx_adapter").read_bytes())
    site.put("/a/junk.onnx_adapter", b"<html>sign in</html>" * 50)
    site.status["/a/down.onnx_adapter"] = 503
    url = site.url + "/a/u.onnx_adapter"
    cache = tmp_path / "cache"
    server = ServerProcess(setup["folder"], "--adapters", str(adapters), "--tenants", str(setup["tenants"]),
                           "--allow-adapter-urls", site.url + "/a/", "--adapter-cache", str(cache),
                           "--adapter-revalidate", "0", log=tmp_path / "first.log")
    try:
        admin = _client(server)
        r = admin.post("/v1/adapters", json={"name": "u", "url": url})
        assert r.status_code == 200 and r.json() == {"name": "u", "loaded": True, "path": None, "url": url}, r.text
        assert _text(server, "u") == _text(server, "a1") and _text(server, "u") == _text(server, "a1")
        assert site.count("GET") == 1  # every use asked for the version (HEAD), one download
        site.put("/a/u.onnx_adapter", (adapters / "a2.onnx_adapter").read_bytes())
        changed = _text(server, "u")
        assert changed == _text(server, "a2") and site.count("GET") == 2  # a new version, downloaded once
        assert {"name": "u", "loaded": True, "path": None, "url": url} in admin.get("/v1/adapters").json()["data"]

        for body, status, why in [
            ({"name": "v", "url": site.url + "/b/v.onnx_adapter"}, 400, "not under a URL prefix this server allows"),
            ({"name": "v", "url": site.url + "/a/../b/v.onnx_adapter"}, 400, "not under a URL prefix"),
            ({"name": "v", "url": site.url + "/a/missing.onnx_adapter"}, 404, "does not exist"),
            ({"name": "v", "url": site.url + "/a/down.onnx_adapter"}, 503, "answered HTTP 503"),
            ({"name": "v", "url": site.url + "/a/junk.onnx_adapter"}, 400, "adapter 'v'"),
            ({"name": "v", "url": url, "path": "a1.onnx_adapter"}, 400, "exactly one of path"),
            ({"name": "u", "url": url}, 409, "already exists"),
        ]:
            r = admin.post("/v1/adapters", json=body)
            assert r.status_code == status and why in r.json()["error"]["message"], (body, r.text)
            assert str(cache) not in r.text
        assert "v" not in {a["name"] for a in admin.get("/v1/adapters").json()["data"]}
        assert _client(server, ACME).post("/v1/adapters", json={"name": "v", "url": url}).status_code == 403
        r = admin.post("/v1/load_lora_adapter", json={"lora_name": "w", "lora_path": url})  # vLLM's endpoint
        assert r.status_code == 200 and _text(server, "w") == changed, r.text
    finally:
        server.stop()

    # a restart: an index file names the URL; the source is down, so the copy in the cache is served
    index = tmp_path / "index.json"
    index.write_text(json.dumps({"u": url}))
    site.status["/a/u.onnx_adapter"] = 503
    server = ServerProcess(setup["folder"], "--adapters", str(index), "--adapter-cache", str(cache),
                           log=tmp_path / "second.log")
    try:
        assert _text(server, "u") == changed
        r = _client(server).post("/v1/adapters", json={"name": "v", "url": url})  # no --allow-adapter-urls
        assert r.status_code == 400 and "does not register adapters by URL" in r.text
    finally:
        server.stop()


def test_listing_thousands_of_adapters_costs_no_file_io_per_name(setup, tmp_path, monkeypatch):
    """2,000 adapters in the folder and 100 registered through the API: `/v1/models` and `/v1/adapters` list them
    from memory (the folder's own stat, not one per name) while the folder is unchanged, and list a file dropped in
    since (its modification time changed) without a restart."""
    from fastapi.testclient import TestClient

    from ortlora.serve.app import create_app
    from ortlora.serve.config import ServeConfig
    from ortlora.serve.local import LocalEngine

    root = tmp_path / "many"
    root.mkdir()
    shutil.copy(setup["adapters"] / "a1.onnx_adapter", root / "x0.onnx_adapter")
    for i in range(1, 2000):
        (root / f"x{i}.onnx_adapter").symlink_to("x0.onnx_adapter")
    os.utime(root, (1e9, 1e9))  # changed long ago
    config = ServeConfig(model=str(setup["folder"]), adapters=str(root), model_name="base", threads=1, max_batch=2)
    with TestClient(create_app(LocalEngine(config), config)) as client:
        t0 = time.perf_counter()
        for i in range(100):
            r = client.post("/v1/adapters", json={"name": f"r{i}", "path": "x0.onnx_adapter"})
            assert r.status_code == 200, r.text
        registering = (time.perf_counter() - t0) / 100
        os.utime(root, (1e9, 1e9))
        calls: list[tuple] = []  # file system calls on the adapters folder and what it holds
        for fn in ("stat", "lstat", "scandir", "listdir"):
            real = getattr(os, fn)

            def spy(path=".", *a, _real=real, _fn=fn, **k):
                if str(path).startswith(str(root)):
                    calls.append((_fn, str(path)))
                return _real(path, *a, **k)

            monkeypatch.setattr(os, fn, spy)
        t0 = time.perf_counter()
        models = client.get("/v1/models").json()["data"]
        listed = client.get("/v1/adapters").json()["data"]
        listing = time.perf_counter() - t0
        monkeypatch.undo()
        assert len(models) == 2101 and len(listed) == 2100 and calls == [("stat", str(root))] * 2
        assert {"name": "r99", "loaded": True, "path": "x0.onnx_adapter"} in listed
        (root / "late.onnx_adapter").symlink_to("x0.onnx_adapter")
        assert "late" in {m["id"] for m in client.get("/v1/models").json()["data"]}
    print(f"registration {registering * 1e3:.1f} ms each; /v1/models + /v1/adapters of 2,100: {listing * 1e3:.0f} ms")
