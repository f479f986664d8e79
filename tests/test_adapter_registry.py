"""The adapters' roles apart, without a model: the registry (names -> sources, origins another process replays, the
URL prefixes an operator allows), the loaded set (LRU with tenant shares and pins), and `Adapters` over them (events
instead of counters; URL adapters loaded once per version, from the cache after a restart, refused like bad files).
URL sources are a local HTTP server (tests/adapter_site.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from adapter_site import A, Site, adapter_bytes
from ortlora.adapters.validate import LoraInput
from ortlora.errors import AdapterBusy, AdapterError, AdapterInvalid, AdapterNotFound, AdapterUnavailable
from ortlora.runtime.adapter_lru import LoadedSet
from ortlora.runtime.adapters import AdapterLoaded, Adapters, AdapterUnloaded, AdapterUsed
from ortlora.runtime.registry import AdapterRegistry, Origin, check_prefix, url_under
from ortlora.runtime.sources import AdapterCache

# adapter_bytes' adapters: q_proj of layer 0, 16 -> 16
LORA = {f"{A}.lora_A.weight": LoraInput(f"{A}.lora_A.weight", np.dtype(np.float32), (16, f"{A}.lora_r")),
        f"{A}.lora_B.weight": LoraInput(f"{A}.lora_B.weight", np.dtype(np.float32), (f"{A}.lora_r", 16))}


@pytest.fixture
def site():
    s = Site()
    yield s
    s.stop()


def folder_of(tmp_path, names, rank=2):
    """An adapters folder holding `names` (links to one file: listed and read like files)."""
    root = tmp_path / "adapters"
    root.mkdir()
    first, *rest = names
    (root / f"{first}.onnx_adapter").write_bytes(adapter_bytes(tmp_path, 1, rank))
    for n in rest:
        (root / f"{n}.onnx_adapter").symlink_to(f"{first}.onnx_adapter")
    return root


# -- the loaded set: LRU, tenant shares, pins --------------------------------------------------------------------
def test_loaded_set_protects_each_tenants_share_and_never_picks_a_pin():
    s = LoadedSet(capacity=8, pins=("keep",))
    for n in ("b0", "b1", "b2"):
        s.add(n, "B")
    for i in range(5):
        s.add(f"a{i}", "A")
    idle = lambda n: True  # noqa: E731
    assert s.share("A") == 4 and s.victim("A", idle) == ("a0", "tenant_share")  # plain LRU would take b0
    assert s.victim("B", idle) == ("a0", "tenant_share")  # B is under its share: A's (over) go first
    assert s.victim("C", idle) == ("b0", "lru")  # a newcomer: share 8 // 3 = 2, A and B both over: plain LRU
    assert s.victim("A", lambda n: n != "a0") == ("a1", "tenant_share")  # only idle ones go
    assert s.victim("A", lambda n: n.startswith("b")) is None  # A at its share, its own all busy: A waits
    assert s.victim("C", lambda n: n.startswith("b")) == ("b0", "lru")  # under its share: any idle one
    s.remove("a4")
    s.add("keep", "A")  # a pin is nobody's share and never goes
    assert s.held() == {"B": 3, "A": 4} and s.pinned() == ["keep"]
    assert s.victim("A", lambda n: n == "keep") is None
    solo = LoadedSet(capacity=2)
    solo.add("x")
    solo.add("y")
    solo.touch("x")
    assert solo.victim("", idle) == ("y", "lru") and list(solo) == ["y", "x"]


def test_one_tenants_flood_keeps_another_tenants_warm_adapters(tmp_path):
    """Tenant B keeps three adapters warm; tenant A then uses 60 distinct adapters one after another. With shares,
    B's three stay loaded (its next requests are hits); the plain LRU (one tenant for all) evicts them."""
    flood = [f"f{i}" for i in range(60)]
    root = folder_of(tmp_path, ["b0", "b1", "b2", *flood])

    def run(tenant_a: str, tenant_b: str) -> list[AdapterUsed]:
        adapters = Adapters(LORA, directory=root, capacity=8)
        for n in ("b0", "b1", "b2"):
            adapters.release(adapters.acquire(n, tenant=tenant_b))
        for n in flood:
            adapters.release(adapters.acquire(n, tenant=tenant_a))
        used: list[AdapterUsed] = []
        adapters.listen(lambda e: used.append(e) if isinstance(e, AdapterUsed) else None)
        for n in ("b0", "b1", "b2"):
            adapters.release(adapters.acquire(n, tenant=tenant_b))
        assert len(adapters.loaded()) == 8
        return used

    assert [u.cold for u in run("A", "B")] == [False, False, False]
    assert [u.cold for u in run("", "")] == [True, True, True]


def test_pins_stay_loaded_and_are_checked_at_start(tmp_path):
    root = folder_of(tmp_path, ["keep", "p-1", "p-2", *(f"x{i}" for i in range(12))])
    adapters = Adapters(LORA, directory=root, capacity=4, pins=("keep", "p-*"))
    assert adapters.load_pins() == ["keep", "p-1", "p-2"] and adapters.loaded() == ["keep", "p-1", "p-2"]
    for i in range(12):
        adapters.release(adapters.acquire(f"x{i}", tenant=f"t{i % 3}"))
    assert {"keep", "p-1", "p-2", "x11"} == set(adapters.loaded())
    held = adapters.acquire("x11")
    with pytest.raises(AdapterBusy, match="in use by running generations \\(or pinned\\)"):
        adapters.acquire("x0")
    adapters.release(held)
    with pytest.raises(AdapterNotFound, match="typo"):
        Adapters(LORA, directory=root, capacity=8, pins=("typo",)).load_pins()
    with pytest.raises(AdapterError, match="raise --max-loaded-adapters"):
        Adapters(LORA, directory=root, capacity=3, pins=("p-*", "keep")).load_pins()


def test_loads_uses_and_unloads_are_events_with_reasons(tmp_path):
    root = folder_of(tmp_path, ["a", "b", "c"])
    adapters = Adapters(LORA, directory=root, capacity=2)
    events = []
    adapters.listen(events.append)
    a = adapters.acquire("a", tenant="t")
    adapters.release(adapters.acquire("a", tenant="t"))
    loaded, cold, hit = events
    assert isinstance(loaded, AdapterLoaded) and loaded.cause == "request" and loaded.adapter is a
    assert loaded.seconds > 0 and loaded.loaded == 1 and loaded.loaded_bytes == a.nbytes > 0
    assert (cold.cold, hit.cold, hit.tenant) == (True, False, "t")
    adapters.release(adapters.acquire("b"))
    events.clear()
    adapters.release(adapters.acquire("c"))  # a is held: b, the idle one, goes
    assert [(type(e).__name__, e.adapter.name, getattr(e, "reason", None)) for e in events] == [
        ("AdapterUnloaded", "b", "lru"), ("AdapterLoaded", "c", None), ("AdapterUsed", "c", None)]
    events.clear()
    adapters.unregister("a")  # held: it goes when released, once
    assert events == []
    adapters.release(a)
    assert [(type(e), e.reason) for e in events] == [(AdapterUnloaded, "unregistered")]
    adapters.unregister("c")
    assert adapters.loaded_bytes() == 0 and events[-1].loaded == 0


# -- the registry ---------------------------------------------------------------------------------------------------
def test_allowed_url_prefixes_compare_parsed_urls():
    prefix = "https://models.example.com/adapters/"
    for url in ("https://models.example.com/adapters/a.onnx_adapter", "https://MODELS.example.com:443/adapters/x/y",
                "https://models.example.com/adapters/a.onnx_adapter?sig=1"):
        assert url_under(url, prefix), url
    for url in ("https://models.example.com/adaptersX/a.onnx_adapter", "http://models.example.com/adapters/a",
                "https://models.example.com@evil.test/adapters/a", "https://evil.test/models.example.com/adapters/a",
                "https://models.example.com/adapters/../secrets/a", "https://models.example.com/adapters/%2e%2e/a",
                "https://models.example.com:8443/adapters/a", "https://user:pw@models.example.com/adapters/a",
                "file:///adapters/a.onnx_adapter", "https://models.example.com/adapters\\..\\a"):
        assert not url_under(url, prefix), url
    assert url_under("s3://bucket/team/a.onnx_adapter", "s3://bucket/team")
    assert not url_under("s3://bucket/teammate/a.onnx_adapter", "s3://bucket/team")
    for bad in ("/srv/adapters", "https://u:p@host/x/", "https://host/x/?token=1", "ftp://host/x/"):
        with pytest.raises(AdapterError):
            check_prefix(bad)


def test_origins_replay_in_another_process_and_listing_costs_no_file_io(tmp_path, site, monkeypatch):
    root = folder_of(tmp_path, [f"a{i}" for i in range(300)])
    os.utime(root, (1e9, 1e9))  # changed long ago: its listing is trusted until its modification time changes
    site.put("/x.onnx_adapter", adapter_bytes(tmp_path, 2))
    ingress = AdapterRegistry(root, allow_urls=(site.url + "/",), cache=lambda: AdapterCache(tmp_path / "c1"))
    ingress.add_path("alias", ingress.resolve_path("a0.onnx_adapter"))
    ingress.check_allowed(site.url + "/x.onnx_adapter")
    ingress.add_url("remote", site.url + "/x.onnx_adapter")
    calls = []
    for fn in ("stat", "lstat", "scandir", "listdir"):
        real = getattr(os, fn)
        monkeypatch.setattr(os, fn, lambda *a, _real=real, _fn=fn, **k: (calls.append(_fn), _real(*a, **k))[1])
    names = ingress.names()
    infos = [ingress.info(n) for n in names]
    origins = {n: ingress.origin(n) for n in names}
    assert len(names) == 302 and len(calls) <= 2, calls  # the folder's own stat, not one per name
    monkeypatch.undo()
    assert infos[names.index("alias")].path == "a0.onnx_adapter" and origins["alias"] == Origin("path", "a0.onnx_adapter")
    assert origins["a3"] == Origin("source") and origins["remote"] == Origin("url", site.url + "/x.onnx_adapter")
    assert infos[names.index("remote")].url == site.url + "/x.onnx_adapter" and site.count() == 0

    replica = AdapterRegistry(root, cache=lambda: AdapterCache(tmp_path / "c2"))  # its own cache folder
    for name in ("alias", "remote", "a3"):
        replica.adopt(name, origins[name])
        assert replica.origin(name) == origins[name]
    with replica.locate("remote") as found, ingress.locate("alias") as alias:
        assert found.path.read_bytes() == adapter_bytes(tmp_path, 2) and str(tmp_path / "c2") in str(found.path)
        assert replica.locate("alias").path == alias.path
    ingress.remove("a3")
    assert "a3" not in ingress and "a3" not in ingress.names() and "a3" in replica


# -- URL adapters through Adapters --------------------------------------------------------------------------------
def url_adapters(tmp_path, site, **kw) -> Adapters:
    cache = AdapterCache(tmp_path / "cache", revalidate_s=0.0)  # every use asks the version: deterministic
    registry = AdapterRegistry(None, cache=cache, allow_urls=(site.url + "/a/",))
    return Adapters(LORA, registry=registry, revalidate_s=0.0, **kw)


def test_a_url_adapter_loads_once_per_version_and_survives_a_restart_from_its_cache(tmp_path, site):
    site.put("/a/u.onnx_adapter", adapter_bytes(tmp_path, 1))
    adapters = url_adapters(tmp_path, site)
    events = []
    adapters.listen(events.append)
    first = adapters.register_url("u", site.url + "/a/u.onnx_adapter")
    for _ in range(3):
        adapters.release(adapters.acquire("u"))
    assert site.count("GET") == 1 and adapters.get("u") is first
    assert adapters.info("u").url == site.url + "/a/u.onnx_adapter"

    site.put("/a/u.onnx_adapter", adapter_bytes(tmp_path, 2, rank=3))  # changed at the source: a new version
    second = adapters.acquire("u")
    assert second is not first and second.rank == 3 and site.count("GET") == 2
    assert [e.reason for e in events if isinstance(e, AdapterUnloaded)] == ["source_changed"]
    adapters.release(second)

    site.status["/a/u.onnx_adapter"] = 503  # the source goes down: the loaded version is served
    adapters.release(adapters.acquire("u"))
    adapters.registry.close()

    again = url_adapters(tmp_path, site)  # a restart: the registration again, the source still down
    assert again.register_url("u", site.url + "/a/u.onnx_adapter").rank == 3
    assert again.registry.cache().stats.downloads == 0 and again.registry.cache().stats.hits == 1


@pytest.mark.parametrize("case, error, why", [
    ("garbage", AdapterInvalid, "adapter 'x': .* not a valid .onnx_adapter"),
    ("misfit", AdapterInvalid, "adapter 'x' does not fit the model"),
    ("missing", AdapterNotFound, "does not exist"),
    ("down", AdapterUnavailable, "answered HTTP 503"),
    ("outside", AdapterInvalid, "not under a URL prefix this server allows"),
])
def test_a_url_that_fails_or_serves_garbage_is_refused_like_a_bad_file(tmp_path, site, case, error, why):
    from ortlora.adapters.onnx_adapter import write_onnx_adapter

    url = site.url + "/a/x.onnx_adapter"
    site.put("/a/x.onnx_adapter", adapter_bytes(tmp_path, 1))
    if case == "garbage":
        site.put("/a/x.onnx_adapter", b"<html>login</html>" * 20)
    elif case == "misfit":
        path = write_onnx_adapter(tmp_path / "m.onnx_adapter", {f"{A}.lora_A.weight": np.ones((9, 2), np.float32),
                                                               f"{A}.lora_B.weight": np.ones((2, 16), np.float32)})
        site.put("/a/x.onnx_adapter", path.read_bytes())
    elif case == "missing":
        url = site.url + "/a/nothing.onnx_adapter"
    elif case == "down":
        site.status["/a/x.onnx_adapter"] = 503
    elif case == "outside":
        url = site.url + "/b/x.onnx_adapter"
    adapters = url_adapters(tmp_path, site)
    with pytest.raises(error, match=why):
        adapters.register_url("x", url)
    assert "x" not in adapters and adapters.names() == [] and adapters.loaded() == []
    if case == "outside":
        assert site.count() == 0  # refused before any request
    site.put("/a/good.onnx_adapter", adapter_bytes(tmp_path, 1))
    assert adapters.register_url("x", site.url + "/a/good.onnx_adapter").rank == 2  # the name is free again


def test_a_requests_load_leaves_the_probe_to_its_first_step_and_the_verdict_is_remembered(tmp_path):
    """A load for a request skips the model's probe step (its first step is the probe): the version comes back
    unprobed until the batch reports it `passed`; loaded again after an eviction it is not probed again, and a new
    version is unprobed again. Loads a caller waits on (`get`) still probe. A version the first step `refuse`s is
    unloaded and refused by name without being read again, until its file changes."""
    root = folder_of(tmp_path, ["a", "b"])
    probed = []
    adapters = Adapters(LORA, directory=root, capacity=1, probe=lambda w: probed.append(1) or np.zeros(4, np.float32))
    a = adapters.acquire("a")
    assert a.unprobed and not probed
    adapters.passed(a)
    adapters.release(a)
    adapters.release(adapters.acquire("b"))  # evicts a (capacity 1)
    a = adapters.acquire("a")
    assert not a.unprobed and not probed  # the same version passed before
    adapters.release(a)
    assert not adapters.get("b").unprobed and len(probed) == 1  # a load the caller waits on is probed
    (root / "a.onnx_adapter").unlink()
    (root / "a.onnx_adapter").write_bytes(adapter_bytes(tmp_path, 5))
    a = adapters.acquire("a")
    assert a.unprobed and len(probed) == 1
    refusal = adapters.refuse(a)
    assert refusal.startswith("adapter 'a' makes the model's logits NaN") and adapters.refuse(a) == refusal
    assert "a" not in adapters.loaded()
    adapters.release(a)
    with pytest.raises(AdapterInvalid, match="'a' makes the model's logits NaN"):
        adapters.acquire("a")
    (root / "a.onnx_adapter").unlink()
    (root / "a.onnx_adapter").write_bytes(adapter_bytes(tmp_path, 6))
    adapters.release(adapters.acquire("a"))  # a new version is read again


def test_without_shares_the_loaded_set_is_one_plain_lru():
    """A Ray replica's loaded set mirrors its router's plain LRU (tenants do not change the choice)."""
    s = LoadedSet(capacity=4, shares=False)
    for n, t in (("b0", "B"), ("b1", "B"), ("a0", "A"), ("a1", "A")):
        s.add(n, t)
    assert s.victim("A", lambda n: True) == ("b0", "lru") and s.victim("B", lambda n: True) == ("b0", "lru")
