"""Errors as OpenAI shapes them: `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status."""

from __future__ import annotations

import errno

from ortlora.errors import (AdapterBusy, AdapterError, AdapterExists, AdapterNotFound, AdapterUnavailable,  # noqa: F401
                            GenerationError, OrtloraError, QueueFull, ShuttingDown, StorageFull)
from ortlora.runtime.grammar_cache import GrammarBudget

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
          415: "invalid_request_error", 429: "rate_limit_error", 499: "invalid_request_error",
          503: "service_unavailable", 500: "server_error", 507: "server_error"}
MAX_MESSAGE = 2000  # characters of an error message: a client's megabyte of input is never echoed back whole
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class APIError(OrtloraError):
    """An HTTP error answer with OpenAI's error body."""

    def __init__(self, status: int, message: str, type_: str | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or _TYPES.get(status, "invalid_request_error")


class FieldError(ValueError):
    """A request model's cross-field check that fails on one field: pydantic keeps the exception (its error's
    `ctx.error`), so the 400 names `param` although a model validator's error has no location."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"request body larger than {limit} bytes")
        self.limit = limit


def shorten(text: str, limit: int = 64) -> str:
    """`text` as a message shows a client's value: repr'd, cut to about `limit` characters."""
    shown = repr(text)
    return shown if len(shown) <= limit else f"{shown[:limit]}... ({len(text)} characters)"


def status_of(exc: BaseException) -> int:
    """The HTTP status for an ortlora error (and for a full disk)."""
    if isinstance(exc, APIError):
        return exc.status
    if isinstance(exc, StorageFull) or (isinstance(exc, OSError) and exc.errno in NO_SPACE):
        return 507
    if isinstance(exc, (QueueFull, AdapterBusy, GrammarBudget)):
        return 429
    if isinstance(exc, (ShuttingDown, AdapterUnavailable)):  # an adapter's source did not answer: retry later
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
    if len(message) > MAX_MESSAGE:
        message = f"{message[:MAX_MESSAGE]}... ({len(message) - MAX_MESSAGE} more characters)"
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # a client's lone surrogate, escaped
    return status, {"error": {"message": message, "type": type_ or _TYPES.get(status, "invalid_request_error"),
                              "param": param, "code": code}}


_TYPE_TAGS = {"str", "int", "float", "bool", "bytes", "list", "dict", "tuple", "set", "none", "constrained-str",
              "constrained-int", "constrained-float", "literal", "is-instance", "any"}


def _is_branch(part) -> bool:
    """pydantic names the branch of a union it tried in an error's location (`str`, `list[TextPart]`,
    `function-after[...]`): not a field."""
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or "(" in part)


def _where(err) -> tuple:
    return tuple(p for p in err.get("loc", ()) if p != "body" and not _is_branch(p))


def _relevant(errors) -> list:
    """A union reports every branch's failure: where one branch failed deeper inside the value (an item of the
    list), the others' "not a string" at the value itself is noise."""
    places = [_where(e) for e in errors]
    return [e for e, w in zip(errors, places) if not any(len(o) > len(w) and o[:len(w)] == w for o in places)]


def validation_param(errors) -> str | None:
    """The failing field's path as OpenAI writes `param` (`messages.[2].content`) for the first problem; a model
    validator's FieldError names its own."""
    for err in _relevant(errors):
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, FieldError):
            return cause.param
        parts = _where(err)
        if parts:
            return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in parts)
    return None


def validation_error(errors) -> APIError:
    """pydantic's errors as one 400: every problem in the message, the first one's field as `param`."""
    return APIError(400, validation_message(errors), param=validation_param(errors))


def validation_message(errors) -> str:
    """pydantic's error list as one sentence per problem: `max_tokens: must be >= 1 (got -5)`."""
    parts = []
    for err in _relevant(errors):
        loc = [str(x) for x in _where(err)]
        where = ".".join(loc) or "body"
        kind = err.get("type", "")
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, FieldError):  # a cross-field check: its own words, not the whole body back
            parts.append(f"{cause.param}: {cause}")
        elif kind == "json_invalid":
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
