"""Adapter sources by URL (ortlora.runtime.sources) against servers that run here: a local HTTP server with ETag and
Last-Modified that counts its requests, and a local S3 server (moto). Nothing reaches the internet."""

from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import pytest

from adapter_site import Site, adapter_bytes, peft_files
from ortlora.errors import AdapterError, AdapterInvalid, AdapterNotFound, AdapterUnavailable
from ortlora.runtime.sources import AdapterCache, Backends, open_source


@pytest.fixture
def site():
    s = Site()
    yield s
    s.stop()


@pytest.fixture
def cache(tmp_path):
    c = AdapterCache(tmp_path / "cache", revalidate_s=3600.0)
    yield c
    c.close()


def one(url: str, cache: AdapterCache, name: str = "acme", timeout_s: float = 5.0, download_s: float = 60.0):
    return open_source(url, cache, name=name, backends=Backends(timeout_s=timeout_s, download_s=download_s))


def test_loads_once_per_version_and_a_changed_file_is_a_new_version(site, cache, tmp_path):
    from ortlora.adapters.onnx_adapter import read_onnx_adapter

    v1, v2 = adapter_bytes(tmp_path, 1), adapter_bytes(tmp_path, 2)
    site.put("/a/acme.onnx_adapter", v1)
    source = one(f"{site.url}/a/acme.onnx_adapter", cache)
    assert source.names() == ["acme"] and site.count() == 0  # naming downloads nothing
    with source.locate("acme") as first:
        assert first.path.read_bytes() == v1 and read_onnx_adapter(first.path)
    assert (site.count("HEAD"), site.count("GET")) == (1, 1)

    with source.locate("acme") as again:  # within the revalidation interval: no request at all
        assert again.path == first.path and again.version == first.version
    assert site.count() == 2

    cache.revalidate_s = 0.0  # every locate asks for the version now
    with source.locate("acme") as same:  # unchanged: one metadata request, no download
        assert same.path == first.path and same.version == first.version
    assert (site.count("HEAD"), site.count("GET")) == (2, 1)

    site.put("/a/acme.onnx_adapter", v2)
    with source.locate("acme") as second:
        assert second.version != first.version and second.path.read_bytes() == v2
        assert not first.path.exists()  # the superseded copy went (nobody held it)
    assert (site.count("HEAD"), site.count("GET")) == (3, 2)
    assert cache.stats.downloads == 2 and cache.nbytes() == len(v2)


def test_concurrent_first_uses_download_once(site, cache, tmp_path):
    site.put("/acme.onnx_adapter", adapter_bytes(tmp_path, 1))
    site.delay["/acme.onnx_adapter"] = 0.2  # every thread arrives while the first download runs
    source = one(f"{site.url}/acme.onnx_adapter", cache)
    paths, threads = [], []
    for _ in range(6):
        threads.append(threading.Thread(target=lambda: paths.append(source.locate("acme").path)))
        threads[-1].start()
    for t in threads:
        t.join()
    assert len(set(paths)) == 1 and site.count("GET") == 1


def test_the_cache_survives_a_restart_and_is_verified(site, tmp_path):
    data = adapter_bytes(tmp_path, 1)
    site.put("/acme.onnx_adapter", data)
    root = tmp_path / "cache"
    with AdapterCache(root) as cache:
        with pytest.raises(AdapterError, match="in use by another process"):
            AdapterCache(root)  # one process per folder
        with one(f"{site.url}/acme.onnx_adapter", cache).locate("acme") as found:
            path, version = found.path, found.version
    (root / "entries" / ".stray.abcd1234.tmp").write_bytes(b"left by a killed download")

    with AdapterCache(root, revalidate_s=0.0) as cache:  # a restart: the index on disk finds the copy
        assert not (root / "entries" / ".stray.abcd1234.tmp").exists()
        with one(f"{site.url}/acme.onnx_adapter", cache).locate("acme") as found:
            assert (found.path, found.version) == (path, version)
    assert (site.count("HEAD"), site.count("GET")) == (2, 1)  # checked, not downloaded again

    corrupt = bytearray(path.read_bytes())
    corrupt[-1] ^= 0xFF  # same size, other bytes: only the hash tells
    path.write_bytes(bytes(corrupt))
    with AdapterCache(root) as cache:
        with one(f"{site.url}/acme.onnx_adapter", cache).locate("acme") as found:
            assert found.path.read_bytes() == data
    assert site.count("GET") == 2


def test_the_bound_evicts_the_least_recently_used_copy_nobody_holds(site, tmp_path):
    data = {n: adapter_bytes(tmp_path, i) for i, n in enumerate(["a", "b", "c", "d"])}
    for n, d in data.items():
        site.put(f"/{n}.onnx_adapter", d)
    size = len(data["a"])
    with AdapterCache(tmp_path / "cache", max_bytes=2 * size + size // 2) as cache:
        sources = {n: one(f"{site.url}/{n}.onnx_adapter", cache, name=n) for n in data}
        a = sources["a"].locate("a")
        a.release()
        held = sources["b"].locate("b")  # b is held; a is the least recently used
        with sources["c"].locate("c"):
            assert not a.path.exists() and held.path.exists()
            assert cache.nbytes() <= cache.max_bytes
            with sources["d"].locate("d") as d:  # everything held: over the bound until one is released
                assert d.path.exists() and cache.nbytes() == 3 * size
        assert cache.nbytes() <= cache.max_bytes and held.path.exists()
        held.release()
        assert cache.stats.evictions >= 2


@pytest.mark.parametrize("case, error, why", [
    ("missing", AdapterNotFound, "does not exist"),
    ("forbidden", AdapterUnavailable, "refused access"),
    ("server error", AdapterUnavailable, "answered HTTP 503"),
    ("slow", AdapterUnavailable, "did not answer in time"),
    ("trickling", AdapterUnavailable, "did not arrive within 0.3 s"),
    ("refused", AdapterUnavailable, "could not be reached"),
    ("garbage", AdapterInvalid, "not a valid .onnx_adapter"),
    ("truncated", AdapterInvalid, "not a valid .onnx_adapter"),
    ("short read", AdapterInvalid, "truncated or changed"),
    ("oversized", AdapterInvalid, "larger than the 4096-byte download limit"),
])
def test_a_failing_or_garbage_source_is_refused_and_leaves_nothing(site, tmp_path, case, error, why):
    good = adapter_bytes(tmp_path, 1, rank=64)  # > 4 KiB
    path = "/x.onnx_adapter"
    site.put(path, good)
    url = f"{site.url}{path}"
    if case == "missing":
        url = f"{site.url}/nothing.onnx_adapter"
    elif case == "forbidden":
        site.status[path] = 403
    elif case == "server error":
        site.status[path] = 503
    elif case == "slow":
        site.delay[path] = 1.5
    elif case == "refused":
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{s.getsockname()[1]}{path}"
    elif case == "garbage":
        site.put(path, b"<html>not an adapter</html>" * 10)
    elif case == "truncated":
        site.put(path, good[: len(good) // 2])
    elif case == "short read":
        site.short.add(path)
    elif case == "trickling":  # every piece arrives within the read timeout, the whole file does not
        site.trickle.add(path)
    max_download = 4096 if case == "oversized" else 1 << 20
    with AdapterCache(tmp_path / "cache", max_download_bytes=max_download) as cache:
        source = one(url, cache, name="x", timeout_s=0.5, download_s=0.3)
        with pytest.raises(error, match=why) as caught:
            source.locate("x")
        assert "adapter 'x'" in str(caught.value)
        assert list((tmp_path / "cache" / "entries").iterdir()) == []
        if case == "oversized":
            assert site.count("GET") == 0  # refused from the announced size
        before = site.count()
        with pytest.raises(error):  # remembered: asked again only after a while
            source.locate("x")
        assert site.count() == before


def test_credentials_and_query_strings_never_appear_in_errors(site, tmp_path):
    site.put("/x.onnx_adapter", adapter_bytes(tmp_path, 1))
    site.auth = "alice:s3cret"
    host = site.url.removeprefix("http://")
    with AdapterCache(tmp_path / "cache") as cache:
        ok = one(f"http://alice:s3cret@{host}/x.onnx_adapter?sig=tok3n", cache, name="x")
        with ok.locate("x") as found:  # the URL's credentials are used
            assert found.path.is_file()
        assert "s3cret" not in json.dumps(json.loads((tmp_path / "cache" / "index.json").read_text()))
        for url in (f"http://alice:wrong-s3cret@{host}/x.onnx_adapter?sig=tok3n",
                    f"http://alice:s3cret@{host}/gone.onnx_adapter?sig=tok3n"):
            source = one(url, cache, name="y")
            with pytest.raises(AdapterNotFound) as caught:
                source.locate("y")
            message = str(caught.value)
            assert "s3cret" not in message and "tok3n" not in message and "alice" not in message
            assert f"http://{host}/" in message and source.label.startswith(f"http://{host}/")


def test_a_source_that_goes_down_is_served_from_its_cached_copy(site, tmp_path):
    site.put("/x.onnx_adapter", adapter_bytes(tmp_path, 1))
    with AdapterCache(tmp_path / "cache", revalidate_s=0.0) as cache:
        source = one(f"{site.url}/x.onnx_adapter", cache, name="x")
        first = source.locate("x")
        first.release()
        site.status["/x.onnx_adapter"] = 503
        with source.locate("x") as found:
            assert found.path == first.path
        site.status["/x.onnx_adapter"] = 404  # deleted at the source: the copy goes too
        with pytest.raises(AdapterNotFound):
            source.locate("x")
        assert not first.path.exists()


def test_an_index_file_names_adapters_without_downloading_them(site, cache, tmp_path):
    from ortlora.adapters.peft import read_lora

    site.put("/lib/acme.onnx_adapter", adapter_bytes(tmp_path, 1))
    for name, data in peft_files().items():
        site.put(f"/lib/peft/support/{name}", data)
    site.put("/lib/index.toml", b'[adapters]\nacme = "acme.onnx_adapter"\nsupport = "peft/support"\n'
                                b'"bad name!" = "x.onnx_adapter"\n')
    source = open_source(f"{site.url}/lib/index.toml", cache, backends=Backends(timeout_s=5.0), refresh_s=3600)
    assert source.names() == ["acme", "support"] and site.count() == 1  # the index only
    assert any("bad name!" in s for s in source.skipped)
    with source.locate("support") as found:
        assert sorted(p.name for p in found.path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        assert read_lora(found.path).modules
    with pytest.raises(AdapterNotFound):
        source.locate("nobody")

    site.put("/lib/index.toml", b'acme = "acme.onnx_adapter"\nnew = "acme.onnx_adapter"\n')
    assert source.names() == ["acme", "support"]  # the listing is kept until it is old
    source.refresh()
    assert source.names() == ["acme", "new"]

    local = tmp_path / "index.json"
    local.write_text(json.dumps({"acme": f"{site.url}/lib/acme.onnx_adapter"}))
    with open_source(str(local), cache).locate("acme") as found:
        assert found.path.is_file()


def test_a_web_folder_is_not_listed_and_a_missing_backend_names_its_package(site, cache, monkeypatch):
    with pytest.raises(AdapterInvalid, match="index file"):
        open_source(f"{site.url}/lib/", cache)
    import fsspec

    def missing(protocol):
        raise ImportError(f"Install the backend for {protocol}")

    monkeypatch.setattr(fsspec, "get_filesystem_class", missing)
    with pytest.raises(AdapterInvalid, match=r"s3fs \(pip install 'ortlora\[s3\]'\)"):
        one("s3://bucket/x.onnx_adapter", cache, name="x").locate("x")


def test_a_local_folder_is_a_source_with_file_versions(tmp_path):
    from ortlora.runtime.sources import DirectorySource

    folder = tmp_path / "adapters"
    folder.mkdir()
    (folder / "acme.onnx_adapter").write_bytes(adapter_bytes(tmp_path, 1))
    source = open_source(str(folder))
    assert isinstance(source, DirectorySource) and source.names() == ["acme"]
    first = source.locate("acme").version
    time.sleep(0.01)
    (folder / "acme.onnx_adapter").write_bytes(adapter_bytes(tmp_path, 2, rank=3))
    assert source.locate("acme").version != first
    with pytest.raises(AdapterNotFound):
        source.locate("nobody")


# -- S3 (a local moto server) ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3():
    pytest.importorskip("s3fs")
    moto = pytest.importorskip("moto.server")
    server = moto.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"s3": {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing",
                      "client_kwargs": {"region_name": "eu-west-1"}}}
    yield options
    server.stop()


def test_s3_prefix_is_listed_without_downloading_and_fetched_per_version(s3, tmp_path):
    backends = Backends(s3)
    fs, _ = backends.filesystem("s3://adapters")
    fs.mkdir("adapters")
    fs.pipe("adapters/team/acme.onnx_adapter", adapter_bytes(tmp_path, 1))
    for name, data in peft_files().items():
        fs.pipe(f"adapters/team/support/{name}", data)
    fs.pipe("adapters/team/README.md", b"not an adapter")
    fs.pipe("adapters/team/deep/er/x.onnx_adapter", adapter_bytes(tmp_path, 3))  # not directly under the prefix
    with AdapterCache(tmp_path / "cache", revalidate_s=0.0) as cache:
        source = open_source("s3://adapters/team/", cache, backends=backends)
        assert source.names() == ["acme", "support"] and cache.stats.downloads == 0
        with source.locate("acme") as first, source.locate("support") as peft:
            assert first.path.is_file() and (peft.path / "adapter_model.safetensors").is_file()
        assert cache.stats.downloads == 2
        with source.locate("acme") as same:
            assert same.version == first.version
        assert cache.stats.downloads == 2  # unchanged ETag: not downloaded again
        fs.pipe("adapters/team/acme.onnx_adapter", adapter_bytes(tmp_path, 2))
        with source.locate("acme") as second:
            assert second.version != first.version and cache.stats.downloads == 3
        fs.rm("adapters/team/acme.onnx_adapter")
        with pytest.raises(AdapterNotFound, match="does not exist"):
            source.locate("acme")
        with pytest.raises(AdapterNotFound):
            open_source("s3://no-such-bucket/x.onnx_adapter", cache, backends=backends).locate("x")


# -- with a model: a fetched adapter loads as the local one does, and one that does not fit is refused ---------------
def test_a_fetched_peft_folder_loads_like_the_local_one_and_a_misfit_is_refused(tiny, site, cache):
    from reference import targets_for

    from ortlora.adapters.validate import model_lora_inputs
    from ortlora.runtime.adapters import Adapters

    hf = tiny.model("llama")
    inputs = model_lora_inputs(tiny.export(hf, "serve-lora", lora_targets=targets_for("llama")))
    local = tiny.adapter(hf, "qv", target_modules=["q_proj", "v_proj"])
    other = tiny.adapter(tiny.model("llama", hidden_size=32, intermediate_size=96), "qv-other",
                         target_modules=("q_proj", "v_proj"))
    for name, folder in (("acme", local), ("other", other)):
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            site.put(f"/{name}/{f}", (folder / f).read_bytes())
    adapters = Adapters(inputs)
    expected = adapters.load(local, "local").params
    with one(f"{site.url}/acme", cache).locate("acme") as found:
        got = adapters.load(found.path, "acme").params
    assert got.keys() == expected.keys() and all(np.array_equal(got[k], expected[k]) for k in got)
    with one(f"{site.url}/other", cache, name="other").locate("other") as found:
        with pytest.raises(AdapterInvalid, match="mis-shaped"):
            adapters.load(found.path, "other")
