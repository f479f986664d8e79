"""From an OpenAI request to engine jobs and back: prompts checked against the context (by size before they are
tokenized), one job per choice (each holding its adapter), and the events of the jobs gathered into a response or
streamed as server-sent events. Leaving early (client disconnect, error) cancels every job, which frees its slot.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ortlora.errors import OrtloraError
from ortlora.runtime.sampling import SamplingParams
from ortlora.serve import protocol as P
from ortlora.serve.openai_compat import (FINGERPRINT, Output, TokenText, chat_logprobs_json,
                                        completion_logprobs, vllm_prompt_logprobs)
from ortlora.serve.tools import OPEN_TAG, ToolPlan, call_id
from ortlora.serve.errors import APIError, error_response, status_of
from ortlora.runtime.scheduler import Event, Job
from ortlora.serve.server import adapter_label


class JobEvents:
    """The events of one request's jobs, handed from the engine thread (`sink`) to the event loop."""

    def __init__(self):
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._head: Event | None = None

    def sink(self, ev: Event) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, ev)

    async def peek(self) -> Event:
        if self._head is None:
            self._head = await self._queue.get()
        return self._head

    async def get(self) -> Event:
        ev = await self.peek()
        self._head = None
        return ev

    def ready(self) -> list[Event]:
        """The events already queued, without waiting (after `get`: a replica sends them in one message)."""
        out = [] if self._head is None else [self._head]
        self._head = None
        while not self._queue.empty():
            out.append(self._queue.get_nowait())
        return out


class Jobs(list):
    """The jobs of one request (one per choice) and their events."""

    def __init__(self, jobs: list[Job], events: JobEvents):
        super().__init__(jobs)
        self.events = events


def check_size(server, text: str, param: str) -> None:
    """Refuse text that cannot fit the context before tokenizing it: no token covers more than
    `server.max_token_chars` characters, so a longer text has more tokens than the context holds."""
    limit = server.context_length * server.max_token_chars
    if len(text) > limit:
        raise APIError(400, f"This model's maximum context length is {server.context_length} tokens; the {param} "
                            f"has {len(text)} characters, more than that many tokens can hold. Shorten it.",
                       param=param, code="context_length_exceeded")


def completion_prompts(server, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        prompts = [prompt]
    elif not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    elif isinstance(prompt[0], int):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    for p in prompts:
        if isinstance(p, str):
            check_size(server, p, "prompt")
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


def chat_prompt(server, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """The prompt ids of a conversation; `tools` ([{"type": "function", "function": ...}]) go to the template as
    transformers' apply_chat_template(tools=...) passes them."""
    check_size(server, "".join(str(m.get("content") or "") for m in messages), "messages")
    try:
        extra = {"tools": tools} if tools else {}
        text = server.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **extra)
    except OrtloraError as exc:
        raise APIError(400, str(exc), param="messages") from None
    except Exception as exc:  # jinja2 TemplateError: the template refused these messages
        raise APIError(400, f"the model's chat template refused the messages: {exc}", param="messages") from None
    check_size(server, text, "messages")
    ids = server.tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise APIError(400, "the messages render to an empty prompt (no tokens) with this model's chat template",
                       param="messages")
    return ids


async def submit(server, body, adapter: str | None, prompts: list[list[int]], max_tokens: int | None,
                 explicit_max: bool, tenant: str = "") -> Jobs:
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
        limits.append(room if max_tokens is None else min(max_tokens, room))
    if len(prompts) * n > server.max_choices:
        raise APIError(400, f"{len(prompts)} prompts x n={n} asks for {len(prompts) * n} choices; at most "
                            f"{server.max_choices} per request", param="n")
    try:
        params = [server.sampling_params(body, limit, None if body.seed is None else body.seed + j)
                  for limit in limits for j in range(n)]
    except OrtloraError as exc:
        raise APIError(400, str(exc)) from None
    # the engine client: this process's scheduler (Server) or a Ray replica (ortlora.serve.ray)
    return await server.start_jobs(adapter, prompts, n, params, tenant)


async def start(server, adapter: str | None, prompts: list[list[int]], n: int, params: list[SamplingParams],
                tenant: str) -> Jobs:
    """Queue one job per (prompt, choice) on this process's scheduler, each holding its adapter."""
    events = JobEvents()
    leases = []
    try:
        for _ in params:
            leases.append(await run_in_threadpool(server.acquire, adapter))
    except BaseException:
        for lease in leases:
            server.release(lease)
        raise
    arrival = time.monotonic()
    jobs = Jobs([Job(index=i, prompt_ids=prompts[i // n], adapter=leases[i], adapter_name=adapter_label(adapter), params=p,
                     sink=events.sink, tenant=tenant, arrival=arrival) for i, p in enumerate(params)], events)
    try:
        server.scheduler.submit(jobs)  # QueueFull -> 429, ShuttingDown -> 503
    except BaseException:
        for lease in leases:
            server.release(lease)
        raise
    return jobs


async def _events(jobs: Jobs) -> AsyncIterator[Event]:
    """Every job's events in arrival order, until each has finished."""
    left = len(jobs)
    while left:
        ev = await jobs.events.get()
        if ev.error is not None:
            raise ev.error
        if ev.finish_reason is not None:
            left -= 1
        yield ev


async def collect(request: Request, jobs: list[Job], build) -> Any:
    """Wait for all choices (cancelling them if the client goes away) and build the response body from their
    outputs (`openai_compat.Output`, one per job) and the usage."""
    outs = [Output() for _ in jobs]
    completion = 0

    async def consume():
        nonlocal completion
        async for ev in _events(jobs):
            out = outs[ev.index]
            out.text += ev.text
            out.token_ids += ev.token_ids
            out.logprobs += ev.logprobs or ()
            if ev.prompt_logprobs is not None:
                out.prompt_logprobs = ev.prompt_logprobs
            completion += ev.new_tokens
            if ev.finish_reason:
                out.finish_reason = ev.finish_reason

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
    return build(outs, _usage(jobs, completion))


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


async def _first_event(request: Request, jobs: Jobs) -> None:
    """Wait for the jobs' first event (the request is out of the queue and prefilled) before the response's status
    goes out, so that a request refused while queued or failed at its first step gets its own status code."""
    first = asyncio.ensure_future(jobs.events.peek())
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({first, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not first.done():
            raise APIError(499, "client disconnected")
        ev = first.result()
        if ev.error is not None:
            raise ev.error
    except BaseException:
        for job in jobs:
            job.cancel()
        raise
    finally:
        watcher.cancel()
        first.cancel()


async def stream(request: Request, jobs: Jobs, chunks: AsyncIterator[dict]) -> StreamingResponse:
    await _first_event(request, jobs)

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


async def completion_chunks(body: P.CompletionRequest, jobs: list[Job], echo: list[str], texts: TokenText,
                            echo_ids: list[list[int]]):
    """One chunk per engine event; with `echo`, a choice's first chunk is its prompt (with the prompt's logprobs,
    which come with the choice's first event)."""
    rid, created, n = new_id("cmpl"), int(time.time()), body.n or 1
    base = {"id": rid, "object": "text_completion", "created": created, "model": body.model,
            "system_fingerprint": FINGERPRINT}
    offsets = [0] * len(jobs)
    started = [False] * len(jobs)
    completion = 0
    async for ev in _events(jobs):  # one chunk per token, even when its text is held back (half a character)
        i = ev.index
        if not started[i]:
            started[i] = True
            extra = {}
            if body.prompt_logprobs is not None:
                extra["prompt_logprobs"] = vllm_prompt_logprobs(texts, ev.prompt_logprobs)
            if body.echo:
                lp = None
                if body.logprobs is not None and ev.prompt_logprobs is not None:
                    lp = completion_logprobs(texts, echo_ids[i // n], ev.prompt_logprobs).model_dump()
                yield {**base, "choices": [{"index": i, "text": echo[i // n], "logprobs": lp, "finish_reason": None,
                                            **extra}]}
                offsets[i] = len(echo[i // n])
            elif extra:
                yield {**base, "choices": [{"index": i, "text": "", "logprobs": None, "finish_reason": None,
                                            **extra}]}
        completion += ev.new_tokens
        lp = None
        if ev.logprobs is not None:
            lp = completion_logprobs(texts, ev.token_ids, ev.logprobs, offsets[i]).model_dump()
        offsets[i] += len(ev.text)
        yield {**base, "choices": [{"index": i, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish_reason}]}
    if body.stream_options and body.stream_options.include_usage:
        yield {**base, "choices": [], "usage": _usage(jobs, completion).model_dump()}


async def chat_chunks(body: P.ChatCompletionRequest, jobs: list[Job], plan: ToolPlan, texts: TokenText):
    """Text as content deltas, or, when the output is a tool call, as tool_calls deltas: a named function's
    arguments stream as they come; `required` arrays and `auto` calls are parsed once complete."""
    rid, created = new_id("chatcmpl"), int(time.time())
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
            "system_fingerprint": FINGERPRINT}

    def chunk(i, delta, logprobs=None, finish=None):
        return {**base, "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

    for i in range(len(jobs)):
        yield chunk(i, {"role": "assistant", "content": "" if plan.mode != "named" else None})
    held = [""] * len(jobs)  # text that may be a tool call (not streamed as content)
    called = [False] * len(jobs)
    completion = 0
    async for ev in _events(jobs):
        completion += ev.new_tokens
        lp = chat_logprobs_json(texts, ev.logprobs) if ev.logprobs is not None else None
        i, reason = ev.index, ev.finish_reason
        if plan.mode == "named":
            if not called[i]:
                called[i] = True
                yield chunk(i, {"tool_calls": [{"index": 0, "id": call_id(), "type": "function",
                                                "function": {"name": plan.name, "arguments": ""}}]})
            if ev.text or lp:
                yield chunk(i, {"tool_calls": [{"index": 0, "function": {"arguments": ev.text}}]}, lp)
        elif plan.mode == "required" or (plan.mode == "auto" and _maybe_call(held[i] + ev.text)):
            held[i] += ev.text
            if lp:
                yield chunk(i, {}, lp)
        else:
            text, held[i] = held[i] + ev.text, ""  # what looked like a call's start was not
            if text or lp:
                yield chunk(i, {"content": text}, lp)
        if ev.finish_reason:
            if held[i]:
                content, calls = plan.parse(held[i])
                if calls:
                    called[i] = True
                    yield chunk(i, {"tool_calls": [{"index": k, "id": c.id, "type": "function",
                                                    "function": c.function.model_dump()}
                                                   for k, c in enumerate(calls)]})
                elif content:
                    yield chunk(i, {"content": content})
            yield chunk(i, {}, None, _tool_reason(reason, called[i]))
    if body.stream_options and body.stream_options.include_usage:
        yield {**base, "choices": [], "usage": _usage(jobs, completion).model_dump()}


def _maybe_call(text: str) -> bool:
    """Could this output (so far) be an `auto` tool call? Then it is held back, not streamed as content."""
    start = text.lstrip()
    return bool(start) and (OPEN_TAG.startswith(start) or start.startswith(OPEN_TAG))


def _tool_reason(reason: str | None, called: bool) -> str | None:
    return "tool_calls" if called and reason == "stop" else reason


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
