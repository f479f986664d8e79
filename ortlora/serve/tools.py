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
            except (ValueError, TypeError, KeyError):  # cut off by max_tokens: as far as the calls came
                calls = _partial_calls(text)
                return (None, calls) if calls else (text, [])
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


_PARTIAL = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(.*)\Z', re.S)


def _partial_calls(text: str) -> list[P.ToolCall]:
    """A `required` array cut by max_tokens (`[{"name":"f","arguments":{"a":1},{"name":"g","arguments":{"b`): the
    complete calls, then the one being written with its arguments as far as they came, as a named call is."""
    calls = []
    for piece, done in _array_items(text):
        try:
            if done:
                item = json.loads(piece)
                calls.append(_call(item["name"], json.dumps(item["arguments"], ensure_ascii=False)))
                continue
            found = _PARTIAL.match(piece)
            if found:
                calls.append(_call(json.loads(f'"{found[1]}"'), found[2]))
        except (ValueError, TypeError, KeyError):
            break
    return calls


def _array_items(text: str):
    """(object text, complete) for each object of a JSON array, the last possibly cut short."""
    depth, in_string, escaped, start = 0, False, False, None
    for i, ch in enumerate(text):
        if in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth == 2 and ch == "{":
                start = i
        elif ch in "]}":
            depth -= 1
            if depth == 1 and start is not None:
                yield text[start:i + 1], True
                start = None
    if start is not None:
        yield text[start:], False


class ToolStream:
    """One choice's answer as it streams, split into what can be shown now and what may be a tool call:
    `feed(text) -> (content, arguments)`; `finish() -> (content, calls)` at the end.

    - none: everything is content;
    - named: everything is the call's arguments (streamed as they come);
    - required: held to the end, then parsed (a cut array gives its calls so far);
    - auto: content until a `<tool_call>` block starts (a suffix that may be the tag's start is held back); the
      blocks are parsed at the end, and text that does not parse is content after all. Leading whitespace is held
      too, so an answer that is only calls shows no content."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.arguments = ""
        self._held = ""
        self._calling = False  # auto: a block started, the rest is held
        self._shown = False  # auto: some content went out

    def feed(self, text: str) -> tuple[str, str]:
        mode = self.plan.mode
        if mode == "named":
            self.arguments += text
            return "", text
        if mode == "required":
            self._held += text
            return "", ""
        if mode == "none":
            return text, ""
        buf, self._held = self._held + text, ""
        if self._calling:
            self._held = buf
            return "", ""
        at = buf.find(OPEN_TAG)
        if at >= 0:
            out, self._held, self._calling = buf[:at], buf[at:], True
        else:
            keep = next((k for k in range(min(len(OPEN_TAG) - 1, len(buf)), 0, -1) if buf.endswith(OPEN_TAG[:k])), 0)
            out, self._held = buf[:len(buf) - keep], buf[len(buf) - keep:]
        if not self._shown and not out.strip():
            self._held = out + self._held
            return "", ""
        self._shown = True
        return out, ""

    def finish(self) -> tuple[str, list[P.ToolCall]]:
        held, self._held = self._held, ""
        if self.plan.mode == "named":
            return "", [_call(self.plan.name, self.arguments)]
        if self.plan.mode == "required" or (self.plan.mode == "auto" and self._calling):
            content, calls = self.plan.parse(held)
            if calls:
                return "", calls
            return content or "", []
        return (held if self._shown or held.strip() else ""), []


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
        thought = m.reasoning_content if m.reasoning_content is not None else m.reasoning
        if thought is not None:  # Qwen3-style templates show the last turns' reasoning from this field
            msg["reasoning_content"] = thought
        out.append(msg)
    return out


def _arguments(text: str):
    try:
        return json.loads(text)
    except ValueError:  # not JSON: the template gets the text as it came
        return text
