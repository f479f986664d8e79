"""The Responses API on top of chat: a request becomes a chat request (so chat templates, tools, grammars, adapters
and sampling are the chat endpoint's), and one choice's engine output becomes a Response object or its stream of
events.

    chat = to_chat(body)                           # ResponsesRequest -> ChatCompletionRequest (400 on what cannot map)
    plan = ToolPlan.of(chat)                       # ... then exactly chat's path to the engine ...
    b = ResponseBuilder(body, plan, reasoning=parser, thinking=thinking, texts=token_text(server))
    events = b.start()                             # response.created, response.in_progress
    events += b.feed(text, new_tokens, logprobs)   # per engine event: output items, their parts and deltas
    events += b.finish(finish_reason, usage)       # closes the items; response.completed or response.incomplete
    b.response                                     # the final ResponseObject (the non-streamed answer)
    sse(events)                                    # `event: TYPE` + `data: JSON` lines (no [DONE]: OpenAI sends none)

The output items, in order: a `reasoning` item (with --reasoning-parser, when the model thought), a `message`
with one `output_text` part (when there is text), and a `function_call` item per call. A named tool call's
arguments stream as they come; `required` and `auto` calls are parsed at the end (serve.tools.ToolStream).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from pydantic import ValidationError

from ortlora.serve import protocol as P
from ortlora.serve import responses_protocol as R
from ortlora.serve.errors import APIError, validation_error
from ortlora.serve.tools import ToolPlan, ToolStream


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# -- request ---------------------------------------------------------------------------------------------------
def to_chat(body: R.ResponsesRequest) -> P.ChatCompletionRequest:
    """The chat request that generates this response: instructions as the first system message, items as chat
    history (function calls as the assistant's tool_calls, their outputs as tool messages, reasoning items as the
    next assistant turn's reasoning_content), tools, tool_choice, text.format as response_format."""
    chat: dict[str, Any] = {
        "model": body.model, "messages": _messages(body), "stream": bool(body.stream), "n": 1,
        "max_completion_tokens": body.max_output_tokens, "temperature": body.temperature, "top_p": body.top_p,
        "seed": body.seed, "stop": body.stop, "top_k": body.top_k, "min_p": body.min_p,
        "repetition_penalty": body.repetition_penalty, "ignore_eos": body.ignore_eos, "min_tokens": body.min_tokens,
        "stop_token_ids": body.stop_token_ids, "logit_bias": body.logit_bias, "user": body.user,
        "adapter_scale": body.adapter_scale,
        "adapters": [a.model_dump() for a in body.adapters] if body.adapters else None,
        "logprobs": body.logprobs(), "top_logprobs": body.top_logprobs if body.logprobs() else None,
        "chat_template_kwargs": _template_kwargs(body),
    }
    if body.tools:
        chat["tools"] = [{"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})}
                         for t in body.tools]
    if body.tool_choice is not None:
        choice = body.tool_choice
        chat["tool_choice"] = choice if isinstance(choice, str) else {"type": "function",
                                                                     "function": {"name": choice.name}}
    parallel = body.parallel_tool_calls
    if body.max_tool_calls == 1:
        parallel = False
    if parallel is not None:
        chat["parallel_tool_calls"] = parallel
    fmt = body.text.format if body.text else None
    if body.tools and body.tool_choice not in (None, "none", "auto"):
        fmt = None  # the output is a call, not text: text.format has nothing to shape (an agent with an output
        # type sends both until its tool has run; OpenAI answers with the call)
    if fmt is not None and fmt.type == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.name or "response", "schema": fmt.schema_, "description": fmt.description,
            "strict": fmt.strict}}
    elif fmt is not None and fmt.type == "json_object":
        chat["response_format"] = {"type": "json_object"}
    try:
        return P.ChatCompletionRequest.model_validate({k: v for k, v in chat.items() if v is not None})
    except ValidationError as exc:  # a combination the chat endpoint refuses (e.g. tool_choice without tools)
        raise validation_error(exc.errors()) from None


def _template_kwargs(body: R.ResponsesRequest) -> dict | None:
    kwargs = dict(body.chat_template_kwargs or {})
    effort = body.reasoning.effort if body.reasoning else None
    if effort is not None:
        kwargs.setdefault("reasoning_effort", effort)
        if effort == "none":
            kwargs.setdefault("enable_thinking", False)
    return kwargs or None


def _messages(body: R.ResponsesRequest) -> list[dict]:
    out: list[dict] = []
    if body.instructions:
        out.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        return out + [{"role": "user", "content": body.input}]
    names: dict[str, str] = {}  # call_id -> function name, for the tool messages
    thought: str | None = None  # a reasoning item waits for the assistant turn it belongs to
    for item in body.input:
        if isinstance(item, R.ReasoningIn):
            thought = (thought or "") + item.text()
        elif isinstance(item, R.MessageIn):
            msg = {"role": item.role, "content": item.text()}
            if item.role == "assistant" and thought is not None:
                msg["reasoning_content"], thought = thought, None
            out.append(msg)
        elif isinstance(item, R.FunctionCallIn):
            names[item.call_id] = item.name
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and thought is None:  # text and calls: one turn
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
                if thought is not None:
                    out[-1]["reasoning_content"], thought = thought, None
        else:  # function_call_output
            msg = {"role": "tool", "tool_call_id": item.call_id, "content": item.text()}
            if item.call_id in names:
                msg["name"] = names[item.call_id]
            out.append(msg)
    if not out:
        raise APIError(400, "input has no messages", param="input")
    return out


# -- response --------------------------------------------------------------------------------------------------
class ResponseBuilder:
    """One response built from one choice's engine output, as events and as the final object. Pure: no I/O, no
    engine; `sequence_number` counts the events in order."""

    def __init__(self, body: R.ResponsesRequest, plan: ToolPlan, reasoning=None, thinking: bool = True,
                 texts=None, rid: str | None = None, created: int | None = None):
        self.body, self.plan = body, plan
        self.reasoning = reasoning.stream(thinking) if reasoning is not None else None
        self.tools = ToolStream(plan)
        self.texts = texts if body.logprobs() else None  # serve.openai_compat.TokenText
        self.response = R.ResponseObject(
            id=rid or new_id("resp"), created_at=created or int(time.time()), status="in_progress",
            instructions=body.instructions, model=body.model, metadata=body.metadata,
            parallel_tool_calls=body.parallel_tool_calls is not False, max_tool_calls=body.max_tool_calls,
            tool_choice=(body.tool_choice if isinstance(body.tool_choice, str) or body.tool_choice is None
                         else body.tool_choice.model_dump()) or "auto",
            tools=[R.FunctionToolOut(name=t.name, description=t.description, parameters=t.parameters,
                                     strict=t.strict) for t in body.tools or ()],
            temperature=body.temperature, top_p=body.top_p, top_logprobs=body.top_logprobs,
            max_output_tokens=body.max_output_tokens, user=body.user,
            reasoning=body.reasoning.model_dump(include={"effort", "summary"}) if body.reasoning else None,
            text={"format": _format(body)})
        self._seq = 0
        self._thought: R.ReasoningOut | None = None
        self._message: R.MessageOut | None = None
        self._call: R.FunctionCallOut | None = None  # a named call, streaming
        self._pending: list = []  # logprobs of text held back (it may turn out to be a tool call)
        self.reasoning_tokens = 0

    # events --------------------------------------------------------------------------------------------------
    def _event(self, type_: str, **fields) -> dict:
        ev = {"type": type_, "sequence_number": self._seq, **fields}
        self._seq += 1
        return ev

    def _snapshot(self, type_: str) -> dict:
        return self._event(type_, response=self.response.model_dump())

    def start(self) -> list[dict]:
        return [self._snapshot("response.created"), self._snapshot("response.in_progress")]

    def feed(self, text: str, new_tokens: int = 0, logprobs: list | None = None) -> list[dict]:
        """One engine event of this choice: its text, how many tokens it took, their logprobs (if asked)."""
        events: list[dict] = []
        thought, answer = "", text
        if self.reasoning is not None:
            was_thinking = not self.reasoning.ended
            part = self.reasoning.feed(text)
            thought, answer = part.reasoning, part.content
            if was_thinking:  # the end tag's tokens count as reasoning too
                self.reasoning_tokens += new_tokens
            events += self._think(thought)
            if self.reasoning.ended:
                events += self._close_thought()
        if logprobs and (self.reasoning is None or (self.reasoning.ended and not (thought and not answer))):
            self._pending += logprobs  # shown with the answer text they made (a thought's are not)
        if answer:
            content, arguments = self.tools.feed(answer)
            events += self._say(content)
            events += self._argue(arguments)
        return events

    def finish(self, finish_reason: str, usage: P.Usage, cached_tokens: int = 0) -> list[dict]:
        """The end of the output: what was held back, the tool calls, then `response.completed` (or
        `response.incomplete` when max_output_tokens cut it)."""
        if finish_reason == "error":
            return self.fail("generation failed")
        events: list[dict] = []
        cut = finish_reason == "length"
        if self.reasoning is not None:
            rest = self.reasoning.finish()
            events += self._think(rest.reasoning)
            if rest.content:
                events += self._say(self.tools.feed(rest.content)[0])
        content, calls = self.tools.finish()
        events += self._say(content)
        if self.body.max_tool_calls is not None:
            calls = calls[:self.body.max_tool_calls]
        status = "incomplete" if cut else "completed"
        events += self._close_thought(status)
        events += self._close_message(status)
        if self._call is not None:  # the named call: its arguments streamed already
            self._call.arguments = calls[0].function.arguments if calls else self._call.arguments
            events += self._close_call(self._call, status)
        else:
            for call in calls:
                item = R.FunctionCallOut(id=new_id("fc"), status="in_progress", call_id=call.id,
                                         name=call.function.name, arguments="")
                events += self._add(item)
                item.arguments = call.function.arguments
                events.append(self._event("response.function_call_arguments.delta", item_id=item.id,
                                          output_index=self._index(item), delta=item.arguments))
                events += self._close_call(item, status)
        r = self.response
        r.status = status
        r.incomplete_details = R.IncompleteDetails(reason="max_output_tokens") if cut else None
        r.completed_at = None if cut else int(time.time())
        r.usage = R.ResponseUsage(
            input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens, total_tokens=usage.total_tokens,
            input_tokens_details=R.InputTokensDetails(cached_tokens=cached_tokens),
            output_tokens_details=R.OutputTokensDetails(reasoning_tokens=min(self.reasoning_tokens,
                                                                              usage.completion_tokens)))
        events.append(self._snapshot("response.incomplete" if cut else "response.completed"))
        return events

    def fail(self, message: str) -> list[dict]:
        """The engine failed after the stream began: `response.failed` with the error."""
        self.response.status = "failed"
        self.response.error = R.ResponseErrorOut(message=message)
        return [self._snapshot("response.failed")]

    # items ---------------------------------------------------------------------------------------------------
    def _index(self, item) -> int:
        return next(i for i, x in enumerate(self.response.output) if x is item)

    def _add(self, item) -> list[dict]:
        self.response.output.append(item)
        return [self._event("response.output_item.added", output_index=self._index(item), item=item.model_dump())]

    def _think(self, text: str) -> list[dict]:
        if not text:
            return []
        events = []
        if self._thought is None:
            self._thought = R.ReasoningOut(id=new_id("rs"), status="in_progress", content=[])
            events += self._add(self._thought)
            self._thought.content.append(R.ReasoningText(text=""))
            events.append(self._event("response.content_part.added", item_id=self._thought.id,
                                      output_index=self._index(self._thought), content_index=0,
                                      part=R.ReasoningText(text="").model_dump()))
        self._thought.content[0].text += text
        events.append(self._event("response.reasoning_text.delta", item_id=self._thought.id,
                                  output_index=self._index(self._thought), content_index=0, delta=text))
        return events

    def _close_thought(self, status: str = "completed") -> list[dict]:
        item = self._thought
        if item is None or item.status != "in_progress":
            return []
        item.status = status
        at, part = self._index(item), item.content[0]
        return [self._event("response.reasoning_text.done", item_id=item.id, output_index=at, content_index=0,
                            text=part.text),
                self._event("response.content_part.done", item_id=item.id, output_index=at, content_index=0,
                            part=part.model_dump()),
                self._event("response.output_item.done", output_index=at, item=item.model_dump())]

    def _say(self, text: str) -> list[dict]:
        if not text:
            return []
        events = self._close_thought()
        if self._message is None:
            self._message = R.MessageOut(id=new_id("msg"), status="in_progress", content=[])
            events += self._add(self._message)
            self._message.content.append(R.OutputText(text=""))
            events.append(self._event("response.content_part.added", item_id=self._message.id,
                                      output_index=self._index(self._message), content_index=0,
                                      part=R.OutputText(text="").model_dump()))
        part = self._message.content[0]
        part.text += text
        lps = self._logprobs()
        part.logprobs += lps
        events.append(self._event("response.output_text.delta", item_id=self._message.id,
                                  output_index=self._index(self._message), content_index=0, delta=text,
                                  logprobs=[lp.model_dump() for lp in lps]))
        return events

    def _close_message(self, status: str) -> list[dict]:
        item = self._message
        if item is None or item.status != "in_progress":
            return []
        item.status = status
        at, part = self._index(item), item.content[0]
        return [self._event("response.output_text.done", item_id=item.id, output_index=at, content_index=0,
                            text=part.text, logprobs=[lp.model_dump() for lp in part.logprobs]),
                self._event("response.content_part.done", item_id=item.id, output_index=at, content_index=0,
                            part=part.model_dump()),
                self._event("response.output_item.done", output_index=at, item=item.model_dump())]

    def _argue(self, arguments: str) -> list[dict]:
        """A named call's arguments as they stream."""
        if not arguments:
            return []
        self._pending = []
        events = self._close_thought()
        if self._call is None:
            self._call = R.FunctionCallOut(id=new_id("fc"), status="in_progress", call_id=new_id("call"),
                                           name=self.plan.name, arguments="")
            events += self._add(self._call)
        self._call.arguments += arguments
        events.append(self._event("response.function_call_arguments.delta", item_id=self._call.id,
                                  output_index=self._index(self._call), delta=arguments))
        return events

    def _close_call(self, item: R.FunctionCallOut, status: str) -> list[dict]:
        item.status = status
        at = self._index(item)
        return [self._event("response.function_call_arguments.done", item_id=item.id, name=item.name,
                            output_index=at, arguments=item.arguments),
                self._event("response.output_item.done", output_index=at, item=item.model_dump())]

    def _logprobs(self) -> list[R.LogprobOut]:
        """The logprobs of the text shown now (held text's come along when it is shown)."""
        lps, self._pending = self._pending, []
        if self.texts is None:
            return []
        out = []
        for lp in lps:
            text, raw = self.texts(lp.token)
            top = [R.TopLogprobOut(token=self.texts(t)[0], logprob=v, bytes=self.texts(t)[1]) for t, v in lp.top]
            out.append(R.LogprobOut(token=text, logprob=lp.logprob, bytes=raw, top_logprobs=top))
        return out


def _format(body: R.ResponsesRequest) -> dict:
    fmt = body.text.format if body.text else None
    if fmt is None:
        return {"type": "text"}
    out = fmt.model_dump(by_alias=True, exclude_none=True)
    if fmt.type == "json_schema":
        out.setdefault("name", "response")
    return out


def build_response(body: R.ResponsesRequest, plan: ToolPlan, text: str, finish_reason: str, usage: P.Usage,
                   reasoning=None, thinking: bool = True, texts=None, logprobs: list | None = None,
                   cached_tokens: int = 0, token_ids: list[int] | None = None) -> R.ResponseObject:
    """The non-streamed answer: the whole output through the same builder, so both forms agree. `token_ids`: the
    output's, to count the reasoning's tokens (else all of them count when the output starts thinking)."""
    b = ResponseBuilder(body, plan, reasoning, thinking, texts)
    b.start()
    b.feed(text, usage.completion_tokens, logprobs)
    if reasoning is not None and token_ids is not None:
        b.reasoning_tokens = reasoning.count(token_ids, thinking)
    b.finish(finish_reason, usage, cached_tokens)
    return b.response


def sse(events: list[dict]) -> str:
    """Server-sent events as OpenAI writes the Responses stream: an `event:` line with the type, then the data."""
    return "".join(f"event: {ev['type']}\ndata: {json.dumps(ev, ensure_ascii=False, separators=(',', ':'))}\n\n"
                   for ev in events)
