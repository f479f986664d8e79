"""The server's parts that need no model: tenants file, the adapters directory (confinement, versions, uploads),
Prometheus text, the scheduler's fair queue, CLI guard."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest

from ortlora.adapters.onnx_adapter import write_onnx_adapter
from ortlora.serve.metrics import Metrics
from ortlora.adapters.validate import LoraInput
from ortlora.errors import AdapterExists, AdapterInvalid, AdapterNotFound
from ortlora.runtime.adapters import Adapters
from ortlora.serve.tenants import ANONYMOUS, Tenants, TenantsError, hash_key


def _adapter(path, rank=2, width=8):
    rng = np.random.default_rng(0)
    return write_onnx_adapter(path, {"model.layers.0.self_attn.q_proj.lora_A.weight": rng.random((width, rank), np.float32),
                                     "model.layers.0.self_attn.q_proj.lora_B.weight": rng.random((rank, 8), np.float32)})


# -- tenants --------------------------------------------------------------------------------------------------------
def test_tenants_authenticate_by_key_hash_and_scope_adapters(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(f"""
[tenants.acme]
api_key_sha256 = ["{hash_key('k1')}", "sha256:{hash_key('k1-rotated').upper()}"]
adapters = ["acme-*", "shared"]
base_model = false
[tenants.ops]
api_key_sha256 = "{hash_key('root')}"
adapters = ["*"]
admin = true
""")
    t = Tenants.load(path)
    assert "k1" not in path.read_text()  # only hashes are stored
    acme = t.authenticate("Bearer k1")
    assert acme is t.authenticate("bearer  k1-rotated ") and acme.name == "acme"
    assert acme.may_use("acme-support") and acme.may_use("shared") and not acme.may_use("beta-x")
    assert not acme.may_use("acme") and not acme.base_model and not acme.admin
    assert t.authenticate("Bearer root").admin and t.authenticate("Bearer root").may_use("anything")
    for header in (None, "", "Bearer", "Bearer wrong", "Basic k1", "k1"):
        assert t.authenticate(header) is None
    assert Tenants.open().authenticate(None) is ANONYMOUS and Tenants.open().authenticate("Bearer x") is ANONYMOUS


def test_tenants_file_errors_list_every_problem(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(f"""
debug = true
[tenants.a]
api_key_sha256 = ["plain-text-key"]
adapters = "a1"
admin = "yes"
colour = "red"
[tenants.b]
adapters = ["b1"]
[tenants.c]
api_key_sha256 = ["{hash_key('same')}"]
[tenants.d]
api_key_sha256 = ["{hash_key('same')}"]
[tenants.e]
api_key_sha256 = ["{hash_key('e')}\\n"]
admin = true
""")
    with pytest.raises(TenantsError) as exc:
        Tenants.load(path)
    message = str(exc.value)
    for fragment in ("unknown top-level keys ['debug']", "'plain-text-key' is not a sha256", "adapters must be a list",
                     "admin must be true or false", "unknown keys ['colour']", "tenants.b: api_key_sha256 must list",
                     "also listed for tenant 'c'", "is not a sha256 hex digest",
                     'tenants.e: admin = true needs an adapters list', '(adapters = ["*"] for every adapter)'):
        assert fragment in message, fragment
    assert message.startswith(f"{path}: 9 problems")
    path.write_text("[tenants.a\n")
    with pytest.raises(TenantsError, match="not valid TOML"):
        Tenants.load(path)
    with pytest.raises(TenantsError, match="no such tenants file"):
        Tenants.load(tmp_path / "missing.toml")


# -- adapters directory (through the runtime's Adapters, its one owner) --------------------------------------------
Q = "model.layers.0.self_attn.q_proj"
LORA = {f"{Q}.lora_A.weight": LoraInput(f"{Q}.lora_A.weight", np.dtype(np.float32), (8, f"{Q}.lora_r")),
        f"{Q}.lora_B.weight": LoraInput(f"{Q}.lora_B.weight", np.dtype(np.float32), (f"{Q}.lora_r", 8))}


def test_directory_discovers_by_stem_and_confines_paths(tmp_path):
    root = tmp_path / "adapters"
    root.mkdir()
    _adapter(root / "acme-support.onnx_adapter")
    _adapter(root / "bad name!.onnx_adapter")
    outside = _adapter(tmp_path / "outside.onnx_adapter")
    (root / "escape.onnx_adapter").symlink_to(outside)
    (root / "inner-link.onnx_adapter").symlink_to(root / "acme-support.onnx_adapter")
    (root / "notes.txt").write_text("not an adapter")
    reg = Adapters(LORA, directory=root, reserved=("base",))
    assert reg.names() == ["acme-support", "inner-link"] and reg.loaded() == []  # listed, not opened
    assert sorted(s.split(":")[0] for s in reg.directory.skipped) == ["bad name!.onnx_adapter", "escape.onnx_adapter"]
    assert reg.info("acme-support").path == "acme-support.onnx_adapter"
    for name in ("escape", "../outside", "missing", "base"):
        with pytest.raises(AdapterNotFound):
            reg.acquire(name)
    for path in ("../outside.onnx_adapter", str(outside), "escape.onnx_adapter", "notes.txt", ".", "missing.x",
                 "a\x00b"):
        with pytest.raises(AdapterInvalid):
            reg.register("x", path)
    for name in ("../x", "a/b", "", ".x", "x.onnx_adapter", "x" * 129, None):
        with pytest.raises(AdapterInvalid):
            reg.register(name, "acme-support.onnx_adapter")
    with pytest.raises(AdapterExists):
        reg.register("base", "acme-support.onnx_adapter")
    assert reg.register("alias", "acme-support.onnx_adapter").rank == 2
    assert reg.loaded() == ["alias"] and reg.info("alias").path == "acme-support.onnx_adapter"

    _adapter(root / "late.onnx_adapter")  # dropped in after start-up: found on first use
    assert "late" in reg and reg.acquire("late").name == "late"
    reg.unregister("late")  # deleted through the API: the file stays and is not rediscovered
    assert "late" not in reg and (root / "late.onnx_adapter").exists()


def test_directory_removes_uploads_a_killed_server_left(tmp_path):
    """At start-up, half-written uploads older than a few minutes go; a fresh one (an upload of another process in
    progress) and everything else stay."""
    import os
    import time

    root = tmp_path / "adapters"
    root.mkdir()
    keep = _adapter(root / "keep.onnx_adapter")
    stale = root / ".up.onnx_adapter.abcd1234.tmp"
    stale.write_bytes(b"\x00" * 1000)
    old = time.time() - 3600
    os.utime(stale, (old, old))
    fresh = root / ".other.onnx_adapter.efgh5678.tmp"
    fresh.write_bytes(b"\x00" * 10)
    os.utime(keep, (old, old))
    reg = Adapters(LORA, directory=root)
    assert not stale.exists() and fresh.exists() and keep.exists()
    assert [p.name for p in reg.directory.removed] == [stale.name] and reg.names() == ["keep"]


def test_directory_holds_thousands_and_refreshes(tmp_path):
    import time

    root = tmp_path / "adapters"
    root.mkdir()
    one = _adapter(root / "a0.onnx_adapter")
    for i in range(1, 3000):
        (root / f"a{i}.onnx_adapter").symlink_to(one.name)  # relative, inside the folder
    t0 = time.perf_counter()
    reg = Adapters(LORA, directory=root)
    assert len(reg.names()) == 3000 and time.perf_counter() - t0 < 2.0  # files are listed, not opened
    reg.register("alias", "a0.onnx_adapter")
    (root / "a1.onnx_adapter").unlink()
    _adapter(root / "new.onnx_adapter")
    reg.unregister("a2")
    reg.refresh()
    names = set(reg.names())
    assert "new" in names and "alias" in names and "a1" not in names and "a2" not in names and len(names) == 3000


def test_upload_is_atomic_checked_and_bounded(tmp_path):
    root = tmp_path / "adapters"
    root.mkdir()
    reg = Adapters(LORA, directory=root)
    good = _adapter(tmp_path / "g.onnx_adapter").read_bytes()
    with pytest.raises(AdapterInvalid, match="exceeds the 100-byte limit"):
        reg.upload("big", io.BytesIO(good), max_bytes=100)
    with pytest.raises(AdapterInvalid, match="adapter 'junk' is not a valid .onnx_adapter"):
        reg.upload("junk", io.BytesIO(b"\x00" * 64), max_bytes=1 << 20)
    wrong = _adapter(tmp_path / "w.onnx_adapter", rank=2, width=9).read_bytes()
    with pytest.raises(AdapterInvalid, match="adapter 'wrong' does not fit the model"):
        reg.upload("wrong", io.BytesIO(wrong), max_bytes=1 << 20)
    assert list(root.iterdir()) == [] and reg.names() == []  # nothing half-written, names free again
    reg.upload("up", io.BytesIO(good), max_bytes=1 << 20)
    assert (root / "up.onnx_adapter").read_bytes() == good and reg.loaded() == ["up"]
    with pytest.raises(AdapterExists):
        reg.upload("up", io.BytesIO(good), max_bytes=1 << 20)
    held = reg.acquire("up")
    reg.unregister("up")
    assert not (root / "up.onnx_adapter").exists()  # uploaded through the API: deleted with it
    assert held.retired and held.params and "up" not in reg  # the holder keeps its private copy until it ends
    reg.release(held)
    with pytest.raises(AdapterInvalid, match="no adapters directory"):
        Adapters(LORA).upload("x", io.BytesIO(good), max_bytes=1 << 20)


def test_versions_refcounts_and_unload_callbacks(tmp_path):
    """Re-registering a name makes a new version; a holder of the old one keeps it until it releases it, and only
    then do the unload callbacks see it go (once)."""
    root = tmp_path / "adapters"
    root.mkdir()
    _adapter(root / "one.onnx_adapter", rank=2)
    _adapter(root / "two.onnx_adapter", rank=4)
    reg = Adapters(LORA, directory=root)
    gone = []
    reg.on_unload(gone.append)
    v1 = reg.acquire("one")
    reg.unregister("one")
    reg.register("one", "two.onnx_adapter")  # the name again, another file
    v2 = reg.acquire("one")
    assert v1 is not v2 and (v1.rank, v2.rank) == (2, 4) and gone == []
    reg.release(v1)
    assert gone == [v1]
    reg.release(v2)
    assert gone == [v1] and reg.loaded() == ["one"]


# -- metrics ----------------------------------------------------------------------------------------------------------
def test_metrics_render_prometheus_text():
    m = Metrics(max_batch=8)
    m.requests.inc(endpoint="/v1/completions", status="200")
    m.adapter_requests.inc(adapter='we"ird\nname')
    for size in (1, 3, 8):
        m.batch_size.observe(size)
    m.queue_depth.set(2)
    text = m.render()
    assert 'ortlora_requests_total{endpoint="/v1/completions",status="200"} 1' in text
    assert 'ortlora_adapter_requests_total{adapter="we\\"ird\\nname"} 1' in text
    assert 'ortlora_decode_batch_size_bucket{le="1"} 1' in text and 'ortlora_decode_batch_size_bucket{le="4"} 2' in text
    assert 'ortlora_decode_batch_size_bucket{le="+Inf"} 3' in text and "ortlora_decode_batch_size_sum 12" in text
    assert "ortlora_queue_depth 2" in text and "# TYPE ortlora_time_to_first_token_seconds histogram" in text
    sample = re.compile(r'^[a-z_]+(\{([a-z_]+="([^"\\]|\\.)*",?)+\})? -?[0-9.e+Inf-]+$')
    for line in text.splitlines():
        assert line.startswith("# ") or sample.match(line), line


def test_cli_refuses_an_open_server_on_a_public_address(tmp_path, capsys):
    from ortlora.cli import main

    assert main(["serve", "-m", str(tmp_path), "--host", "0.0.0.0"]) == 1
    assert "without --tenants" in capsys.readouterr().err
