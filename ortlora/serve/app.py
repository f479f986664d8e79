"""The HTTP layer: a FastAPI app with OpenAI's completion, chat and model endpoints, adapter management, health,
metrics and an OpenAPI document. It only validates, authenticates and translates; generation runs on the
scheduler's engine thread (`ortlora.runtime.scheduler`), reached through thread-safe queues.

    app = create_app(server)          # server: ortlora.serve.server.Server
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import contextlib
import logging
import time

from fastapi import Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ortlora.errors import AdapterNotFound, OrtloraError
from ortlora.serve import jobs as jobs_
from ortlora.serve import openai_compat as compat
from ortlora.serve import playground
from ortlora.serve import protocol as P
from ortlora.serve.errors import APIError, error_response, status_of, validation_message
from ortlora.serve.metrics import CONTENT_TYPE
from ortlora.serve.middleware import Outermost
from ortlora.serve.server import AdapterChoice
from ortlora.serve.tenants import Tenant
from ortlora.serve.tools import ToolPlan, template_messages

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
        cards = []
        if tenant.base_model:
            cards.append(P.ModelCard(id=server.model_name, created=server.created, owned_by="ortlora"))
        for name in server.adapter_names():
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
        if tenant.may_use(model) and server.has_adapter(model):
            return model
        raise APIError(404, f"The model {model!r} does not exist", "invalid_request_error", param="model",
                       code="model_not_found")

    def choose(tenant: Tenant, body) -> "str | AdapterChoice | None":
        """The one place a generation request's adapter is decided: `model`, or the `adapters` combination, at
        `adapter_scale`; every name is checked against the tenant (404 alike whether missing or not permitted)."""
        adapter = resolve(tenant, body.model)
        if body.adapters is None and body.adapter_scale == 1.0:
            return adapter
        spec = adapter
        if body.adapters is not None:
            names = [a.name for a in body.adapters]
            if len(set(names)) != len(names):
                raise APIError(400, "adapters: each adapter may appear once", param="adapters")
            for name in names:
                if not (tenant.may_use(name) and server.has_adapter(name)):
                    raise APIError(404, f"The model {name!r} does not exist", "invalid_request_error",
                                   param="adapters", code="model_not_found")
            spec = {a.name: a.weight for a in body.adapters}
        return AdapterChoice(spec, body.adapter_scale) if spec is not None else None

    # -- generation ----------------------------------------------------------------------------------------------
    @app.post("/v1/completions", response_model=P.CompletionResponse, tags=["openai"],
              responses={200: _SSE, **{k: _ERRORS[k] for k in (404, 429, 503)}})
    async def completions(body: P.CompletionRequest, request: Request, tenant: Tenant = Depends(authenticate)):
        adapter = choose(tenant, body)
        compat.warn_ignored(body)
        if body.best_of is not None and body.best_of != (body.n or 1):
            raise APIError(400, "best_of is supported only equal to n", param="best_of")
        prompts = await run_in_threadpool(jobs_.completion_prompts, server, body.prompt)  # tokenizing: off the loop
        body._grammar = await run_in_threadpool(compat.grammar_of, server, body)
        default_max = 16 if body.max_tokens is None else body.max_tokens
        jobs = await jobs_.submit(server, body, adapter, prompts, default_max, explicit_max=True,
                                  tenant=tenant.name)
        texts = compat.token_text(server)
        echo = [server.tokenizer.decode(p) if body.echo else "" for p in prompts]
        if body.stream:  # the prompt's own logprobs come with each choice's first event (the engine's prefill)
            return await jobs_.stream(request, jobs, jobs_.completion_chunks(body, jobs, echo, texts, prompts))
        return await jobs_.collect(request, jobs, lambda outs, usage: compat.completion_response(
            jobs_.new_id("cmpl"), int(time.time()), body, outs, usage, echo, prompts, texts))

    @app.post("/v1/chat/completions", response_model=P.ChatCompletionResponse, tags=["openai"],
              responses={200: _SSE, **{k: _ERRORS[k] for k in (404, 429, 503)}})
    async def chat_completions(body: P.ChatCompletionRequest, request: Request,
                               tenant: Tenant = Depends(authenticate)):
        adapter = choose(tenant, body)
        compat.warn_ignored(body)
        plan = ToolPlan.of(body)
        prompt = await run_in_threadpool(jobs_.chat_prompt, server, template_messages(body), plan.tools)
        # a required or named tool call follows the functions' schemas, else response_format
        body._grammar = await run_in_threadpool(compat.grammar_of, server, body, plan.schema)
        explicit = body.max_completion_tokens or body.max_tokens
        jobs = await jobs_.submit(server, body, adapter, [prompt], explicit, explicit_max=explicit is not None,
                                  tenant=tenant.name)
        texts = compat.token_text(server)
        if body.stream:
            return await jobs_.stream(request, jobs, jobs_.chat_chunks(body, jobs, plan, texts))
        return await jobs_.collect(request, jobs, lambda outs, usage: compat.chat_response(
            jobs_.new_id("chatcmpl"), int(time.time()), body, outs, usage, plan, texts))

    # -- vLLM's adapter endpoints (aliases, so operators' tools work unchanged) ------------------------------
    @app.post("/v1/load_lora_adapter", tags=["adapters"], responses={
        403: {"model": P.ErrorResponse, "description": "not an admin key"},
        409: {"model": P.ErrorResponse, "description": "name taken"}})
    async def vllm_load(spec: P.VLLMLoadAdapter, tenant: Tenant = Depends(admin)) -> PlainTextResponse:
        await run_in_threadpool(server.add_adapter_path, spec.lora_name, spec.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{spec.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", tags=["adapters"], responses={404: _ERRORS[404]})
    def vllm_unload(spec: P.VLLMUnloadAdapter, tenant: Tenant = Depends(admin)) -> PlainTextResponse:
        if not tenant.may_use(spec.lora_name):
            raise AdapterNotFound(f"adapter {spec.lora_name!r} does not exist")
        server.remove_adapter(spec.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{spec.lora_name}' removed successfully.")

    # -- adapters ------------------------------------------------------------------------------------------------
    upload_body = {"required": True, "content": {
        "application/json": {"schema": P.LoadAdapterRequest.model_json_schema()},
        "multipart/form-data": {"schema": {"type": "object", "required": ["name", "file"], "properties": {
            "name": P.LoadAdapterRequest.model_json_schema()["properties"]["name"],
            "file": {"type": "string", "format": "binary"}}}}}}

    @app.get("/v1/adapters", response_model=P.AdapterList, tags=["adapters"])
    def list_adapters(tenant: Tenant = Depends(authenticate)) -> P.AdapterList:
        infos = []
        for name in server.adapter_names():
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
    def delete_adapter(name: str, tenant: Tenant = Depends(admin)) -> dict[str, object]:
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

    playground.install(app)
    _trim_openapi(app)
    return app


# -- errors, limits, metrics ---------------------------------------------------------------------------------------
def _install_middleware(app: FastAPI, server) -> None:
    inner = app.build_middleware_stack
    app.build_middleware_stack = lambda: Outermost(inner(), server.max_body_bytes, server.max_upload_bytes,
                                                   server.metrics)


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
