"""The OpenAI Responses API's shapes (`POST /v1/responses`): the request as clients send it, and the Response
object and output items ortlora answers with (checked against OpenAI's OpenAPI document in the tests).

ortlora is stateless here: `previous_response_id`, `store: true`, `background`, `conversation` and stored prompts
are a 400 that says to send the whole conversation in `input`. Only function tools exist; a built-in tool
(web_search, file_search, ...) or a non-text input part is a 400 that names it. Unknown top-level fields are
ignored with a logged warning, as on the other endpoints.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, StrictBool, StrictInt, StrictStr, Tag,
                      field_validator, model_validator)

from ortlora.serve.errors import FieldError
from ortlora.serve.protocol import MAX_COMBINED, MAX_LOGPROBS, MAX_STOP, AdapterWeight

_absent = Field(None, exclude_if=lambda v: v is None)


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore")  # items sent back from an earlier response carry more fields


def _refuse(what: str):
    """A part, item or tool kind ortlora has no use for: a 400 naming it."""
    class Refused(BaseModel):
        model_config = ConfigDict(extra="allow")

        @model_validator(mode="before")
        @classmethod
        def _no(cls, data):
            kind = data.get("type") if isinstance(data, dict) else None
            raise ValueError(f"{what} of type {kind!r} are not supported by ortlora")
    return Refused


def _kind(default: str, known: set[str], tag=lambda kind: f"[{kind}]"):
    """A discriminator on `type` (anything without one: refused, a 400); its tags are bracketed so that error
    locations drop them (serve.errors)."""
    def pick(v):
        kind = v.get("type", default) if isinstance(v, dict) else getattr(v, "type", default)
        return tag(kind) if kind in known else "[refused]"
    return Discriminator(pick)


# -- input -----------------------------------------------------------------------------------------------------
class TextIn(_In):
    type: Literal["input_text", "output_text", "text", "refusal", "reasoning_text", "summary_text"]
    text: StrictStr | None = None
    refusal: StrictStr | None = None

    def value(self) -> str:
        return self.text if self.text is not None else (self.refusal or "")


_TEXTS = ("input_text", "output_text", "text", "refusal", "reasoning_text", "summary_text")
Part = Annotated[Union[Annotated[TextIn, Tag("[text]")], Annotated[_refuse("content parts"), Tag("[refused]")]],
                 _kind("", set(_TEXTS), tag=lambda kind: "[text]")]


def _text(content: str | list[TextIn]) -> str:
    return content if isinstance(content, str) else "".join(p.value() for p in content)


class MessageIn(_In):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: StrictStr | list[Part]

    def text(self) -> str:
        return _text(self.content)


class FunctionCallIn(_In):
    type: Literal["function_call"]
    call_id: StrictStr
    name: StrictStr
    arguments: StrictStr


class FunctionCallOutputIn(_In):
    type: Literal["function_call_output"]
    call_id: StrictStr
    output: StrictStr | list[Part]

    def text(self) -> str:
        return _text(self.output)


class ReasoningIn(_In):
    type: Literal["reasoning"]
    summary: list[Part] = []
    content: list[Part] | None = None

    def text(self) -> str:
        """The reasoning itself when sent back, else its summary (encrypted content cannot be read here)."""
        return _text(self.content) if self.content else _text(self.summary)


_ITEMS = {"message", "function_call", "function_call_output", "reasoning"}
Item = Annotated[Union[Annotated[MessageIn, Tag("[message]")], Annotated[FunctionCallIn, Tag("[function_call]")],
                       Annotated[FunctionCallOutputIn, Tag("[function_call_output]")],
                       Annotated[ReasoningIn, Tag("[reasoning]")],
                       Annotated[_refuse("input items (send messages, function_call and function_call_output; "
                                         "ortlora keeps no stored items)"), Tag("[refused]")]],
                 _kind("message", _ITEMS)]


class FunctionToolIn(_In):
    type: Literal["function"]
    name: StrictStr = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


ToolIn = Annotated[Union[Annotated[FunctionToolIn, Tag("[function]")],
                         Annotated[_refuse("tools (built-in tools: ortlora serves function tools only)"),
                                   Tag("[refused]")]],
                   _kind("", {"function"})]


class ToolChoiceFunction(_In):
    type: Literal["function"]
    name: StrictStr


class TextFormat(_In):
    type: Literal["text", "json_schema", "json_object"]
    name: StrictStr | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: StrictStr | None = None
    strict: StrictBool | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.schema_ is None:
            raise FieldError("text.format.schema", "text.format of type json_schema needs a schema")
        return self


class TextParam(_In):
    format: TextFormat | None = None
    verbosity: StrictStr | None = None  # accepted; the model decides its length


class ReasoningParam(_In):
    effort: StrictStr | None = Field(None, description="passed to the chat template as `reasoning_effort`; "
                                                       "`none` also sets enable_thinking: false")
    summary: StrictStr | None = None  # accepted: the reasoning itself is returned, not a summary
    generate_summary: StrictStr | None = None


_INCLUDES = Literal["message.output_text.logprobs", "reasoning.encrypted_content", "web_search_call.results",
                    "web_search_call.action.sources", "file_search_call.results", "message.input_image.image_url",
                    "computer_call_output.output.image_url", "code_interpreter_call.outputs"]


def _stateless(name: str, hint: str):
    def check(cls, v):
        if v is not None and v is not False:
            raise FieldError(name, f"{name} is not supported: ortlora's Responses API is stateless; {hint}")
        return v
    return field_validator(name, mode="before")(classmethod(check))


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields: warned about, ignored
    model: StrictStr = Field(description="an adapter name, or the base model's name (see GET /v1/models)")
    input: StrictStr | list[Item] = Field(description="text, or messages and items")
    instructions: StrictStr | None = Field(None, description="a system message put first")
    tools: list[ToolIn] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: StrictBool | None = None
    max_tool_calls: StrictInt | None = Field(None, ge=1)
    text: TextParam | None = None
    max_output_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    include: list[_INCLUDES] | None = None
    stream: StrictBool | None = False
    stream_options: dict[str, Any] | None = None  # include_obfuscation: nothing to obfuscate here
    reasoning: ReasoningParam | None = None
    metadata: dict[str, StrictStr] | None = Field(None, max_length=16)
    user: StrictStr | None = None
    safety_identifier: StrictStr | None = None
    prompt_cache_key: StrictStr | None = None
    prompt_cache_retention: StrictStr | None = None
    service_tier: StrictStr | None = None
    truncation: Literal["disabled", "auto"] | None = None
    # stateless: refused when set
    store: StrictBool | None = None
    previous_response_id: StrictStr | None = None
    background: StrictBool | None = None
    conversation: Any = None
    prompt: Any = None
    _store = _stateless("store", "send store: false (or leave it out) and the whole conversation in `input`")
    _previous = _stateless("previous_response_id", "send the whole conversation in `input`")
    _background = _stateless("background", "leave background out")
    _conversation = _stateless("conversation", "send the whole conversation in `input`")
    _prompt = _stateless("prompt", "send the prompt's text in `instructions` and `input`")
    # vLLM's and ortlora's extras, as on chat completions
    seed: StrictInt | None = Field(None, ge=0, lt=2**63)
    stop: StrictStr | list[StrictStr] | None = Field(None, description=f"up to {MAX_STOP} stop strings")
    top_k: StrictInt = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0, lt=1)
    repetition_penalty: float = Field(1.0, ge=0.01, le=100)
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = Field(0, ge=0)
    stop_token_ids: list[StrictInt] | None = Field(None, max_length=64)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, max_length=1024, description="token id (as a string) -> bias added to its logit, as on chat")
    chat_template_kwargs: dict[str, Any] | None = None
    adapter_scale: float = Field(1.0, ge=-100, le=100, allow_inf_nan=False)
    adapters: list[AdapterWeight] | None = Field(None, min_length=1, max_length=MAX_COMBINED)

    @field_validator("truncation")
    @classmethod
    def _truncation(cls, v):
        if v == "auto":
            raise ValueError("truncation auto is not supported: a conversation longer than the context is a 400")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.top_logprobs and "message.output_text.logprobs" not in (self.include or ()):
            raise FieldError("top_logprobs", "top_logprobs needs include: [\"message.output_text.logprobs\"]")
        return self

    def logprobs(self) -> bool:
        return "message.output_text.logprobs" in (self.include or ())


# -- output ----------------------------------------------------------------------------------------------------
class TopLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class LogprobOut(TopLogprobOut):
    top_logprobs: list[TopLogprobOut]


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = []
    logprobs: list[LogprobOut] = []


class MessageOut(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class FunctionCallOut(BaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    status: Literal["in_progress", "completed", "incomplete"]
    call_id: str
    name: str
    arguments: str


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class ReasoningOut(BaseModel):
    id: str
    type: Literal["reasoning"] = "reasoning"
    status: Literal["in_progress", "completed", "incomplete"]
    summary: list[Any] = []
    content: list[ReasoningText]


OutputItem = Union[MessageOut, FunctionCallOut, ReasoningOut]


class FunctionToolOut(BaseModel):
    type: Literal["function"] = "function"
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None
    strict: bool | None


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = InputTokensDetails()
    output_tokens: int
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseErrorOut(BaseModel):
    code: Literal["server_error"] = "server_error"
    message: str


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "failed", "in_progress", "incomplete"]
    completed_at: int | None = None
    error: ResponseErrorOut | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    model: str
    output: list[OutputItem] = []
    parallel_tool_calls: bool = True
    max_tool_calls: int | None = None
    metadata: dict[str, str] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, str] = "auto"
    tools: list[FunctionToolOut] = []
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: int | None = None
    max_output_tokens: int | None = None
    previous_response_id: None = None
    reasoning: dict[str, Any] | None = None
    text: dict[str, Any] = {"format": {"type": "text"}}
    truncation: Literal["disabled"] = "disabled"
    store: bool = False
    background: bool = False
    service_tier: Literal["default"] = "default"
    usage: ResponseUsage | None = _absent
    user: str | None = _absent
