"""OpenAI's request and response shapes (completions, chat completions, models) plus ortlora's adapter API.

Unknown top-level request fields are accepted and ignored with a logged warning (vLLM's behaviour: clients send
fields of newer API versions); OpenAI fields ortlora cannot honour are a 400 that says "not supported". A few extra
fields that vLLM also accepts (`ignore_eos`, `top_k`, `min_p`, `repetition_penalty`, `min_tokens`,
`stop_token_ids`) are honoured.
ortlora's own extras: `adapter_scale` (the adapter's strength) and `adapters` (an exact weighted combination).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, StrictInt, StrictStr, field_validator,
                      model_validator)

MAX_N = 16
_Text = Annotated[StrictStr, Field(min_length=1)]
MAX_STOP = 16
MAX_LOGPROBS = 20


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _unsupported(name: str, hint: str = ""):
    """A field OpenAI defines that ortlora cannot honour: a 400 "not supported" when set."""
    def check(cls, v):
        if v is not None and v is not False and v != [] and v != "":
            raise ValueError(f"{name} is not supported by ortlora{hint}")
        return v
    return field_validator(name, mode="before")(classmethod(check))


class JSONSchemaFormat(_Request):
    name: StrictStr = Field("response", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="a JSON schema (null: any JSON object)")
    strict: StrictBool | None = Field(None, description="accepted; the output follows the schema either way")


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object")
        return self


class StreamOptions(_Request):
    include_usage: StrictBool = False


MAX_COMBINED = 8  # adapters in one weighted combination


class AdapterWeight(_Request):
    name: StrictStr = Field(description="an adapter the API key may use")
    weight: float = Field(1.0, ge=-100, le=100, allow_inf_nan=False)


class _Sampling(BaseModel):
    """Fields shared by both generation endpoints; unknown ones are kept in `model_extra` (warned about, ignored)."""
    model_config = ConfigDict(extra="allow")
    model: StrictStr = Field(description="an adapter name, or the base model's name (see GET /v1/models)")
    temperature: float | None = Field(1.0, ge=0, le=2, description="0 = greedy")
    top_p: float | None = Field(1.0, gt=0, le=1)
    n: StrictInt | None = Field(1, ge=1, le=MAX_N, description="choices to generate for each prompt")
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = Field(None, description=f"up to {MAX_STOP} stop strings")
    seed: StrictInt | None = Field(None, ge=0, lt=2**63)
    presence_penalty: float | None = Field(0.0, ge=-2, le=2)
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, max_length=1024, description="token id (as a string) -> bias added to its logit, -100 to 100")
    response_format: ResponseFormat | None = Field(None, description="text, json_object or json_schema")
    user: StrictStr | None = None
    # accepted and ignored (bookkeeping fields of OpenAI's platform)
    store: StrictBool | None = None
    metadata: dict[str, StrictStr] | None = None
    service_tier: StrictStr | None = None
    # Extras (as vLLM accepts them)
    ignore_eos: StrictBool = Field(False, description="keep generating past end-of-sequence (benchmarks)")
    top_k: StrictInt = Field(0, ge=-1, description="0 or -1 = off")
    min_p: float = Field(0.0, ge=0, lt=1)
    repetition_penalty: float = Field(1.0, ge=0.01, le=100)
    min_tokens: StrictInt = Field(0, ge=0)
    stop_token_ids: list[StrictInt] | None = Field(None, max_length=64)
    prompt_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                              description="each prompt token's logprob and this many alternatives")
    _grammar: str | None = PrivateAttr(None)  # what the output must follow (response_format, required tools)
    # ortlora extras: adapter strength and combinations (exact; derived adapters are cached by recipe)
    adapter_scale: float = Field(1.0, ge=-100, le=100, allow_inf_nan=False,
                                 description="multiplies the adapter's delta (0 = the base model)")
    adapters: list[AdapterWeight] | None = Field(
        None, min_length=1, max_length=MAX_COMBINED,
        description="run sum(weight * adapter) instead of the adapter `model` names (names must be distinct)")

    @field_validator("logit_bias")
    @classmethod
    def _token_keys(cls, v):
        bad = [k for k in (v or {}) if not k.isdigit()]
        if bad:
            raise ValueError(f"logit_bias keys must be token ids, got {bad[:3]}")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return v

    def logprobs_k(self) -> int | None:
        """None = no logprobs; k = the sampled token's logprob and k alternatives."""
        return self.logprobs if isinstance(self, CompletionRequest) else (
            (self.top_logprobs or 0) if self.logprobs else None)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Sampling):
    prompt: _Text | Annotated[list[_Text], Field(min_length=1)] | Annotated[list[StrictInt], Field(min_length=1)] \
        | Annotated[list[Annotated[list[StrictInt], Field(min_length=1)]], Field(min_length=1)] = Field(
        description="text, a batch of texts, token ids, or a batch of token-id lists")
    max_tokens: StrictInt | None = Field(16, ge=0, description="new tokens per choice (default 16, as OpenAI; 0 "
                                                              "with echo: only score the prompt)")
    echo: StrictBool | None = Field(False, description="prefix each choice with its prompt")
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                       description="the sampled tokens' logprobs and this many alternatives")
    best_of: StrictInt | None = Field(None, ge=1, le=MAX_N, description="accepted only equal to n")
    suffix: StrictStr | None = Field(None, description="not supported: only null or empty")
    _suffix = _unsupported("suffix")


class TextPart(_Request):
    type: Literal["text"]
    text: StrictStr


class FunctionCall(BaseModel):
    name: StrictStr
    arguments: StrictStr = Field(description="a JSON object, as text")


class ToolCall(BaseModel):
    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. `refusal`, `annotations` of a message sent back in history
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant's earlier calls")
    tool_call_id: StrictStr | None = Field(None, description="the call a tool message answers")

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionDefinition(_Request):
    name: StrictStr = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema of the arguments")
    strict: StrictBool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: StrictStr


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1, description="default: the rest of the context")
    max_completion_tokens: StrictInt | None = Field(None, ge=1, description="same as max_tokens")
    logprobs: StrictBool | None = Field(False, description="the sampled tokens' logprobs")
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS, description="alternatives per token")
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = Field(None, description="default true")
    # OpenAI fields ortlora cannot honour: 400 "not supported"
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    functions: Any = None
    function_call: Any = None
    modalities: list[StrictStr] | None = None
    _audio = _unsupported("audio")
    _prediction = _unsupported("prediction")
    _web = _unsupported("web_search_options")
    _functions = _unsupported("functions", " (the deprecated form of tools: send tools)")
    _function_call = _unsupported("function_call", " (the deprecated form of tool_choice: send tool_choice)")

    @field_validator("modalities")
    @classmethod
    def _text_only(cls, v):
        if v and set(v) != {"text"}:
            raise ValueError("modalities other than text are not supported by ortlora")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {t.function.name for t in self.tools or ()}
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not among the "
                                 f"tools {sorted(names)}")
        if self.response_format is not None and self.response_format.type != "text" \
                and self.tool_choice not in (None, "none", "auto") and self.tools:
            raise ValueError("response_format and a required tool call cannot both constrain the output")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length", "tool_calls"]
_absent = Field(None, exclude_if=lambda v: v is None)  # optional in OpenAI's schema: left out, never null


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="null for the first prompt token (echo)")
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(BaseModel):
    """vLLM's shape of one alternative at a prompt position."""
    logprob: float
    rank: int | None = None
    decoded_token: str


PromptLogprobs = list[dict[str, PromptLogprob] | None]  # per prompt token: token id -> alternative; None first


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None
    prompt_logprobs: PromptLogprobs | None = _absent


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = _absent


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCall] | None = _absent


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason
    prompt_logprobs: PromptLogprobs | None = _absent


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = _absent


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str | None = Field(None, description="the base model an adapter applies to")
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoadAdapterRequest(_Request):
    name: StrictStr = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    path: StrictStr = Field(min_length=1, max_length=4096,
                            description="an .onnx_adapter file inside the server's adapters directory")


class VLLMLoadAdapter(_Request):
    """vLLM's `POST /v1/load_lora_adapter` body."""
    lora_name: StrictStr = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    lora_path: StrictStr = Field(min_length=1, max_length=4096,
                                 description="an .onnx_adapter file inside the server's adapters directory")


class VLLMUnloadAdapter(_Request):
    lora_name: StrictStr
    lora_int_id: StrictInt | None = None


class AdapterInfo(BaseModel):
    name: str
    loaded: bool = Field(description="held in memory by the adapter store now")
    path: str | None = Field(None, description="relative to the adapters directory")


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterInfo]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok", "draining"]
    model: str
    running: int
    waiting: int


Prompt = Union[str, list[int]]
