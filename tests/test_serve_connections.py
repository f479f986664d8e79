"""`serve/connections.py` on both of uvicorn's HTTP protocols (httptools and h11), over real sockets to a uvicorn
server running a small ASGI app in a thread: head and body deadlines, and the connection limit (the longest-idle
connection closed to make room; past the limit, a few connections that answer only /health; past those, 503)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest

uvicorn = pytest.importorskip("uvicorn")

from ortlora.serve import connections as C  # noqa: E402


async def _app(scope, receive, send):
    """Reads the whole body, answers its length; /slow waits a second first (a request in progress)."""
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/slow":
        await asyncio.sleep(1.0)
    data = json.dumps({"path": scope["path"], "length": len(body)}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def _bases():
    from uvicorn.protocols.http.h11_impl import H11Protocol

    bases = [pytest.param(H11Protocol, id="h11")]
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
        bases.append(pytest.param(HttpToolsProtocol, id="httptools"))
    except ImportError:  # pragma: no cover - httptools not installed
        pass
    return bases


@pytest.fixture(params=_bases())
def served(request):
    """A uvicorn server on a free loopback port with the guard (max 4 connections, 0.5 s head and body deadlines)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    guard = C.Guard(C.ConnectionLimits(header_timeout=0.5, body_timeout=0.5, body_min_rate=1000, max_connections=4))
    config = uvicorn.Config(_app, host="127.0.0.1", port=port, lifespan="off", loop="asyncio", log_level="warning",
                            http=C.protocol_class(guard, request.param), timeout_keep_alive=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield port, guard
    server.should_exit = True
    thread.join(10)


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def _until_closed(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def _get(s: socket.socket, path: str) -> bytes:
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return s.recv(65536)


def test_deadlines_for_head_and_body(served):
    port, guard = served
    start = time.monotonic()
    assert _until_closed(_connect(port)) == b""  # never sent a byte: closed without a word
    assert 0.4 < time.monotonic() - start < 3
    s = _connect(port)
    s.sendall(b"GET / HTTP/1.1\r\nHost")
    assert _until_closed(s).startswith(b"HTTP/1.1 408 ")
    s = _connect(port)
    s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"x" * 10)
    out = _until_closed(s)
    assert out.startswith(b"HTTP/1.1 408 ") and b"request body did not arrive" in out
    s = _connect(port)  # 1500 bytes over ~0.9 s: above the minimum rate, longer than the body deadline
    s.sendall(b"POST /steady HTTP/1.1\r\nHost: x\r\nContent-Length: 1500\r\n\r\n")
    for _ in range(6):
        s.sendall(b"y" * 250)
        time.sleep(0.15)
    assert json.loads(s.recv(65536).split(b"\r\n\r\n", 1)[1]) == {"path": "/steady", "length": 1500}
    assert guard.timed_out == 2


def test_connection_limit_closes_the_longest_idle_then_reserves_health_then_refuses(served):
    port, guard = served
    idle = [_connect(port) for _ in range(4)]
    time.sleep(0.1)
    newer = _connect(port)  # at the limit: the longest-idle connection makes room
    assert _get(newer, "/x").startswith(b"HTTP/1.1 200 ")
    assert idle[0].recv(1) == b"" and guard.evicted >= 1
    for s in idle + [newer]:
        s.close()

    busy = []
    for _ in range(4):  # four requests in progress: nothing idle to close
        s = _connect(port)
        s.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        busy.append(s)
    time.sleep(0.2)
    reserve = _connect(port)
    reserve.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = _until_closed(reserve)  # /health still answers, then the connection ends
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'"/health", "length": 0}')
    other = _connect(port)
    other.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = _until_closed(other)
    assert answer.startswith(b"HTTP/1.1 503 ") and b"only /health" in answer
    extra = [_connect(port) for _ in range(C.HEALTH_RESERVE)]  # the reserve taken too: refused at once
    time.sleep(0.2)
    refused = _connect(port)
    assert _until_closed(refused).startswith(b"HTTP/1.1 503 ") and guard.refused >= 1
    for s in busy:
        assert s.recv(65536).startswith(b"HTTP/1.1 200 ")  # the requests in progress were left alone
    for s in busy + extra + [other]:
        s.close()
