"""The HTTP layer: a FastAPI app with OpenAI's completion, chat, Responses and model endpoints, vLLM's tokenizer
endpoints, adapter management, health, metrics and an OpenAPI document. It only authenticates, validates and
translates (`translate.py`, `responses.py`); the work runs behind an `EngineClient` (`engine_client.py`): this
process's engine thread, or Ray engine replicas.

    app = create_app(LocalEngine(config), config)
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
from ortlora.runtime.sources import is_url
from ortlora.serve import openai_compat as compat
from ortlora.serve import playground
from ortlora.serve import protocol as P
from ortlora.serve import responses
from ortlora.serve import responses_protocol as R
from ortlora.serve import streaming
from ortlora.serve import tokenize as TK
from ortlora.serve import translate as T
from ortlora.serve.config import ServeConfig
from ortlora.serve.engine_client import AdapterChoice, EngineClient
from ortlora.serve.errors import APIError, error_response, shorten, status_of, validation_error
from ortlora.serve.metrics import CONTENT_TYPE, filter_exposition
from ortlora.serve.middleware import Outermost
from ortlora.serve.reasoning import get_parser
from ortlora.serve.tenants import Tenant, Tenants

log = logging.getLogger("ortlora.serve")
_bearer = HTTPBearer(auto_error=False, description="API key (any, or none, when the server runs without --tenants)")
_ERRORS = {code: {"model": P.ErrorResponse, "description": text} for code, text in (
    (400, "invalid request"), (401, "missing or unknown API key"), (404, "no such model or adapter"),
    (413, "request body too large"), (429, "queue full: retry later"),
    (503, "shutting down, or an adapter's source did not answer"), (507, "no disk space left for the upload"))}
_TEXT = {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "a sentence, as vLLM answers"}
# OpenAPI 3.1: an event stream's `schema` describes one event; each `data` is a JSON chunk, the last `[DONE]`
_SSE = {"content": {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"], "properties": {
        "data": {"type": "string", "description": "a JSON chunk (the response shape, with deltas), or [DONE]"},
        "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}}}},
        "description": "JSON, or server-sent events when `stream` is true"}
# the Responses API streams typed events: `event: TYPE` and `data: {the event}`, no [DONE]
_RESPONSE_EVENTS = {"content": {"text/event-stream": {"schema": {
    "type": "object", "required": ["event", "data"], "properties": {
        "event": {"type": "string", "description": "the event's type, e.g. response.output_text.delta"},
        "data": {"type": "string", "description": "the event as JSON (a ResponseStreamEvent)"}}}}},
    "description": "the Response, or server-sent events when `stream` is true"}


def create_app(engine: EngineClient, config: ServeConfig, tenants: Tenants | None = None) -> FastAPI:
    """The API over `engine`; `tenants` default: config.tenants' file, or open (any key) without one."""
    if tenants is None:
        tenants = Tenants.load(config.tenants) if config.tenants else Tenants.open()
    from ortlora.runtime import constraints

    constraints.GRAMMARS.configure(config.grammar_cache_bytes, config.grammar_cache_tenant_bytes)  # this process's
    limits, tokenizer = engine.limits, engine.tokenizer
    plain, as_ids = compat.TokenText(tokenizer), compat.TokenText(tokenizer, as_ids=True)
    parser = get_parser(config.reasoning_parser, tokenizer) if config.reasoning_parser else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await run_in_threadpool(engine.stop)  # drain: queued and running requests finish first

    app = FastAPI(title="ortlora", version=limits.version, summary="One model, many LoRA adapters: OpenAI API",
                  responses={k: v for k, v in _ERRORS.items() if k in (400, 401, 413)}, lifespan=lifespan)
    app.state.engine = engine
    _install_error_handlers(app)
    _install_middleware(app, config, engine.metrics)

    def authenticate(creds: HTTPAuthorizationCredentials | None = Security(_bearer)) -> Tenant:
        tenant = tenants.authenticate(f"Bearer {creds.credentials}" if creds else None)
        if tenant is None:
            raise APIError(401, "missing or invalid API key (send Authorization: Bearer KEY)",
                           "authentication_error", code="invalid_api_key")
        return tenant

    def admin(tenant: Tenant = Depends(authenticate)) -> Tenant:
        if not tenant.admin:
            raise APIError(403, "this API key may not manage adapters or read metrics", "permission_error")
        return tenant

    def may_create(tenant: Tenant, name: object) -> None:
        """An admin creates only names its patterns match (a 403 that says nothing about whether the name exists)."""
        if isinstance(name, str) and not tenant.may_use(name):
            raise APIError(403, f"this API key may not manage an adapter named {shorten(name)}: only names that "
                                f"its tenant's adapters patterns match", "permission_error")

    def not_found(name: str, param: str | None = "model") -> APIError:
        return APIError(404, f"The model {shorten(name)} does not exist", "invalid_request_error", param=param,
                        code="model_not_found")

    # -- models ------------------------------------------------------------------------------------------------
    @app.get("/v1/models", response_model=P.ModelList, tags=["openai"])
    def list_models(tenant: Tenant = Depends(authenticate)) -> P.ModelList:
        cards = []
        if tenant.base_model:
            cards.append(P.ModelCard(id=limits.model_name, created=limits.created, owned_by="ortlora"))
        for name in engine.adapter_names():
            if tenant.may_use(name):
                cards.append(P.ModelCard(id=name, created=limits.created, owned_by="ortlora",
                                         root=limits.model_name, parent=limits.model_name))
        return P.ModelList(data=cards)

    @app.get("/v1/models/{model}", response_model=P.ModelCard, tags=["openai"], responses={404: _ERRORS[404]})
    def get_model(model: str, tenant: Tenant = Depends(authenticate)) -> P.ModelCard:
        adapter = resolve(tenant, model)
        return P.ModelCard(id=model, created=limits.created, owned_by="ortlora",
                           root=limits.model_name if adapter else None, parent=limits.model_name if adapter else None)

    def resolve(tenant: Tenant, model: str) -> str | None:
        """The adapter a request's `model` names (None = base); the same 404 whether missing or not permitted."""
        if model == limits.model_name and tenant.base_model:
            return None
        if tenant.may_use(model) and engine.has_adapter(model):
            return model
        raise not_found(model)

    def choose(tenant: Tenant, body) -> AdapterChoice | None:
        """The one place a generation request's adapter is decided: `model`, or the `adapters` combination, at
        `adapter_scale`; every name is checked against the tenant (404 alike whether missing or not permitted)."""
        spec = resolve(tenant, body.model)
        if body.adapters is not None:
            names = [a.name for a in body.adapters]
            if len(set(names)) != len(names):
                raise APIError(400, "adapters: each adapter may appear once", param="adapters")
            for name in names:
                if not (tenant.may_use(name) and engine.has_adapter(name)):
                    raise not_found(name, "adapters")
            spec = {a.name: a.weight for a in body.adapters}
        return AdapterChoice(spec, body.adapter_scale) if spec is not None else None

    def work(body, tenant: Tenant, prompts, max_tokens, *, explicit_max: bool, adapter, grammar=None,
             prompt_logprobs=None, grammar_after=None):
        return T.build_work(body, limits, prompts, max_tokens, explicit_max=explicit_max, adapter=adapter,
                            tenant=tenant.name, cache_namespace=tenants.cache_namespace(tenant.name),
                            grammar=grammar, prompt_logprobs=prompt_logprobs, grammar_after=grammar_after)

    def token_text(body) -> compat.TokenText:
        return as_ids if body.return_tokens_as_token_ids else plain

    async def submit_chat(body: P.ChatCompletionRequest, tenant: Tenant, stream: bool):
        """Chat's way to the engine (the Responses API comes this way too): the template rendered with the request's
        options, tools, the grammar (after the reasoning, with --reasoning-parser) and the adapter choice."""
        adapter = choose(tenant, body)
        chat = await run_in_threadpool(T.chat_inputs, limits, tokenizer, body, parser, tenant.name)  # off the loop
        explicit = body.max_completion_tokens or body.max_tokens
        jobs = await engine.submit(work(body, tenant, [chat.prompt], explicit, explicit_max=explicit is not None,
                                        adapter=adapter, grammar=chat.grammar, grammar_after=chat.grammar_after,
                                        prompt_logprobs=body.prompt_logprobs), incremental=stream)
        return chat, jobs

    # -- generation ----------------------------------------------------------------------------------------------
    @app.post("/v1/completions", response_model=P.CompletionResponse, tags=["openai"],
              responses={200: _SSE, **{k: _ERRORS[k] for k in (404, 429, 503)}})
    async def completions(body: P.CompletionRequest, request: Request, tenant: Tenant = Depends(authenticate)):
        adapter = choose(tenant, body)
        compat.warn_ignored(body)
        if body.best_of is not None and body.best_of != (body.n or 1):
            raise APIError(400, "best_of is supported only equal to n", param="best_of")
        prompts = await run_in_threadpool(T.completion_prompts, limits, tokenizer, body.prompt)  # off the loop
        grammar = await run_in_threadpool(T.output_grammar, tokenizer, limits.eos_ids, body, None,
                                          tenant.name)
        # the prompt's own logprobs, from one scoring: echo's (k = logprobs) and prompt_logprobs' (its k)
        wanted = [k for k in (body.logprobs if body.echo else None, body.prompt_logprobs) if k is not None]
        jobs = await engine.submit(work(body, tenant, prompts, 16 if body.max_tokens is None else body.max_tokens,
                                        explicit_max=True, adapter=adapter, grammar=grammar,
                                        prompt_logprobs=max(wanted) if wanted else None),
                                   incremental=bool(body.stream))
        echo = [tokenizer.decode(p) if body.echo else "" for p in prompts]
        texts = token_text(body)
        if body.stream:
            return await streaming.stream(request, jobs, streaming.completion_chunks(body, jobs, echo, texts))
        return await streaming.collect(request, jobs, lambda outs, usage: compat.completion_response(
            streaming.new_id("cmpl"), int(time.time()), body, outs, usage, echo, prompts, texts))

    @app.post("/v1/chat/completions", response_model=P.ChatCompletionResponse, tags=["openai"],
              responses={200: _SSE, **{k: _ERRORS[k] for k in (404, 429, 503)}})
    async def chat_completions(body: P.ChatCompletionRequest, request: Request,
                               tenant: Tenant = Depends(authenticate)):
        compat.warn_ignored(body)
        chat, jobs = await submit_chat(body, tenant, bool(body.stream))
        texts = token_text(body)
        if body.stream:
            return await streaming.stream(request, jobs, streaming.chat_chunks(body, jobs, chat.plan, texts, parser,
                                                                               chat.thinking))
        return await streaming.collect(request, jobs, lambda outs, usage: compat.chat_response(
            streaming.new_id("chatcmpl"), int(time.time()), body, outs, usage, chat.plan, texts, parser,
            chat.thinking, chat.prompt))

    @app.post("/v1/responses", response_model=R.ResponseObject, tags=["openai"],
              responses={200: _RESPONSE_EVENTS, **{k: _ERRORS[k] for k in (404, 429, 503)}})
    async def create_response(body: R.ResponsesRequest, request: Request, tenant: Tenant = Depends(authenticate)):
        """OpenAI's Responses API, stateless: the request runs as chat (serve/responses.py)."""
        compat.warn_ignored(body)
        chat_body = responses.to_chat(body)
        chat, jobs = await submit_chat(chat_body, tenant, bool(body.stream))
        if body.stream:
            builder = responses.ResponseBuilder(body, chat.plan, parser, chat.thinking, plain)
            return await streaming.response_stream(request, jobs, builder)
        return await streaming.collect(request, jobs, lambda outs, usage: responses.build_response(
            body, chat.plan, outs[0].text, outs[0].finish_reason, usage, parser, chat.thinking, plain,
            outs[0].logprobs, token_ids=outs[0].token_ids))

    # -- vLLM's tokenizer endpoints (lm-evaluation-harness's tokenizer_backend=remote) --------------------------
    @app.post("/tokenize", response_model=TK.TokenizeResponse, tags=["tokenizer"])
    async def tokenize(body: TK.TokenizeRequest, tenant: Tenant = Depends(authenticate)) -> TK.TokenizeResponse:
        return await run_in_threadpool(TK.tokenize, tokenizer, body, limits.context_length)

    @app.post("/detokenize", response_model=TK.DetokenizeResponse, tags=["tokenizer"])
    async def detokenize(body: TK.DetokenizeRequest, tenant: Tenant = Depends(authenticate)):
        return await run_in_threadpool(TK.detokenize, tokenizer, body)

    @app.get("/tokenizer_info", response_model=TK.TokenizerInfo, tags=["tokenizer"])
    def tokenizer_info(tenant: Tenant = Depends(authenticate)) -> TK.TokenizerInfo:
        return TK.tokenizer_info(tokenizer, limits.context_length)

    @app.get("/version", response_model=TK.Version, tags=["operations"])
    def version() -> TK.Version:
        return TK.version()

    # -- vLLM's adapter endpoints (aliases, so operators' tools work unchanged) ------------------------------
    @app.post("/v1/load_lora_adapter", tags=["adapters"], responses={
        200: _TEXT, 403: {"model": P.ErrorResponse, "description": "not an admin key, or a name outside its patterns"},
        409: {"model": P.ErrorResponse, "description": "name taken"}, 507: _ERRORS[507]})
    async def vllm_load(spec: P.VLLMLoadAdapter, tenant: Tenant = Depends(admin)) -> PlainTextResponse:
        may_create(tenant, spec.lora_name)
        path, url = (None, spec.lora_path) if is_url(spec.lora_path) else (spec.lora_path, None)
        await run_in_threadpool(engine.register_adapter, spec.lora_name, path, url)
        return PlainTextResponse(f"Success: LoRA adapter '{spec.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", tags=["adapters"], responses={200: _TEXT, 404: _ERRORS[404]})
    def vllm_unload(spec: P.VLLMUnloadAdapter, tenant: Tenant = Depends(admin)) -> PlainTextResponse:
        if not (tenant.may_use(spec.lora_name) and engine.has_adapter(spec.lora_name)):  # missing or not permitted
            raise AdapterNotFound(f"adapter {shorten(spec.lora_name)} does not exist")
        engine.remove_adapter(spec.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{spec.lora_name}' removed successfully.")

    # -- adapters ------------------------------------------------------------------------------------------------
    upload_body = {"required": True, "content": {
        "application/json": {"schema": P.LoadAdapterRequest.model_json_schema()},
        "multipart/form-data": {"schema": {"type": "object", "required": ["name", "file"], "properties": {
            "name": P.LoadAdapterRequest.model_json_schema()["properties"]["name"],
            "file": {"type": "string", "format": "binary"}}}}}}

    @app.get("/v1/adapters", response_model=P.AdapterList, tags=["adapters"])
    def list_adapters(tenant: Tenant = Depends(authenticate)) -> P.AdapterList:
        return P.AdapterList(data=engine.adapter_infos([n for n in engine.adapter_names() if tenant.may_use(n)]))

    @app.post("/v1/adapters", response_model=P.AdapterInfo, tags=["adapters"],
              openapi_extra={"requestBody": upload_body},
              responses={403: {"model": P.ErrorResponse, "description": "not an admin key, or a name outside its "
                                                                          "patterns"},
                         409: {"model": P.ErrorResponse, "description": "name taken"}, 507: _ERRORS[507],
                         415: {"model": P.ErrorResponse, "description": "not JSON or multipart"}})
    async def load_adapter(request: Request, tenant: Tenant = Depends(admin)) -> P.AdapterInfo:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            try:
                spec = P.LoadAdapterRequest.model_validate_json(await request.body())
            except ValidationError as exc:
                raise validation_error(exc.errors()) from None
            may_create(tenant, spec.name)
            await run_in_threadpool(engine.register_adapter, spec.name, spec.path, spec.url)
            return engine.adapter_info(spec.name)
        if ctype == "multipart/form-data":
            async with request.form(max_files=1, max_fields=2) as form:
                name, upload = form.get("name"), form.get("file")
                if not isinstance(name, str) or upload is None or isinstance(upload, str):
                    raise APIError(400, "multipart upload needs a `name` field and a `file` part")
                may_create(tenant, name)
                await run_in_threadpool(engine.upload_adapter, name, upload.file)
            return engine.adapter_info(name)
        raise APIError(415, "send application/json {name, path} or {name, url}, or multipart/form-data with name "
                            "and file")

    @app.delete("/v1/adapters/{name}", tags=["adapters"], responses={404: _ERRORS[404]})
    def delete_adapter(name: str, tenant: Tenant = Depends(admin)) -> dict[str, object]:
        if not (tenant.may_use(name) and engine.has_adapter(name)):  # the same 404: missing or not permitted
            raise AdapterNotFound(f"adapter {shorten(name)} does not exist")
        engine.remove_adapter(name)
        return {"name": name, "deleted": True}

    # -- operations ----------------------------------------------------------------------------------------------
    @app.get("/health", response_model=P.Health, tags=["operations"], responses={503: _ERRORS[503]})
    def health():
        h = engine.health()
        body = P.Health(status="ok" if h.ready else "draining", model=limits.model_name, running=h.running,
                        waiting=h.waiting)
        return JSONResponse(body.model_dump(), status_code=200 if h.ready else 503)

    @app.get("/metrics", tags=["operations"], response_class=PlainTextResponse,
             responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}},
                        401: {"model": P.ErrorResponse, "description": "missing or unknown API key",
                              "content": {"application/json": {}}},
                        403: {"model": P.ErrorResponse, "description": "not an admin key",
                              "content": {"application/json": {}}}})
    def metrics(tenant: Tenant = Depends(admin)):
        text = engine.metrics_text()
        if not tenant.sees_all:  # series labelled with an adapter this key may not see, or another tenant, left out
            text = filter_exposition(text, lambda name: name == limits.model_name or tenant.may_use(name),
                                     tenant.name)
        return PlainTextResponse(text, media_type=CONTENT_TYPE)

    playground.install(app)
    _trim_openapi(app)
    return app


# -- errors, limits, metrics ---------------------------------------------------------------------------------------
def _install_middleware(app: FastAPI, config: ServeConfig, metrics) -> None:
    inner = app.build_middleware_stack
    app.build_middleware_stack = lambda: Outermost(inner(), config.max_body_bytes, config.max_upload_bytes, metrics)


def _install_error_handlers(app: FastAPI) -> None:
    def respond(status: int, message: str, type_: str | None = None, param: str | None = None,
                code: str | None = None, headers: dict | None = None) -> JSONResponse:
        status, body = error_response(status, message, type_, param, code)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        err = validation_error(exc.errors())
        return respond(400, err.message, param=err.param)

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        if exc.status == 429:
            headers = {"Retry-After": "1"}
        return respond(exc.status, exc.message, exc.type, exc.param, exc.code, headers)

    @app.exception_handler(OrtloraError)
    async def _ortlora(request: Request, exc: OrtloraError):
        status = status_of(exc)
        return respond(status, str(exc), headers={"Retry-After": "1"} if status in (429, 503) else None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return respond(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        # (Starlette re-raises after this answer, and uvicorn logs the traceback)
        if status_of(exc) == 507:  # a full disk under a form's spooled upload
            return respond(507, f"the server has no disk space left: {exc.strerror}", "server_error")
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
