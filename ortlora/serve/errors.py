"""Errors as OpenAI shapes them: `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status."""

from __future__ import annotations

from ortlora.errors import (AdapterBusy, AdapterError, AdapterExists, AdapterNotFound, GenerationError,
                            OrtloraError, QueueFull, ShuttingDown)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
          415: "invalid_request_error", 429: "rate_limit_error", 499: "invalid_request_error",
          503: "service_unavailable", 500: "server_error"}


class APIError(OrtloraError):
    """An HTTP error answer with OpenAI's error body."""

    def __init__(self, status: int, message: str, type_: str | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or _TYPES.get(status, "invalid_request_error")


class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"request body larger than {limit} bytes")
        self.limit = limit


def status_of(exc: BaseException) -> int:
    """The HTTP status for an ortlora error."""
    if isinstance(exc, APIError):
        return exc.status
    if isinstance(exc, (QueueFull, AdapterBusy)):
        return 429
    if isinstance(exc, ShuttingDown):
        return 503
    if isinstance(exc, AdapterNotFound):
        return 404
    if isinstance(exc, AdapterExists):
        return 409
    if isinstance(exc, GenerationError):  # the model (or an adapter's weights) failed, not the request
        return 500
    if isinstance(exc, (AdapterError, OrtloraError)):
        return 400
    return 500


def error_response(status: int, message: str, type_: str | None = None, param: str | None = None,
                   code: str | None = None) -> tuple[int, dict]:
    return status, {"error": {"message": message, "type": type_ or _TYPES.get(status, "invalid_request_error"),
                              "param": param, "code": code}}


def validation_message(errors) -> str:
    """pydantic's error list as one sentence per problem: `max_tokens: must be >= 1 (got -5)`."""
    parts = []
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        where = ".".join(loc) or "body"
        kind = err.get("type", "")
        if kind == "json_invalid":
            parts.append(f"the body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}")
        elif kind == "extra_forbidden":
            parts.append(f"{where}: unknown field")
        elif kind == "missing":
            parts.append(f"{where}: required field missing")
        else:
            got = err.get("input")
            shown = repr(got) if len(repr(got)) <= 60 else repr(got)[:57] + "..."
            parts.append(f"{where}: {err.get('msg')} (got {shown})")
    # a union field reports one error per branch: keep the first per location
    seen, unique = set(), []
    for p in parts:
        key = p.split(":", 1)[0]
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return "; ".join(unique) or "invalid request"
