"""A hostile or careless client against a real server process (issue 26): an admin key that stays inside its
patterns, connections that cannot pile up (real sockets; a 256-descriptor limit), grammar memory one tenant cannot
grow, client mistakes that are 4xx (never 500), a removed adapters folder, a full disk, uploads a killed server
left half-written, names with a trailing newline, and error messages that never echo a megabyte back.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from serve_helpers import ADMIN, BETA, BOPS, ServerProcess, build_serve_setup

HEADER_S, BODY_S, MIN_RATE, KEEP_ALIVE_S = 1.0, 1.0, 2000, 1.0


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    return build_serve_setup(tiny, tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def server(setup):
    s = ServerProcess(setup["folder"], "--adapters", str(setup["adapters"]), "--tenants", str(setup["tenants"]),
                      "--header-timeout", str(HEADER_S), "--body-timeout", str(BODY_S), "--body-min-rate",
                      str(MIN_RATE), "--keep-alive-timeout", str(KEEP_ALIVE_S), log=setup["root"] / "server.log")
    yield s
    s.stop()


def _client(server, key=ADMIN, timeout: float = 60) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)


def _adapter_lines(server, key) -> list[str]:
    r = _client(server, key).get("/metrics")
    assert r.status_code == 200, r.text
    return [line for line in r.text.splitlines() if 'adapter="' in line]


# -- an admin stays inside its patterns ----------------------------------------------------------------------------
def test_scoped_admin_lists_runs_manages_and_sees_metrics_only_inside_its_patterns(server, setup):
    bops, admin, beta = _client(server, BOPS), _client(server), _client(server, BETA)
    data = (setup["adapters"] / "a1.onnx_adapter").read_bytes()
    body = {"model": "a1", "prompt": "The", "max_tokens": 2}
    assert admin.post("/v1/completions", json=body).status_code == 200  # a1 has a metrics series now

    assert [m["id"] for m in bops.get("/v1/models").json()["data"]] == ["base"]
    assert bops.get("/v1/adapters").json()["data"] == []
    missing = bops.post("/v1/completions", json={**body, "model": "no-such"})
    other = bops.post("/v1/completions", json=body)
    assert other.status_code == missing.status_code == 404
    assert other.json()["error"]["message"].replace("a1", "X") == missing.json()["error"]["message"].replace(
        "no-such", "X")  # another tenant's adapter looks exactly like a missing one
    assert bops.get("/v1/models/a1").status_code == 404

    # creating a name outside its patterns: 403 (whether it exists or not); deleting one: 404, as a missing one
    for r in (bops.post("/v1/adapters", data={"name": "a9"}, files={"file": ("x", data)}),
              bops.post("/v1/adapters", data={"name": "a1"}, files={"file": ("x", data)}),
              bops.post("/v1/adapters", json={"name": "a8", "path": "a1.onnx_adapter"}),
              bops.post("/v1/load_lora_adapter", json={"lora_name": "a7", "lora_path": "a1.onnx_adapter"})):
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error", r.text
    assert bops.delete("/v1/adapters/a3").status_code == 404
    assert bops.post("/v1/unload_lora_adapter", json={"lora_name": "a1"}).status_code == 404
    names = {a["name"] for a in admin.get("/v1/adapters").json()["data"]}
    assert {"a1", "a3"} <= names and not names & {"a7", "a8", "a9"}

    # inside its patterns it manages as any admin: the upload is run by beta, listed, in its metrics, deleted
    r = bops.post("/v1/adapters", data={"name": "b-ops"}, files={"file": ("x", data)})
    assert r.status_code == 200, r.text
    assert beta.post("/v1/completions", json={**body, "model": "b-ops"}).status_code == 200
    both = {**body, "adapters": [{"name": "a1", "weight": 1.0}, {"name": "b-ops", "weight": 1.0}]}
    assert admin.post("/v1/completions", json=both).status_code == 200
    assert [a["name"] for a in bops.get("/v1/adapters").json()["data"]] == ["b-ops"]
    seen = _adapter_lines(server, BOPS)
    assert any('adapter="b-ops"' in line for line in seen), seen
    assert not any("a1" in line for line in seen), seen  # neither a1's series nor the a1+b-ops combination's
    everything = _adapter_lines(server, ADMIN)
    assert any('adapter="a1"' in line for line in everything) and any("a1+b-ops" in line for line in everything)
    assert bops.delete("/v1/adapters/b-ops").status_code == 200


def test_metrics_filter_covers_rays_merged_exposition():
    """Ray's /metrics is every replica's exposition merged (a `replica` label first), plus the adapters each replica
    holds: the same filter leaves out every sample naming an adapter the key may not see, combinations included."""
    from ortlora.serve.metrics import Gauge, Metrics, filter_exposition
    from ortlora.serve.ray.client import merge_expositions

    m = Metrics()
    for label in ("a1", "b-1", "a1+b-1", "base"):
        m.adapter_requests.inc(adapter=label)
    for tenant in ("acme", "bops"):  # per-tenant series name tenants: a key sees its own only
        m.adapter_cache_hits.inc(tenant=tenant)
    held = Gauge("ortlora_replica_adapter_loaded", "adapters this replica holds in memory", ("adapter",))
    held.set(1, adapter="a1")
    held.set(1, adapter="b-1")
    replica = m.render() + "\n".join(held.render()) + "\n"
    merged = merge_expositions([("ingress", Metrics().render()), ("r1", replica), ("r2", replica)])
    seen = filter_exposition(merged, lambda name: name == "base" or name.startswith("b-"), "bops")
    named = [line for line in seen.splitlines() if 'adapter="' in line]
    assert len(named) == 6 and all('adapter="b-1"' in line or 'adapter="base"' in line for line in named), named
    tenants = [line for line in seen.splitlines() if 'tenant="' in line]
    assert len(tenants) == 2 and all('tenant="bops"' in line for line in tenants), tenants
    assert seen.count("# TYPE") == merged.count("# TYPE")  # totals and families stay
    assert 'tenant="acme"' in merged and filter_exposition(merged, lambda name: True, "acme").count('tenant="') == 2


def test_admin_table_without_adapters_is_a_load_error(setup, tmp_path):
    from ortlora.serve.tenants import hash_key

    tenants = tmp_path / "tenants.toml"
    tenants.write_text(f'[tenants.ops]\napi_key_sha256 = ["{hash_key("k")}"]\nadmin = true\n')
    run = subprocess.run([sys.executable, "-m", "ortlora.cli", "serve", "-m", str(setup["folder"]), "--tenants",
                          str(tenants)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    assert 'tenants.ops: admin = true needs an adapters list' in run.stderr and 'adapters = ["*"]' in run.stderr


# -- client mistakes are 4xx ------------------------------------------------------------------------------------------
def _chat(**kw) -> dict:
    return {"model": "a1", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **kw}


def _completion(**kw) -> dict:
    return {"model": "a1", "prompt": "The", "max_tokens": 2, **kw}


OVERFLOWING = {"anyOf": [{"type": "object", "properties": {f"k{i}": {"type": "integer"}}, "required": [f"k{i}"]}
                         for i in range(2100)]}  # compiles; its first token opens a parser row of 2100 items
MISTAKES = [
    ("superscript digit as a logit_bias key", "/v1/completions", _completion(logit_bias={"²": 1}), "logit_bias"),
    ("arabic digit as a logit_bias key", "/v1/chat/completions", _chat(logit_bias={"٣": 5}), "logit_bias"),
    ("5000-digit logit_bias key", "/v1/completions", _completion(logit_bias={"1" * 5000: 1}), "logit_bias"),
    ("lone surrogate in a chat message", "/v1/chat/completions",
     _chat(messages=[{"role": "user", "content": "a\ud800b"}]), "messages.[0].content"),
    ("lone surrogate in a stop string", "/v1/completions", _completion(stop=["\udfff"]), "stop.[0]"),
    ("lone surrogate in a key", "/v1/completions", _completion(metadata={"\ud800": "x"}), "metadata"),
    ("temperature as a string", "/v1/completions", _completion(temperature="0.5"), "temperature"),
    ("top_p as a string", "/v1/chat/completions", _chat(top_p="1"), "top_p"),
    ("presence_penalty as a boolean", "/v1/completions", _completion(presence_penalty=True), "presence_penalty"),
    ("adapter_scale as a string", "/v1/completions", _completion(adapter_scale="2"), "adapter_scale"),
    ("logit_bias value as a string", "/v1/completions", _completion(logit_bias={"5": "1"}), "logit_bias"),
    ("schema that overflows the parser at its first token", "/v1/chat/completions",
     _chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": OVERFLOWING}}),
     "response_format"),
]


@pytest.mark.parametrize("label,path,body,param", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_client_mistakes_are_400_naming_the_field(server, label, path, body, param):
    r = _client(server).post(path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and param in (error["param"] or "") + error["message"], error
    assert len(r.content) < 1000  # the 5000-digit key is not echoed back whole


def test_floats_accept_integers_and_numbers(server):
    r = _client(server).post("/v1/completions", json=_completion(temperature=1, top_p=1, presence_penalty=0,
                                                                   adapter_scale=1, logit_bias={"5": -1}))
    assert r.status_code == 200, r.text


def test_unknown_names_are_cut_in_messages(server):
    client, name = _client(server), "m" * 1_000_000
    for r in (client.post("/v1/completions", json=_completion(model=name)),
              client.post("/v1/chat/completions", json=_chat(model=name)),
              client.post("/v1/completions", json=_completion(adapters=[{"name": name}])),
              client.post("/v1/unload_lora_adapter", json={"lora_name": name}),
              client.get("/v1/models/" + name[:60_000]),
              client.delete("/v1/adapters/" + name[:60_000])):
        assert r.status_code == 404, r.text[:200]
        assert len(r.content) < 400 and "characters)" in r.json()["error"]["message"], r.text[:400]


def test_names_with_a_trailing_newline_are_refused(server, setup):
    admin = _client(server)
    data = (setup["adapters"] / "a1.onnx_adapter").read_bytes()
    for name in ("upper\n", "a1\n", "b-x\n"):
        r = admin.post("/v1/adapters", data={"name": name}, files={"file": ("x", data)})
        assert r.status_code == 400 and "invalid adapter name" in r.json()["error"]["message"], r.text
        assert admin.post("/v1/adapters", json={"name": name, "path": "a1.onnx_adapter"}).status_code == 400
    assert not [p for p in os.listdir(setup["adapters"]) if "\n" in p]


# -- connections ------------------------------------------------------------------------------------------------------
def _connect(server) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return s


def _read_until_closed(s: socket.socket, limit: float = 10.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    start, out = time.monotonic(), b""
    s.settimeout(limit)
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return out, time.monotonic() - start
        out += chunk


def _read_response(s: socket.socket) -> bytes:
    """One whole HTTP response (head and a Content-Length body), however TCP splits it."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        body += s.recv(65536)
    return head + b"\r\n\r\n" + body


def test_idle_and_slow_connections_are_closed_with_408(server):
    s = _connect(server)  # connects and never sends a byte: closed without a word
    out, took = _read_until_closed(s)
    assert out == b"" and HEADER_S * 0.9 <= took < HEADER_S + 3

    s = _connect(server)  # half a request head, then nothing
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    out, took = _read_until_closed(s)
    assert out.startswith(b"HTTP/1.1 408 ") and b"request head did not arrive" in out and took < HEADER_S + 3

    s = _connect(server)  # a whole head, then a trickle of body far under the minimum rate
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ADMIN.encode() +
            b"\r\nContent-Type: application/json\r\nContent-Length: 10000\r\n\r\n")
    s.sendall(head + b'{"model"')
    out, took = _read_until_closed(s)
    assert out.startswith(b"HTTP/1.1 408 ") and b"request body did not arrive" in out and took < BODY_S + 3, out

    # a body sent steadily above the minimum rate goes through, however long it takes in all
    body = b"{" + b" " * 3000 + json.dumps(_completion()).encode()[1:]  # 3 KB of JSON whitespace
    s = _connect(server)
    s.sendall(head.replace(b"10000", str(len(body)).encode()))
    for i in range(0, len(body), 500):  # 3 KB/s over ~1.2 s, longer than the body timeout
        s.sendall(body[i:i + 500])
        time.sleep(0.15)
    out = s.recv(65536)
    assert out.startswith(b"HTTP/1.1 200 "), out[:200]

    # after an answer, an idle keep-alive connection goes after the keep-alive timeout
    s.settimeout(10)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _read_response(s).startswith(b"HTTP/1.1 200 ")  # its body may come in a second segment
    out, took = _read_until_closed(s)
    assert out == b"" and took < KEEP_ALIVE_S + 3
    assert httpx.get(server.url + "/health").status_code == 200


def test_idle_sockets_past_the_descriptor_limit_leave_health_answering(setup, tmp_path):
    """300 idle connections to a server whose process may open 256 descriptors: before, the 256th connection took
    the last descriptor and /health went unanswered; now the server keeps the connections under a limit that fits
    (an idle one is closed to make room) and /health answers at once."""
    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    s = ServerProcess(setup["folder"], "--adapters", str(setup["adapters"]), "--header-timeout", "60",
                      log=tmp_path / "server.log", preexec_fn=limit)
    sockets = []
    try:
        for _ in range(300):
            sockets.append(_connect(s))
        time.sleep(0.5)
        assert len(os.listdir(f"/proc/{s.proc.pid}/fd")) < 256
        start = time.monotonic()
        r = httpx.get(s.url + "/health", timeout=5)
        assert r.status_code == 200 and time.monotonic() - start < 2
        r = httpx.post(s.url + "/v1/completions", json=_completion(), timeout=60)
        assert r.status_code == 200, r.text
        closed = 0
        for c in sockets:  # the oldest idle ones were closed to make room
            c.setblocking(False)
            try:
                closed += c.recv(1) == b""
            except BlockingIOError:
                pass
        assert closed >= 300 - 256
        assert "--max-connections lowered" in (tmp_path / "server.log").read_text()
    finally:
        for c in sockets:
            c.close()
        s.stop()


# -- grammar memory ----------------------------------------------------------------------------------------------------
def test_one_tenant_sending_distinct_large_schemas_stays_within_the_grammar_budget(setup, tmp_path):
    """Each schema is a 15 000-word enum (a ~240 000-character grammar, ~10 MB compiled): before, every distinct
    one stayed cached (256 of them), so 16 grew the server by ~160 MB. With a 32 MiB share per key, it holds two."""
    s = ServerProcess(setup["folder"], "--adapters", str(setup["adapters"]), "--tenants", str(setup["tenants"]),
                      "--grammar-cache-bytes", str(64 << 20), "--grammar-cache-tenant-bytes", str(32 << 20),
                      log=tmp_path / "server.log")
    rng = random.Random(0)
    client = _client(s, BETA)

    def ask(i: int, words: int = 15_000):
        enum = [f"s{i}-" + "".join(rng.choice("abcdefghij") for _ in range(10)) for _ in range(words)]
        schema = {"type": "object", "properties": {"v": {"enum": enum}}, "required": ["v"]}
        return client.post("/v1/chat/completions", json=_chat(model="a3", response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}))

    try:
        assert ask(-1).status_code == 200  # warm: the tokenizer's grammar tables, the allocator
        start = s.rss_mb()
        for i in range(16):
            r = ask(i)
            assert r.status_code == 200, r.text
        grown = s.rss_mb() - start
        print(f"RSS {start:.1f} MB, +{grown:.1f} MB after 16 distinct schemas")
        assert grown < 48, f"RSS grew by {grown:.1f} MB"
        too_big = ask(99, words=50_000)  # estimated past one key's share on its own
        assert too_big.status_code == 400 and "too large" in too_big.json()["error"]["message"], too_big.text
    finally:
        s.stop()


def test_grammar_cache_evicts_a_keys_own_grammars_first_and_never_a_held_one(setup):
    from ortlora.runtime import constraints as C
    from ortlora.runtime.grammar_cache import BASE_COST, GrammarBudget, GrammarCache, GrammarError
    from ortlora.runtime.tokenizer import Tokenizer

    tok = Tokenizer(setup["folder"])
    ll = C._TOKENIZERS.get(tok, tok.eos_ids)
    grammar = [C.json_schema_grammar({"type": "object", "properties": {f"k{i}": {"type": "integer"}}})
               for i in range(8)]
    each = GrammarCache.estimate(grammar[0])
    cache = GrammarCache(max_bytes=5 * each, tenant_bytes=3 * each)  # 5 in all, 3 per key
    for g in grammar[:3]:
        cache.hold(ll, g, "a").release()
    cache.hold(ll, grammar[3], "b").release()
    cache.hold(ll, grammar[4], "a").release()  # a is at its share: its own oldest goes, not b's
    assert cache.used("a") == 3 * each and cache.used("b") == each and len(cache) == 4
    held = cache.hold(ll, grammar[1], "a")  # in use by a running request
    cache.hold(ll, grammar[5], "a").release()
    with cache.hold(ll, grammar[1], "a") as proto:
        assert proto is held.prototype  # still cached: the eviction skipped it
    with cache.hold(ll, grammar[5], "a"), cache.hold(ll, grammar[6], "a"), pytest.raises(GrammarBudget):
        cache.hold(ll, grammar[7], "a")  # a's three all held
    held.release()
    cache.hold(ll, grammar[7], "a").release()
    assert cache.used("a") <= 3 * each and cache.total <= 5 * each
    with pytest.raises(GrammarError, match="too large"):
        GrammarCache(max_bytes=BASE_COST + 10, tenant_bytes=BASE_COST + 10).hold(ll, grammar[0], "a")


# -- the adapters folder goes away ---------------------------------------------------------------------------------
def _drop_dac_override():
    """(the server's child process, run as root) Without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH after exec, so that
    a folder's mode 000 holds for it as for any user."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 2):  # PR_CAPBSET_DROP = 24
            libc.prctl(24, cap, 0, 0, 0)


@pytest.fixture(scope="module")
def fragile(setup, tmp_path_factory):
    """A server of its own over a copy of the adapters folder, which its tests remove, replace and lock."""
    root = tmp_path_factory.mktemp("fragile")
    adapters = root / "adapters"
    shutil.copytree(setup["adapters"], adapters, symlinks=True)
    dead = adapters / ".b-dead.onnx_adapter.k3j5h2x9.tmp"  # what a server killed mid-upload leaves
    dead.write_bytes(b"\0" * 4096)
    os.utime(dead, (time.time() - 2, time.time() - 2))
    s = ServerProcess(setup["folder"], "--adapters", str(adapters), "--tenants", str(setup["tenants"]),
                      log=root / "server.log", preexec_fn=_drop_dac_override)
    yield dict(server=s, adapters=adapters, root=root, dead=dead)
    s.stop()


def test_listing_answers_when_the_adapters_folder_is_removed_replaced_or_unreadable(fragile):
    s, adapters = fragile["server"], fragile["adapters"]
    admin = _client(s)
    full = [m["id"] for m in admin.get("/v1/models").json()["data"]]
    assert {"base", "a1", "a2", "a3", "a4"} <= set(full)
    moved = adapters.with_name("adapters.moved")

    def broken(label):
        for path in ("/v1/models", "/v1/adapters"):
            r = admin.get(path)
            assert r.status_code == 200, (label, path, r.text)
        assert [m["id"] for m in admin.get("/v1/models").json()["data"]] == ["base"], label
        assert admin.get("/v1/adapters").json()["data"] == [], label
        assert admin.post("/v1/completions", json=_completion(model="a2")).status_code == 404, label
        assert admin.post("/v1/completions", json=_completion(model="base")).status_code == 200, label

    adapters.rename(moved)
    try:
        broken("removed")
        adapters.write_text("not a folder")
        broken("replaced by a file")
        adapters.unlink()
    finally:
        moved.rename(adapters)
    assert [m["id"] for m in admin.get("/v1/models").json()["data"]] == full
    adapters.chmod(0)
    try:
        broken("unreadable")
    finally:
        adapters.chmod(0o755)
    assert [m["id"] for m in admin.get("/v1/models").json()["data"]] == full


# -- uploads a dead server left half-written ----------------------------------------------------------------------
def test_start_up_removes_a_dead_servers_upload_and_a_sweep_removes_them_while_running(fragile):
    """A temporary only two seconds old, left by a killed server, is gone once the new one is up (before, it stayed
    for 5 minutes and nothing swept while running); a live upload's temporary (locked by its writer, here another
    process's) is kept while its writer holds it."""
    s, adapters = fragile["server"], fragile["adapters"]
    assert not fragile["dead"].exists()
    assert "left by an interrupted upload" in (fragile["root"] / "server.log").read_text()
    live = adapters / ".b-live.onnx_adapter.a8d7f6s5.tmp"
    dead = adapters / ".b-dead2.onnx_adapter.q1w2e3r4.tmp"
    two_seconds_ago = (time.time() - 2, time.time() - 2)
    with open(live, "wb", buffering=0) as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        held.write(b"\0" * 100)
        dead.write_bytes(b"\0" * 100)
        for path in (live, dead):
            os.utime(path, two_seconds_ago)
        assert _client(s).get("/v1/models").status_code == 200  # a listing sweeps
        assert live.exists() and not dead.exists()
    assert _client(s).get("/v1/models").status_code == 200
    assert not live.exists()  # its writer let go of it


def test_a_restart_right_after_sigkill_mid_upload_leaves_no_temporary(setup, tmp_path):
    adapters = tmp_path / "adapters"
    shutil.copytree(setup["adapters"], adapters, symlinks=True)
    args = ("--adapters", str(adapters), "--tenants", str(setup["tenants"]))
    s = ServerProcess(setup["folder"], *args, log=tmp_path / "first.log")
    seen: list[str] = []
    try:
        payload = os.urandom(1 << 20) * 96  # the copy into the folder takes long enough to be caught mid-way

        def upload():
            try:
                _client(s, timeout=120).post("/v1/adapters", data={"name": "b-big"}, files={"file": ("x", payload)})
            except httpx.TransportError:  # killed under it
                pass

        sender = threading.Thread(target=upload, daemon=True)
        sender.start()
        deadline = time.monotonic() + 60
        while not seen and time.monotonic() < deadline and sender.is_alive():
            seen = [n for n in os.listdir(adapters) if n.endswith(".tmp")]
            time.sleep(0.001)
        s.proc.send_signal(signal.SIGKILL)
        s.proc.wait(30)
        sender.join(30)
    finally:
        s.stop()
    assert seen, "the upload's temporary was never seen: it finished before the kill"
    assert [n for n in os.listdir(adapters) if n.endswith(".tmp")]  # the killed server's half-written upload
    restarted = ServerProcess(setup["folder"], *args, log=tmp_path / "second.log")
    try:
        assert not [n for n in os.listdir(adapters) if n.endswith(".tmp")]
        assert "b-big" not in {a["name"] for a in _client(restarted).get("/v1/adapters").json()["data"]}
    finally:
        restarted.stop()


# -- a full disk ----------------------------------------------------------------------------------------------------
def _mounts_tmpfs() -> bool:
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


def test_upload_into_a_full_filesystem_is_507_and_leaves_nothing(setup, tmp_path):
    """The adapters folder on a 1 MiB tmpfs (a private mount namespace: it vanishes with the server); without
    mount rights, a 1 MiB file size limit (RLIMIT_FSIZE, SIGXFSZ ignored: writes fail with EFBIG) instead."""
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    a1 = setup["adapters"] / "a1.onnx_adapter"
    prefix, preexec = (), None
    if shutil.which("unshare") and _mounts_tmpfs():
        script = 'mount -t tmpfs -o size=1m tmpfs "$0" && cp "$1" "$0"/ && shift && exec "$@"'
        prefix = ("unshare", "-m", "--propagation", "private", "sh", "-c", script, str(adapters), str(a1))
        view = lambda: Path(f"/proc/{s.proc.pid}/root") / str(adapters).lstrip("/")  # noqa: E731
    else:
        shutil.copy(a1, adapters)

        def preexec():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

        view = lambda: adapters  # noqa: E731
    s = ServerProcess(setup["folder"], "--adapters", str(adapters), "--tenants", str(setup["tenants"]),
                      log=tmp_path / "server.log", preexec_fn=preexec, prefix=prefix)
    try:
        admin = _client(s)
        r = admin.post("/v1/adapters", data={"name": "b-huge"}, files={"file": ("x", b"\0" * (3 << 20))})
        assert r.status_code == 507, r.text
        message = r.json()["error"]["message"]
        assert "no room in the adapters folder for adapter 'b-huge'" in message and "nothing was kept" in message
        assert sorted(os.listdir(view())) == ["a1.onnx_adapter"]  # no temporary left
        ok = admin.post("/v1/adapters", data={"name": "b-small"}, files={"file": ("x", a1.read_bytes())})
        assert ok.status_code == 200, ok.text
        assert _client(s, BETA).post("/v1/completions", json=_completion(model="b-small")).status_code == 200
    finally:
        s.stop()
