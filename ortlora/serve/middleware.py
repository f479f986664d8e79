"""The outermost ASGI layer, plain ASGI so it never gets in the way of streaming or disconnect detection:
request-body limits (413 before the app reads a byte when the size is declared) and per-route request counts."""

from __future__ import annotations

import json

from ortlora.serve.errors import BodyTooLarge, error_response


CONTROL_LIMIT = 64 << 10  # a JSON request that manages adapters is a name and a path


class Outermost:
    """Answers 413 to bodies over the limit, declared (before the app reads a byte) or streamed/chunked (as soon
    as the count passes it: the app then sees the client gone and its own answer is dropped), and counts answers
    per route and status. Adapter uploads (multipart) have their own limit; JSON adapter requests a small one."""

    def __init__(self, app, limit: int, upload_limit: int, metrics):
        self.app, self.limit, self.upload_limit, self.metrics = app, limit, upload_limit, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 0
        try:
            status = await self._limited(scope, receive, send)
        finally:
            route = getattr(scope.get("route"), "path", "other")
            self.metrics.requests.inc(endpoint=route, status=str(status or 500))

    def _limit(self, scope) -> int:
        headers = dict(scope.get("headers") or [])
        if scope["path"] == "/v1/adapters" and scope.get("method") == "POST":
            multipart = headers.get(b"content-type", b"").lower().startswith(b"multipart/")
            return self.upload_limit if multipart else min(self.limit, CONTROL_LIMIT)
        return self.limit

    async def _limited(self, scope, receive, send) -> int:
        limit = self._limit(scope)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._reject(send, limit)
            return 413
        seen = 0
        started = 0
        rejected = False

        async def counting_receive():
            nonlocal seen, rejected, started
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    if started:  # the answer is under way (a streamed upload read late): nothing else to say
                        raise BodyTooLarge(limit)
                    rejected = True
                    started = 413
                    await self._reject(send, limit)
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message):
            nonlocal started
            if rejected:
                return  # the client has its 413: whatever the app says after is dropped
            if message["type"] == "http.response.start":
                started = message["status"]
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._reject(send, limit)
                return 413
        except Exception:
            if not rejected:
                raise
        return started

    @staticmethod
    async def _reject(send, limit: int) -> None:
        status, body = error_response(413, f"request body larger than {limit} bytes", None)
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})
