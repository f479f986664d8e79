"""The Responses API's pieces without a server (serve/responses.py): requests as the openai client sends them
translated to chat, refusals that name the field, and engine output turned into Response objects and event
streams that OpenAI's OpenAPI document and the openai client's own types accept. The client itself is run
against the builder through an in-process transport (httpx.MockTransport): its request body goes through
`ResponsesRequest` -> `to_chat`, and its stream parser reads `sse(...)`."""

from __future__ import annotations

import json

import httpx
import pytest
from pydantic import TypeAdapter, ValidationError

from ortlora.serve import protocol as P
from ortlora.serve import responses_protocol as R
from ortlora.serve.errors import validation_error
from ortlora.serve.responses import ResponseBuilder, build_response, sse, to_chat
from ortlora.serve.tools import ToolPlan, template_messages
from serve_helpers import openai_validator

ADD = {"type": "function", "name": "add", "description": "add two integers", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]},
    "strict": True}
USAGE = P.Usage(prompt_tokens=7, completion_tokens=5, total_tokens=12)


@pytest.fixture(scope="module")
def shapes():
    from openai.types.responses import Response, ResponseStreamEvent

    return SimpleShapes(openai_validator("Response"), openai_validator("ResponseStreamEvent"), Response,
                        TypeAdapter(ResponseStreamEvent))


class SimpleShapes:
    def __init__(self, response, event, client_response, client_event):
        self.response, self.event = response, event
        self.client_response, self.client_event = client_response, client_event

    def check(self, events: list[dict], final) -> None:
        """Every event and the final object against OpenAI's document and the openai client's types."""
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        for e in events:
            self.event.validate(e)
            assert self.client_event.validate_python(e).type == e["type"]
        body = json.loads(final.model_dump_json())
        self.response.validate(body)
        self.client_response.model_validate(body)


def _request(**fields) -> R.ResponsesRequest:
    return R.ResponsesRequest.model_validate({"model": "m", "input": "hi", **fields})


def _run(body: R.ResponsesRequest, pieces: list[str], finish="stop", reasoning=None, thinking=True, logprobs=None):
    plan = ToolPlan.of(to_chat(body))
    b = ResponseBuilder(body, plan, reasoning, thinking)
    events = b.start()
    for k, piece in enumerate(pieces):
        events += b.feed(piece, 1, logprobs[k] if logprobs else None)
    events += b.finish(finish, USAGE)
    return events, b.response


def _types(events):
    return [e["type"] for e in events]


# -- requests --------------------------------------------------------------------------------------------------
def test_items_become_chat_history_as_templates_read_it():
    body = _request(instructions="Be brief.", tools=[ADD], input=[
        {"role": "user", "content": "add 1 and 2"},  # an EasyInputMessage: no type
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "use add"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Calling.", "annotations": []}]},
        {"type": "function_call", "call_id": "call_1", "name": "add", "arguments": '{"a":1,"b":2}', "id": "fc_1"},
        {"type": "function_call_output", "call_id": "call_1", "output": "3"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "and "},
                                                         {"type": "input_text", "text": "now 3 + 4?"}]}])
    chat = to_chat(body)
    msgs = template_messages(chat)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "user"]
    assert msgs[0]["content"] == "Be brief." and msgs[-1]["content"] == "and now 3 + 4?"
    assert msgs[2]["content"] == "Calling." and msgs[2]["reasoning_content"] == "use add"
    assert msgs[2]["tool_calls"] == [{"id": "call_1", "type": "function",
                                      "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]
    assert msgs[3] == {"role": "tool", "content": "3", "name": "add", "tool_call_id": "call_1"}
    assert chat.tools[0].function.parameters == ADD["parameters"] and chat.tools[0].function.strict


def test_request_fields_map_onto_chat():
    body = _request(tools=[ADD], tool_choice={"type": "function", "name": "add"}, max_output_tokens=9,
                    temperature=0.3, top_p=0.9, seed=4, parallel_tool_calls=False, top_logprobs=2,
                    include=["message.output_text.logprobs"], reasoning={"effort": "none"},
                    adapters=[{"name": "a1", "weight": 0.5}], adapter_scale=2.0, metadata={"k": "v"})
    chat = to_chat(body)
    assert chat.tool_choice.function.name == "add" and chat.max_completion_tokens == 9
    assert (chat.temperature, chat.top_p, chat.seed, chat.parallel_tool_calls) == (0.3, 0.9, 4, False)
    assert chat.logprobs and chat.top_logprobs == 2
    assert chat.chat_template_kwargs == {"reasoning_effort": "none", "enable_thinking": False}
    assert chat.adapters[0].name == "a1" and chat.adapter_scale == 2.0
    fmt = {"format": {"type": "json_schema", "name": "sum", "schema": {"type": "object"}}}
    assert to_chat(_request(text=fmt)).response_format.json_schema.schema_ == {"type": "object"}
    assert to_chat(_request(text={"format": {"type": "json_object"}})).response_format.type == "json_object"
    assert to_chat(_request(max_tool_calls=1, tools=[ADD])).parallel_tool_calls is False


@pytest.mark.parametrize("fields, param, fragment", [
    ({"tools": [{"type": "web_search"}]}, "tools.[0]", "'web_search'"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input.[0].content.[0]", "'input_image'"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.[0]", "'item_reference'"),
    ({"previous_response_id": "resp_1"}, "previous_response_id", "stateless"),
    ({"store": True}, "store", "stateless"),
    ({"background": True}, "background", "stateless"),
    ({"truncation": "auto"}, "truncation", "not supported"),
    ({"top_logprobs": 3}, "top_logprobs", "include"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema", "needs a schema"),
    ({"include": ["nonsense"]}, "include.[0]", "Input should be"),
])
def test_what_ortlora_cannot_do_is_a_400_naming_the_field(fields, param, fragment):
    with pytest.raises(ValidationError) as info:
        R.ResponsesRequest.model_validate({"model": "m", "input": "hi", **fields})
    err = validation_error(info.value.errors())
    assert err.status == 400 and err.param == param and fragment in err.message, (err.param, err.message)


def test_chat_refusals_come_back_as_400s_too_and_a_required_call_outranks_text_format():
    from ortlora.serve.errors import APIError

    with pytest.raises(APIError) as info:
        to_chat(_request(tool_choice="required"))  # no tools
    assert info.value.status == 400 and info.value.param == "tool_choice" and "tools" in info.value.message
    # a required call is the output: text.format (an agent's output type, sent along) shapes only text
    chat = to_chat(_request(tools=[ADD], tool_choice="required", text={"format": {"type": "json_object"}}))
    assert chat.response_format is None and chat.tool_choice == "required"
    assert to_chat(_request(tools=[ADD], text={"format": {"type": "json_object"}})).response_format.type == \
        "json_object"
    assert _request(store=False, stream_options={"include_obfuscation": False}).store is False


# -- responses and events --------------------------------------------------------------------------------------
def test_text_streams_as_output_text_deltas_and_the_final_object_agrees(shapes):
    body = _request(metadata={"run": "1"}, max_output_tokens=50, temperature=0.5)
    events, final = _run(body, ["Hel", "lo", " there"])
    assert _types(events) == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"]
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Hello there"
    assert final.status == "completed" and final.output[0].content[0].text == "Hello there"
    assert final.usage.input_tokens == 7 and final.usage.output_tokens == 5 and final.metadata == {"run": "1"}
    assert events[-1]["response"] == final.model_dump()
    shapes.check(events, final)
    whole = build_response(body, ToolPlan.of(to_chat(body)), "Hello there", "stop", USAGE)
    assert whole.output[0].content[0].text == "Hello there" and whole.status == "completed"


def test_max_output_tokens_cut_is_incomplete(shapes):
    events, final = _run(_request(max_output_tokens=3), ["one", " two"], finish="length")
    assert events[-1]["type"] == "response.incomplete" and final.status == "incomplete"
    assert final.incomplete_details.reason == "max_output_tokens" and final.output[0].status == "incomplete"
    shapes.check(events, final)


@pytest.mark.parametrize("choice, pieces, expect", [
    ({"type": "function", "name": "add"}, ['{"a":', '1,"b":2}'], [("add", '{"a":1,"b":2}')]),
    ("required", ['[{"name":"add","arguments":', '{"a":1,"b":2}},{"name":"add","arguments":{"a":3,"b":4}}]'],
     [("add", '{"a": 1, "b": 2}'), ("add", '{"a": 3, "b": 4}')]),
    ("auto", ['<tool_call>\n{"name": "add", ', '"arguments": {"a": 1, "b": 2}}\n</tool_call>'],
     [("add", '{"a": 1, "b": 2}')]),
])
def test_tool_calls_become_function_call_items(shapes, choice, pieces, expect):
    events, final = _run(_request(tools=[ADD], tool_choice=choice), pieces)
    calls = [(i.name, i.arguments) for i in final.output if i.type == "function_call"]
    assert calls == expect and not [i for i in final.output if i.type == "message"]
    deltas = [e for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert "".join(e["delta"] for e in deltas) == "".join(a for _, a in expect)
    if choice != "required" and choice != "auto":  # a named call's arguments stream as they come
        assert len(deltas) == 2
    assert all(i.call_id.startswith("call_") for i in final.output)
    shapes.check(events, final)


def test_a_required_call_cut_by_max_output_tokens_is_an_incomplete_partial_call(shapes):
    events, final = _run(_request(tools=[ADD], tool_choice="required"), ['[{"name":"add","arguments":{"a":1'],
                         finish="length")
    (item,) = final.output
    assert (item.type, item.name, item.arguments, item.status) == ("function_call", "add", '{"a":1', "incomplete")
    shapes.check(events, final)


def test_reasoning_becomes_a_reasoning_item_before_the_message(shapes):
    from ortlora.serve.reasoning import ReasoningParser

    class Tok:
        def encode(self, text, add_special_tokens=False):
            return [5]

    pieces = ["<think>\nfirst", " this\n</th", "ink>\n\nThen that."]
    events, final = _run(_request(reasoning={"effort": "high"}), pieces, reasoning=ReasoningParser(Tok()))
    assert [i.type for i in final.output] == ["reasoning", "message"]
    assert final.output[0].content[0].text == "first this" and final.output[1].content[0].text == "Then that."
    assert "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta") == "first this"
    assert _types(events).index("response.reasoning_text.done") < _types(events).index("response.output_item.added",
                                                                                          5)
    assert final.usage.output_tokens_details.reasoning_tokens == 3  # every piece took one token, the last ends it
    assert final.reasoning == {"effort": "high", "summary": None}
    shapes.check(events, final)


def test_logprobs_come_with_the_text_when_included(shapes, tmp_path):
    from ortlora.runtime.logprobs import TokenLogprob
    from ortlora.runtime.tokenizer import Tokenizer
    from ortlora.serve.openai_compat import TokenText
    from ortlora.testing import build_tokenizer

    build_tokenizer(tmp_path)
    tok = Tokenizer(tmp_path)
    ids = tok.encode("hello world")
    body = _request(include=["message.output_text.logprobs"], top_logprobs=1)
    b = ResponseBuilder(body, ToolPlan.of(to_chat(body)), texts=TokenText(tok))
    events = b.start()
    for t in ids:
        events += b.feed(tok.decode([t]), 1, [TokenLogprob(t, -0.25, ((t, -0.25),))])
    events += b.finish("stop", USAGE)
    part = b.response.output[0].content[0]
    assert [lp.token for lp in part.logprobs] == [TokenText(tok)(t)[0] for t in ids]
    assert all(lp.top_logprobs[0].logprob == -0.25 for lp in part.logprobs)
    shapes.check(events, b.response)


def test_failure_after_the_stream_began_is_response_failed(shapes):
    body = _request()
    b = ResponseBuilder(body, ToolPlan.of(to_chat(body)))
    events = b.start() + b.feed("x") + b.finish("error", USAGE)
    assert events[-1]["type"] == "response.failed" and b.response.error.code == "server_error"
    for e in events:
        shapes.event.validate(e)


# -- the openai client, in process -------------------------------------------------------------------------------
def _client(script):
    """An openai client whose HTTP goes to the builder: each request body is parsed as the server would, and
    `script(body)` says what the engine wrote: (pieces, finish_reason)."""
    import openai

    seen = []

    def handle(request: httpx.Request) -> httpx.Response:
        body = R.ResponsesRequest.model_validate_json(request.content)
        seen.append(body)
        pieces, finish = script(body)
        b = ResponseBuilder(body, ToolPlan.of(to_chat(body)))
        events = b.start()
        for p in pieces:
            events += b.feed(p, 1)
        events += b.finish(finish, USAGE)
        if body.stream:
            return httpx.Response(200, text=sse(events), headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=b.response.model_dump())

    client = openai.OpenAI(base_url="http://ortlora.test/v1", api_key="none", max_retries=0,
                           http_client=httpx.Client(transport=httpx.MockTransport(handle)))
    return client, seen


def test_openai_client_create_plain_streamed_with_a_tool_and_text_format():
    def script(body):
        if body.tools:
            return ['{"a":2,', '"b":3}'], "stop"
        if body.text is not None:
            return ['{"name":"Rex"}'], "stop"
        return ["Hi", " there"], "stop"

    client, seen = _client(script)
    r = client.responses.create(model="a1", input="Say hi", instructions="Be nice.", max_output_tokens=20)
    assert r.output_text == "Hi there" and r.status == "completed" and r.usage.total_tokens == 12
    assert to_chat(seen[-1]).messages[0].content == "Be nice."

    with client.responses.stream(model="a1", input="Say hi") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "Hi there" == final.output_text

    tool = {k: ADD[k] for k in ("type", "name", "description", "parameters", "strict")}
    r = client.responses.create(model="a1", input="add 2 and 3", tools=[tool],
                                tool_choice={"type": "function", "name": "add"})
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "add" and json.loads(call.arguments) == {"a": 2, "b": 3}
    assert to_chat(seen[-1]).tool_choice.function.name == "add"

    fmt = {"format": {"type": "json_schema", "name": "pet", "schema": {
        "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}}
    r = client.responses.create(model="a1", input="a pet", text=fmt)
    assert json.loads(r.output_text) == {"name": "Rex"}
    assert to_chat(seen[-1]).response_format.json_schema.name == "pet"
    events = list(client.responses.create(model="a1", input="a pet", text=fmt, stream=True))
    assert events[-1].type == "response.completed" and json.loads(events[-1].response.output_text) == {"name": "Rex"}


def test_openai_client_parse_of_a_pydantic_text_format():
    from pydantic import BaseModel

    class Pet(BaseModel):
        name: str
        age: int

    client, seen = _client(lambda body: (['{"name":"Rex","age":3}'], "stop"))
    r = client.responses.parse(model="a1", input="a pet", text_format=Pet)
    assert r.output_parsed == Pet(name="Rex", age=3)
    assert to_chat(seen[-1]).response_format.type == "json_schema"


def test_a_function_call_round_trip_sends_items_back_that_translate():
    """What an agent loop sends after running a tool: the earlier output items plus a function_call_output."""
    client, seen = _client(lambda body: (['[{"name":"add","arguments":{"a":1,"b":2}}]'], "stop") if len(seen) == 1
                           else (["3"], "stop"))
    tool = {k: ADD[k] for k in ("type", "name", "parameters", "strict")}
    first = client.responses.create(model="a1", input="add", tools=[tool], tool_choice="required")
    call = first.output[0]
    items = [{"role": "user", "content": "add"}, *[o.model_dump() for o in first.output],
             {"type": "function_call_output", "call_id": call.call_id, "output": "3"}]
    second = client.responses.create(model="a1", input=items, tools=[tool])
    assert second.output_text == "3"
    msgs = template_messages(to_chat(seen[-1]))
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool"] and msgs[2]["tool_call_id"] == call.call_id
