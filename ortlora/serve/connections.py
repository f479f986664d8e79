"""Connections that cannot pile up: how long a client may take to send its request, and how many connections may be
open at once, with room kept for `/health`.

uvicorn bounds only the idle time between two requests (`timeout_keep_alive`): a connection that never sends a
byte, a request head sent a byte at a time or a body that stalls is kept for ever, each holding a file descriptor,
until the process has none left and even `/health` fails. This wraps uvicorn's HTTP protocol (h11's or
httptools', whichever it picks) with:

- a head deadline: a request's head (request line and headers) must arrive within `header_timeout` seconds of the
  connection opening, or of the previous response's end; otherwise 408 (nothing if not a byte came) and close;
- a body deadline: `body_timeout` seconds to start, extended by one second per `body_min_rate` bytes received (so
  a large upload at any reasonable speed never times out, and a trickle does); the clock stops while the app is not
  reading (flow control paused), since the client cannot send then; 408 and close;
- a connection limit: at `max_connections` a new connection first closes the longest-waiting idle one (no request
  in progress: keep-alive or a head not yet complete), else it is one of `HEALTH_RESERVE` extra connections that
  answer `/health` and 503 to everything else, else it gets 503 at once. `fit_descriptors` sizes the limit to the
  process's descriptor limit, keeping `FILE_RESERVE` descriptors for files (adapters, uploads, the model).

While the application handles a request (after its body) no deadline runs: generation takes as long as it takes,
and a client that leaves is noticed by the app (it cancels the request).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

log = logging.getLogger("ortlora.serve")
HEALTH_RESERVE = 8  # connections past the limit that may still ask /health (load balancers, orchestrators)
FILE_RESERVE = 64  # descriptors kept for everything but connections: adapter files, uploads, logs, the model
_HEAD, _BODY, _APP = "head", "body", "app"


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    body_min_rate: int = 1024  # bytes per second
    max_connections: int = 1024


def fit_descriptors(wanted: int) -> int:
    """The connection limit this process can honour: `wanted`, after raising the soft descriptor limit towards the
    hard one if it is too low for it, lowered (with a warning) if even the hard limit is. Keeps FILE_RESERVE
    descriptors for files and HEALTH_RESERVE for the reserve connections."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return wanted
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:  # pragma: no cover - no /proc
        in_use = 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = in_use + FILE_RESERVE + HEALTH_RESERVE + wanted
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return wanted
    fits = soft - in_use - FILE_RESERVE - HEALTH_RESERVE
    if fits < wanted:
        if fits < 1:
            from ortlora.errors import OrtloraError

            raise OrtloraError(f"the file descriptor limit ({soft}, ulimit -n) leaves no room for connections "
                               f"({in_use} descriptors are in use, {FILE_RESERVE + HEALTH_RESERVE} are kept)")
        log.warning("--max-connections lowered from %d to %d: the file descriptor limit (ulimit -n) is %d",
                    wanted, fits, soft)
        return fits
    return wanted


class Guard:
    """The server's open connections and its limits (one per server; uvicorn runs one event loop)."""

    def __init__(self, limits: ConnectionLimits):
        self.limits = limits
        self.open: set = set()  # guarded protocols, counted against max_connections
        self.reserve: set = set()  # connections past the limit: /health only
        self.refused = 0
        self.evicted = 0
        self.timed_out = 0

    def admit(self, conn) -> str:
        """'open', 'reserve' or 'refuse' for a new connection (evicting an idle one to make room if needed)."""
        if len(self.open) >= self.limits.max_connections:
            idle = [c for c in self.open if c._phase == _HEAD]
            if idle:
                victim = min(idle, key=lambda c: c._since)
                self.evicted += 1
                self.forget(victim)  # its descriptor goes with the close, now
                victim._close()
        if len(self.open) < self.limits.max_connections:
            self.open.add(conn)
            return "open"
        if len(self.reserve) < HEALTH_RESERVE:
            self.reserve.add(conn)
            return "reserve"
        self.refused += 1
        return "refuse"

    def forget(self, conn) -> None:
        self.open.discard(conn)
        self.reserve.discard(conn)


def protocol_class(guard: Guard, base: type | None = None) -> type:
    """uvicorn's HTTP protocol class (`base`, default the one uvicorn would pick) with `guard`'s limits."""
    if base is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol as base
    limits = guard.limits

    class Guarded(base):
        _phase = _HEAD
        _since = 0.0
        _timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head_bytes = 0
            self._body_bytes = 0
            self._enter(_HEAD)
            verdict = guard.admit(self)
            if verdict == "reserve":
                self.app = _health_only(self.app)
            elif verdict == "refuse":
                _write_status(transport, 503, "the server has too many open connections: retry shortly")
                self._close()

        def connection_lost(self, exc) -> None:
            guard.forget(self)
            self._cancel()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            before = self.cycle
            if self._phase == _HEAD:
                self._head_bytes += len(data)
            elif self._phase == _BODY:
                self._body_bytes += len(data)
            super().data_received(data)
            cycle = self.cycle
            if cycle is not before and cycle is not None and self._phase == _HEAD:  # a request head arrived
                self._body_bytes = 0
                self._enter(_BODY if cycle.more_body else _APP)
            if self._phase == _BODY and not (cycle.more_body and not cycle.response_complete):
                self._enter(_APP)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.transport.is_closing():
                return
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:  # a pipelined request, already read, started
                self._enter(_BODY if cycle.more_body else _APP)
            else:  # waiting for the next request
                self._head_bytes = 0
                self._enter(_HEAD)

        # -- deadlines -------------------------------------------------------------------------------------------
        def _enter(self, phase: str) -> None:
            self._phase, self._since = phase, time.monotonic()
            self._cancel()
            if phase == _HEAD:
                self._timer = self.loop.call_later(limits.header_timeout, self._head_late)
            elif phase == _BODY:
                self._timer = self.loop.call_later(limits.body_timeout, self._body_check)

        def _cancel(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _head_late(self) -> None:
            self._timer = None
            if self._phase != _HEAD or self.transport.is_closing():
                return
            if self._head_bytes:  # a request was begun: say why it ends (an idle connection just closes)
                guard.timed_out += 1
                _write_status(self.transport, 408, f"the request head did not arrive within "
                                                   f"{limits.header_timeout:g} s")
            self._close()

        def _body_check(self) -> None:
            self._timer = None
            if self._phase != _BODY or self.transport.is_closing():
                return
            now = time.monotonic()
            if self.flow.read_paused:  # the app is not reading: the client cannot send; the clock restarts
                self._since, self._body_bytes = now, 0
                self._timer = self.loop.call_later(limits.body_timeout, self._body_check)
                return
            deadline = self._since + limits.body_timeout + self._body_bytes / limits.body_min_rate
            if now < deadline:
                self._timer = self.loop.call_later(deadline - now, self._body_check)
                return
            guard.timed_out += 1
            cycle = self.cycle
            if cycle is not None and not cycle.response_started:
                _write_status(self.transport, 408, f"the request body did not arrive in time (at least "
                                                   f"{limits.body_min_rate} bytes/s after {limits.body_timeout:g} s)")
            self._close()

        def _close(self) -> None:
            """Close now; the app (if a request is in progress) sees the client gone and writes nothing more."""
            self._cancel()
            self._phase = _APP
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
            if not self.transport.is_closing():
                self.transport.close()

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{base.__name__}"
    return Guarded


def _write_status(transport, status: int, message: str) -> None:
    """A whole error answer written straight to the socket (outside any request cycle), then the connection ends."""
    import json

    from ortlora.serve.errors import error_response

    _, body = error_response(status, message)
    data = json.dumps(body).encode()
    reason = {408: b"Request Timeout", 503: b"Service Unavailable"}[status]
    transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                    b"connection: close\r\n\r\n%s" % (status, reason, len(data), data))


def _health_only(app):
    """The app as a reserve connection sees it: `/health` answered (then the connection closes), anything else 503."""
    async def reserved(scope, receive, send):
        if scope["type"] != "http" or scope.get("path") != "/health":
            import json

            from ortlora.serve.errors import error_response

            _, body = error_response(503, "the server has too many open connections: only /health is answered on "
                                          "this one; retry shortly", "service_unavailable")
            data = json.dumps(body).encode()
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                (b"connection", b"close"), (b"retry-after", b"1")]})
            await send({"type": "http.response.body", "body": data})
            return

        async def closing(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await app(scope, receive, closing)

    return reserved
