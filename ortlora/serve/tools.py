"""Tool calling for chat completions: the tools into the chat template, a grammar when a call is required, and the
model's text parsed back into OpenAI `tool_calls`.

    plan = ToolPlan.of(body)              # what tool_choice asks for, and the grammar that enforces it
    messages = template_messages(body)    # history with assistant tool_calls and tool results, as templates want
    content, calls = plan.parse(text)     # text -> (content or None, [ToolCall])

The output formats, as vLLM shapes them:
- a named function (`tool_choice: {"type": "function", ...}`): the output is the arguments object, constrained
  by the function's parameter schema;
- `required`: a JSON array of `{"name", "arguments"}` objects (one, or several with `parallel_tool_calls`), each
  constrained by its function's schema;
- `auto`: free text; calls are the `<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks that Hermes-
  style templates (Qwen2.5, Hermes, many fine-tunes) teach the model to write.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from ortlora.serve import protocol as P

_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
OPEN_TAG = "<tool_call>"


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolPlan:
    mode: str  # "none" (no tools, or tool_choice none: no calls parsed), "auto", "required", "named"
    tools: list[dict] = field(default_factory=list)  # for the chat template: [{"type": "function", "function": ..}]
    name: str | None = None  # the named function
    schema: dict | None = None  # what the output must match (named, required)

    @classmethod
    def of(cls, body: P.ChatCompletionRequest) -> "ToolPlan":
        tools = [t.model_dump(exclude_none=True) for t in body.tools or ()]
        choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
        if not tools or choice == "none":  # the template still shows them (as vLLM does): the history may use them
            return cls("none", tools)
        params = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in tools}
        if isinstance(choice, P.NamedToolChoice):
            name = choice.function.name
            return cls("named", tools, name, params[name])
        if choice == "required":
            one = {"anyOf": [{"type": "object", "properties": {"name": {"const": n}, "arguments": s},
                              "required": ["name", "arguments"], "additionalProperties": False}
                             for n, s in params.items()]}
            parallel = body.parallel_tool_calls is not False
            schema = {"type": "array", "items": one, "minItems": 1, **({} if parallel else {"maxItems": 1})}
            return cls("required", tools, schema=schema)
        return cls("auto", tools)

    def parse(self, text: str) -> tuple[str | None, list[P.ToolCall]]:
        """The model's text as (content, calls); text that does not parse stays content (no calls)."""
        if self.mode == "named":
            return None, [_call(self.name, text)]
        if self.mode == "required":
            try:
                items = json.loads(text)
                return None, [_call(i["name"], json.dumps(i["arguments"], ensure_ascii=False)) for i in items]
            except (ValueError, TypeError, KeyError):  # cut off by max_tokens: no valid call
                return text, []
        if self.mode == "auto" and OPEN_TAG in text:
            calls = []
            for block in _BLOCK.findall(text):
                try:
                    item = json.loads(block)
                    args = item.get("arguments", item.get("parameters", {}))
                    calls.append(_call(item["name"], args if isinstance(args, str) else
                                       json.dumps(args, ensure_ascii=False)))
                except (ValueError, TypeError, KeyError, AttributeError):
                    return text, []
            content = text[:text.index(OPEN_TAG)].strip()
            return content or None, calls
        return text, []


def _call(name: str, arguments: str) -> P.ToolCall:
    return P.ToolCall(id=call_id(), function=P.FunctionCall(name=name, arguments=arguments))


def template_messages(body: P.ChatCompletionRequest) -> list[dict]:
    """The history as chat templates read it (transformers' conventions): `developer` as `system`; an assistant's
    tool calls with their arguments as objects (templates render them with `tojson`); tool results with their id."""
    out = []
    for m in body.messages:
        msg: dict = {"role": m.role if m.role != "developer" else "system", "content": m.text()}
        if m.name is not None:
            msg["name"] = m.name
        if m.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in m.tool_calls]
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def _arguments(text: str):
    try:
        return json.loads(text)
    except ValueError:  # not JSON: the template gets the text as it came
        return text
