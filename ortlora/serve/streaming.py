"""Engine events back into OpenAI answers: a request's jobs' events gathered into one response body, or streamed as
server-sent events (completions and chat chunks, with reasoning deltas under --reasoning-parser; the Responses
API's typed events). Leaving early (client disconnect, error) cancels every job, which frees its slot.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from ortlora.errors import OrtloraError
from ortlora.serve import protocol as P
from ortlora.serve.engine_client import Event, Jobs
from ortlora.serve.errors import APIError, error_response, status_of
from ortlora.serve.openai_compat import (FINGERPRINT, Output, TokenText, chat_logprobs_json, completion_logprobs,
                                         top)
from ortlora.serve.reasoning import Split, chat_delta
from ortlora.serve.tools import ToolPlan, ToolStream, call_id


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


async def collect(request: Request, jobs: Jobs, build) -> Any:
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
        jobs.cancel()
    return build(outs, _usage(jobs, completion))


def _usage(jobs: Jobs, completion: int) -> P.Usage:
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
        jobs.cancel()
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
            jobs.cancel()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def completion_chunks(body: P.CompletionRequest, jobs: Jobs, echo: list[str], texts: TokenText):
    """Text chunks per token; with `echo`, each choice starts with its prompt (and, with logprobs, the prompt's
    logprobs, which the engine sends as the job's first event)."""
    rid, created, n = new_id("cmpl"), int(time.time()), body.n or 1
    base = {"id": rid, "object": "text_completion", "created": created, "model": body.model,
            "system_fingerprint": FINGERPRINT}

    def chunk(i, text, lp=None, finish=None):
        return {**base, "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}]}

    offsets = [0] * len(jobs)
    scored = body.echo and body.logprobs is not None
    if body.echo and not scored:
        for i in range(len(jobs)):
            yield chunk(i, echo[i // n])
            offsets[i] = len(echo[i // n])
    completion = 0
    async for ev in _events(jobs):  # one chunk per token, even when its text is held back (half a character)
        i = ev.index
        if ev.prompt_logprobs is not None and scored:
            prompt = jobs[i].prompt_ids
            lps = top(ev.prompt_logprobs, body.logprobs)
            yield chunk(i, echo[i // n], completion_logprobs(texts, prompt, lps).model_dump())
            offsets[i] = len(echo[i // n])
        if not (ev.token_ids or ev.text or ev.finish_reason):
            continue
        completion += ev.new_tokens
        lp = None
        if ev.logprobs is not None:
            lp = completion_logprobs(texts, ev.token_ids, ev.logprobs, offsets[i]).model_dump()
        offsets[i] += len(ev.text)
        yield chunk(i, ev.text, lp, ev.finish_reason)
    if body.stream_options and body.stream_options.include_usage:
        yield {**base, "choices": [], "usage": _usage(jobs, completion).model_dump()}


async def chat_chunks(body: P.ChatCompletionRequest, jobs: Jobs, plan: ToolPlan, texts: TokenText, reasoning=None,
                      thinking: bool = True):
    """Reasoning (with a parser: `reasoning_content` / `reasoning` deltas) and then the answer: as content deltas,
    or, when it is a tool call, as tool_calls deltas: a named function's arguments stream as they come; `required`
    arrays and `auto` calls are parsed once complete (serve.tools.ToolStream)."""
    rid, created = new_id("chatcmpl"), int(time.time())
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
            "system_fingerprint": FINGERPRINT}

    def chunk(i, delta, logprobs=None, finish=None):
        return {**base, "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

    def arguments(i, text):
        if called[i]:
            return [chunk(i, {"tool_calls": [{"index": 0, "function": {"arguments": text}}]})]
        called[i] = True
        return [chunk(i, {"tool_calls": [{"index": 0, "id": call_id(), "type": "function",
                                          "function": {"name": plan.name, "arguments": text}}]})]

    for i in range(len(jobs)):
        yield chunk(i, {"role": "assistant", "content": "" if plan.mode != "named" else None})
    splits = [reasoning.stream(thinking) if reasoning is not None else None for _ in jobs]
    tools = [ToolStream(plan) for _ in jobs]
    called = [False] * len(jobs)
    completion = 0
    async for ev in _events(jobs):
        completion += ev.new_tokens
        i, lp = ev.index, chat_logprobs_json(texts, ev.logprobs) if ev.logprobs is not None else None
        part = splits[i].feed(ev.text) if splits[i] is not None else Split(content=ev.text)
        if ev.finish_reason and splits[i] is not None:  # what was held back (an output cut inside the reasoning)
            rest = splits[i].finish()
            part = Split(part.reasoning + rest.reasoning, part.content + rest.content)
        delta = chat_delta(part)
        content, args = tools[i].feed(part.content) if part.content else ("", "")
        if content:
            delta["content"] = content
        pieces = ([chunk(i, delta)] if delta else []) + (arguments(i, args) if args else [])
        if ev.finish_reason:
            content, calls = tools[i].finish()
            if content:
                pieces.append(chunk(i, {"content": content}))
            if calls and plan.mode != "named":  # (a named call's arguments went out as they came)
                called[i] = True
                pieces.append(chunk(i, {"tool_calls": [{"index": k, "id": c.id, "type": "function",
                                                        "function": c.function.model_dump()}
                                                       for k, c in enumerate(calls)]}))
        if lp and not pieces:
            pieces.append(chunk(i, {}))
        if lp:
            pieces[0]["choices"][0]["logprobs"] = lp
        for piece in pieces:
            yield piece
        if ev.finish_reason:
            yield chunk(i, {}, None, _tool_reason(ev.finish_reason, called[i]))
    if body.stream_options and body.stream_options.include_usage:
        yield {**base, "choices": [], "usage": _usage(jobs, completion).model_dump()}


def _tool_reason(reason: str | None, called: bool) -> str | None:
    return "tool_calls" if called and reason == "stop" else reason


# -- the Responses API -------------------------------------------------------------------------------------------
async def response_stream(request: Request, jobs: Jobs, builder) -> StreamingResponse:
    """One response's events (serve.responses.ResponseBuilder) as OpenAI streams them: `event:` and `data:` lines,
    no [DONE]; an engine failure after the headers went out is `response.failed`."""
    from ortlora.serve.responses import sse

    await _first_event(request, jobs)

    async def body():
        completion = 0
        try:
            yield sse(builder.start())
            async for ev in _events(jobs):
                completion += ev.new_tokens
                events = builder.feed(ev.text, ev.new_tokens, ev.logprobs)
                if ev.finish_reason:
                    events += builder.finish(ev.finish_reason, _usage(jobs, completion))
                if events:
                    yield sse(events)
        except OrtloraError as exc:
            yield sse(builder.fail(str(exc)))
        finally:
            jobs.cancel()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
