"""The HTTP layer: a FastAPI app with OpenAI's completion, chat and model endpoints, adapter management, health,
metrics and an OpenAPI document. It only validates, authenticates and translates; generation runs on the
scheduler's engine thread (`ortlora.serve.scheduler`), reached through thread-safe queues.

    app = create_app(server)          # server: ortlora.serve.server.Server
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ortlora.errors import AdapterError, OrtloraError
from ortlora.serve import protocol as P
from ortlora.serve.errors import APIError, BodyTooLarge, error_response, status_of, validation_message
from ortlora.serve.metrics import CONTENT_TYPE
from ortlora.serve.registry import AdapterNotFound
from ortlora.serve.scheduler import Event, Job
from ortlora.serve.tenants import Tenant

log = logging.getLogger("ortlora.serve")
_bearer = HTTPBearer(auto_error=False, description="API key (any, or none, when the server runs without --tenants)")
_ERRORS = {code: {"model": P.ErrorResponse, "description": text} for code, text in (
    (400, "invalid request"), (401, "missing or unknown API key"), (404, "no such model or adapter"),
    (413, "request body too large"), (429, "queue full: retry later"), (503, "shutting down"))}
# OpenAPI 3.1: an event stream's `schema` describes one event; each `data` is a JSON chunk, the last `[DONE]`
_SSE = {"content": {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"], "properties": {
        "data": {"type": "string", "description": "a JSON chunk (the response shape, with deltas), or [DONE]"},
        "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}}}},
        "description": "JSON, or server-sent events when `stream` is true"}


def create_app(server) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.start()
        yield
        await run_in_threadpool(server.stop)  # drain: queued and running requests finish first

    app = FastAPI(title="ortlora", version=server.version, summary="One model, many LoRA adapters: OpenAI API",
                  responses={k: v for k, v in _ERRORS.items() if k in (400, 401, 413)}, lifespan=lifespan)
    app.state.server = server
    _install_error_handlers(app)
    _install_middleware(app, server)

    def authenticate(creds: HTTPAuthorizationCredentials | None = Security(_bearer)) -> Tenant:
        tenant = server.tenants.authenticate(f"Bearer {creds.credentials}" if creds else None)
        if tenant is None:
            raise APIError(401, "missing or invalid API key (send Authorization: Bearer KEY)",
                           "authentication_error", code="invalid_api_key")
        return tenant

    def admin(tenant: Tenant = Depends(authenticate)) -> Tenant:
        if not tenant.admin:
            raise APIError(403, "this API key may not manage adapters or read metrics", "permission_error")
        return tenant

    # -- models ------------------------------------------------------------------------------------------------
    @app.get("/v1/models", response_model=P.ModelList, tags=["openai"])
    def list_models(tenant: Tenant = Depends(authenticate)) -> P.ModelList:
        server.registry.refresh()  # files dropped into the folder since: listed too
        cards = []
        if tenant.base_model:
            cards.append(P.ModelCard(id=server.model_name, created=server.created, owned_by="ortlora"))
        for name in server.registry.names():
            if tenant.may_use(name):
                cards.append(P.ModelCard(id=name, created=server.created, owned_by="ortlora",
                                         root=server.model_name, parent=server.model_name))
        return P.ModelList(data=cards)

    @app.get("/v1/models/{model}", response_model=P.ModelCard, tags=["openai"], responses={404: _ERRORS[404]})
    def get_model(model: str, tenant: Tenant = Depends(authenticate)) -> P.ModelCard:
        adapter = resolve(tenant, model)
        return P.ModelCard(id=model, created=server.created, owned_by="ortlora",
                           root=server.model_name if adapter else None, parent=server.model_name if adapter else None)

    def resolve(tenant: Tenant, model: str) -> str | None:
        """The adapter a request's `model` names (None = base); the same 404 whether missing or not permitted."""
        if model == server.model_name and tenant.base_model:
            return None
        if model != server.model_name and tenant.may_use(model) and model in server.registry:
            return model
        raise APIError(404, f"The model {model!r} does not exist", "invalid_request_error", param="model",
                       code="model_not_found")

    # -- generation ----------------------------------------------------------------------------------------------
    @app.post("/v1/completions", response_model=P.CompletionResponse, tags=["openai"],
              responses={200: _SSE, **{k: _ERRORS[k] for k in (404, 429, 503)}})
    async def completions(body: P.CompletionRequest, request: Request, tenant: Tenant = Depends(authenticate)):
        adapter = resolve(tenant, body.model)
        if body.best_of is not None and body.best_of != (body.n or 1):
            raise APIError(400, "best_of is supported only equal to n", param="best_of")
        prompts = _completion_prompts(server, body.prompt)
        default_max = 16 if body.max_tokens is None else body.max_tokens
        jobs = await _submit(server, request, body, adapter, prompts, default_max, explicit_max=True)
        echo = [server.tokenizer.decode(p) if body.echo else "" for p in prompts]
        if body.stream:
            return _stream(request, jobs, _completion_chunks(server, body, jobs, echo))
        return await _collect(request, jobs, lambda texts, reasons, usage: P.CompletionResponse(
            id=_id("cmpl"), created=int(time.time()), model=body.model, usage=usage,
            choices=[P.CompletionChoice(index=i, text=echo[i // (body.n or 1)] + texts[i], finish_reason=reasons[i])
                     for i in range(len(jobs))]))

    @app.post("/v1/chat/completions", response_model=P.ChatCompletionResponse, tags=["openai"],
              responses={200: _SSE, **{k: _ERRORS[k] for k in (404, 429, 503)}})
    async def chat_completions(body: P.ChatCompletionRequest, request: Request,
                               tenant: Tenant = Depends(authenticate)):
        adapter = resolve(tenant, body.model)
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()}
                    for m in body.messages]
        try:
            text = server.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except OrtloraError as exc:
            raise APIError(400, str(exc), param="messages") from None
        except Exception as exc:  # jinja2 TemplateError: the template refused these messages
            raise APIError(400, f"the model's chat template refused the messages: {exc}", param="messages") from None
        prompt = server.tokenizer.encode(text, add_special_tokens=False)
        explicit = body.max_completion_tokens or body.max_tokens
        jobs = await _submit(server, request, body, adapter, [prompt], explicit, explicit_max=explicit is not None)
        if body.stream:
            return _stream(request, jobs, _chat_chunks(server, body, jobs))
        return await _collect(request, jobs, lambda texts, reasons, usage: P.ChatCompletionResponse(
            id=_id("chatcmpl"), created=int(time.time()), model=body.model, usage=usage,
            choices=[P.ChatChoice(index=i, message=P.AssistantMessage(content=texts[i]), finish_reason=reasons[i])
                     for i in range(len(jobs))]))

    # -- adapters ------------------------------------------------------------------------------------------------
    upload_body = {"required": True, "content": {
        "application/json": {"schema": P.LoadAdapterRequest.model_json_schema()},
        "multipart/form-data": {"schema": {"type": "object", "required": ["name", "file"], "properties": {
            "name": P.LoadAdapterRequest.model_json_schema()["properties"]["name"],
            "file": {"type": "string", "format": "binary"}}}}}}

    @app.get("/v1/adapters", response_model=P.AdapterList, tags=["adapters"])
    def list_adapters(tenant: Tenant = Depends(authenticate)) -> P.AdapterList:
        server.registry.refresh()
        infos = []
        for name in server.registry.names():
            if tenant.may_use(name):
                try:
                    infos.append(server.adapter_info(name))
                except AdapterNotFound:  # its file went away (or now escapes the folder) since it was listed
                    pass
        return P.AdapterList(data=infos)

    @app.post("/v1/adapters", response_model=P.AdapterInfo, tags=["adapters"], openapi_extra={"requestBody": upload_body},
              responses={403: {"model": P.ErrorResponse, "description": "not an admin key"},
                         409: {"model": P.ErrorResponse, "description": "name taken"},
                         415: {"model": P.ErrorResponse, "description": "not JSON or multipart"}})
    async def load_adapter(request: Request, tenant: Tenant = Depends(admin)) -> P.AdapterInfo:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            try:
                spec = P.LoadAdapterRequest.model_validate_json(await request.body())
            except ValidationError as exc:
                raise APIError(400, validation_message(exc.errors())) from None
            await run_in_threadpool(server.add_adapter_path, spec.name, spec.path)
            return server.adapter_info(spec.name)
        if ctype == "multipart/form-data":
            async with request.form(max_files=1, max_fields=2) as form:
                name, upload = form.get("name"), form.get("file")
                if not isinstance(name, str) or upload is None or isinstance(upload, str):
                    raise APIError(400, "multipart upload needs a `name` field and a `file` part")
                await run_in_threadpool(server.add_adapter_upload, name, upload.file)
            return server.adapter_info(name)
        raise APIError(415, "send application/json {name, path} or multipart/form-data with name and file")

    @app.delete("/v1/adapters/{name}", tags=["adapters"], responses={404: _ERRORS[404]})
    def delete_adapter(name: str, tenant: Tenant = Depends(admin)) -> dict[str, Any]:
        if not tenant.may_use(name):
            raise AdapterNotFound(f"adapter {name!r} does not exist")
        server.remove_adapter(name)
        return {"name": name, "deleted": True}

    # -- operations ----------------------------------------------------------------------------------------------
    @app.get("/health", response_model=P.Health, tags=["operations"], responses={503: _ERRORS[503]})
    def health():
        s = server.scheduler
        body = P.Health(status="draining" if s.draining else "ok", model=server.model_name,
                        running=s.running_count, waiting=s.waiting_count)
        return JSONResponse(body.model_dump(), status_code=503 if s.draining else 200)

    @app.get("/metrics", tags=["operations"], response_class=PlainTextResponse,
             responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}},
                        401: {"model": P.ErrorResponse, "description": "missing or unknown API key",
                              "content": {"application/json": {}}},
                        403: {"model": P.ErrorResponse, "description": "not an admin key",
                              "content": {"application/json": {}}}})
    def metrics(tenant: Tenant = Depends(admin)):
        return PlainTextResponse(server.metrics.render(), media_type=CONTENT_TYPE)

    _trim_openapi(app)
    return app


# -- requests -> jobs --------------------------------------------------------------------------------------------
def _completion_prompts(server, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        prompts = [prompt]
    elif not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    elif isinstance(prompt[0], int):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    out = []
    for p in prompts:
        if isinstance(p, str):
            ids = server.tokenizer.encode(p)
        else:
            ids = list(p)
            bad = [t for t in ids if not 0 <= t < server.vocab_size]
            if bad:
                raise APIError(400, f"prompt token ids {bad[:5]} are outside the vocabulary [0, {server.vocab_size})",
                               param="prompt")
        if not ids:
            raise APIError(400, "prompt must not be empty (it encodes to no tokens)", param="prompt")
        out.append(ids)
    return out


async def _submit(server, request: Request, body, adapter: str | None, prompts: list[list[int]],
                  max_tokens: int | None, explicit_max: bool) -> list[Job]:
    ctx = server.context_length
    n = body.n or 1
    limits = []
    for ids in prompts:
        if len(ids) >= ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens; the prompt has {len(ids)} "
                                "tokens. Shorten the prompt.", param="prompt", code="context_length_exceeded")
        room = ctx - len(ids)
        if explicit_max and max_tokens is not None and max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} for the "
                                "completion). Reduce the prompt or max_tokens.", param="max_tokens",
                           code="context_length_exceeded")
        limits.append(min(max_tokens or room, room))
    if len(prompts) * n > server.max_choices:
        raise APIError(400, f"{len(prompts)} prompts x n={n} asks for {len(prompts) * n} choices; at most "
                            f"{server.max_choices} per request", param="n")
    try:
        params = [server.sampling_params(body, limit, None if body.seed is None else body.seed + j)
                  for limit in limits for j in range(n)]
    except OrtloraError as exc:
        raise APIError(400, str(exc)) from None
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()
    sink = lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev)  # noqa: E731 - called on the engine thread
    leases = []
    try:
        for _ in params:
            leases.append(await run_in_threadpool(server.acquire, adapter))
    except BaseException:
        for lease in leases:
            server.release(lease)
        raise
    arrival = time.monotonic()
    jobs = [Job(index=i, prompt_ids=prompts[i // n], adapter=leases[i], adapter_name=adapter, params=p, sink=sink,
                arrival=arrival) for i, p in enumerate(params)]
    for job in jobs:
        job.queue = queue
    try:
        server.scheduler.submit(jobs)  # QueueFull -> 429, ShuttingDown -> 503
    except BaseException:
        for lease in leases:
            server.release(lease)
        raise
    return jobs


async def _events(jobs: list[Job]) -> AsyncIterator[Event]:
    """Every job's events in arrival order, until each has finished."""
    queue, left = jobs[0].queue, len(jobs)
    while left:
        ev = await queue.get()
        if ev.error is not None:
            raise ev.error
        if ev.finish_reason is not None:
            left -= 1
        yield ev


async def _collect(request: Request, jobs: list[Job], build) -> Any:
    """Wait for all choices (cancelling them if the client goes away) and build the response body."""
    texts = [""] * len(jobs)
    reasons: list[str | None] = [None] * len(jobs)
    completion = 0

    async def consume():
        nonlocal completion
        async for ev in _events(jobs):
            texts[ev.index] += ev.text
            completion += ev.new_tokens
            if ev.finish_reason:
                reasons[ev.index] = ev.finish_reason

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not consumer.done():  # the client left: free the slots
            consumer.cancel()
            raise APIError(499, "client disconnected")
        consumer.result()
    finally:
        watcher.cancel()
        consumer.cancel()
        for job in jobs:
            job.cancel()
    return build(texts, reasons, _usage(jobs, completion))


def _usage(jobs: list[Job], completion: int) -> P.Usage:
    seen, prompt = set(), 0
    for job in jobs:  # a prompt counts once however many choices it has
        if id(job.prompt_ids) not in seen:
            seen.add(id(job.prompt_ids))
            prompt += len(job.prompt_ids)
    return P.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _stream(request: Request, jobs: list[Job], chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def body():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False, separators=(',', ':'))}\n\n"
            yield "data: [DONE]\n\n"
        except OrtloraError as exc:  # after the headers went out an error can only be an event
            yield f"data: {json.dumps(error_response(status_of(exc), str(exc), None)[1])}\n\n"
        finally:  # also on client disconnect (the response task is cancelled): frees the batch slots
            for job in jobs:
                job.cancel()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _completion_chunks(server, body: P.CompletionRequest, jobs: list[Job], echo: list[str]):
    rid, created, n = _id("cmpl"), int(time.time()), body.n or 1
    base = {"id": rid, "object": "text_completion", "created": created, "model": body.model}
    if body.echo:
        for i in range(len(jobs)):
            yield {**base, "choices": [{"index": i, "text": echo[i // n], "logprobs": None, "finish_reason": None}]}
    completion = 0
    async for ev in _events(jobs):  # one chunk per token, even when its text is held back (half a character)
        completion += ev.new_tokens
        yield {**base, "choices": [{"index": ev.index, "text": ev.text, "logprobs": None,
                                    "finish_reason": ev.finish_reason}]}
    if body.stream_options and body.stream_options.include_usage:
        yield {**base, "choices": [], "usage": _usage(jobs, completion).model_dump()}


async def _chat_chunks(server, body: P.ChatCompletionRequest, jobs: list[Job]):
    rid, created = _id("chatcmpl"), int(time.time())
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model}
    for i in range(len(jobs)):
        yield {**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}]}
    completion = 0
    async for ev in _events(jobs):
        completion += ev.new_tokens
        if ev.text:
            yield {**base, "choices": [{"index": ev.index, "delta": {"content": ev.text}, "logprobs": None,
                                        "finish_reason": None}]}
        if ev.finish_reason:
            yield {**base, "choices": [{"index": ev.index, "delta": {}, "logprobs": None,
                                        "finish_reason": ev.finish_reason}]}
    if body.stream_options and body.stream_options.include_usage:
        yield {**base, "choices": [], "usage": _usage(jobs, completion).model_dump()}


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# -- errors, limits, metrics ---------------------------------------------------------------------------------------
def _install_error_handlers(app: FastAPI) -> None:
    def respond(status: int, message: str, type_: str | None = None, param: str | None = None,
                code: str | None = None, headers: dict | None = None) -> JSONResponse:
        status, body = error_response(status, message, type_, param, code)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return respond(400, validation_message(exc.errors()))

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        if exc.status == 429:
            headers = {"Retry-After": "1"}
        return respond(exc.status, exc.message, exc.type, exc.param, exc.code, headers)

    @app.exception_handler(OrtloraError)
    async def _ortlora(request: Request, exc: OrtloraError):
        status = status_of(exc)
        return respond(status, str(exc), headers={"Retry-After": "1"} if status == 429 else None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return respond(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        # (Starlette re-raises after this answer, and uvicorn logs the traceback)
        return respond(500, f"internal error: {type(exc).__name__}", "server_error")


def _install_middleware(app: FastAPI, server) -> None:
    inner = app.build_middleware_stack

    def build():
        return _Outer(inner(), server.max_body_bytes, server.max_upload_bytes, server.metrics)

    app.build_middleware_stack = build


class _Outer:
    """Plain ASGI (it must not get in the way of streaming or disconnect detection): answers 413 to bodies over
    the limit (adapter uploads have their own), declared or streamed, and counts answers per route and status."""

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

    async def _limited(self, scope, receive, send) -> int:
        limit = self.upload_limit if scope["path"] == "/v1/adapters" else self.limit
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._reject(send, limit)
            return 413
        seen = 0
        started = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = message["status"]
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._reject(send, limit)
                return 413
        return started

    @staticmethod
    async def _reject(send, limit: int) -> None:
        status, body = error_response(413, f"request body larger than {limit} bytes", None)
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})


def _trim_openapi(app: FastAPI) -> None:
    """Validation failures answer 400 in OpenAI's error shape, not FastAPI's 422: say so in the document."""
    inner = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = inner()
            for path in schema.get("paths", {}).values():
                for op in path.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
