"""OpenAI's request and response shapes (completions, chat completions, models) plus ortlora's adapter API.

Requests reject unknown fields (as OpenAI does) so a typo is a clear 400, not a silently ignored setting. A few
extra fields that vLLM also accepts (`ignore_eos`, `top_k`, `min_p`, `repetition_penalty`, `min_tokens`,
`stop_token_ids`) are honoured; OpenAI fields ortlora cannot honour are accepted only at their neutral value.
ortlora's own extras: `adapter_scale` (the adapter's strength) and `adapters` (an exact weighted combination).
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

MAX_N = 16
_Text = Annotated[StrictStr, Field(min_length=1)]
MAX_STOP = 16


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    include_usage: StrictBool = False


MAX_COMBINED = 8  # adapters in one weighted combination


class AdapterWeight(_Request):
    name: StrictStr = Field(description="an adapter the API key may use")
    weight: float = Field(1.0, ge=-100, le=100, allow_inf_nan=False)


class _Sampling(_Request):
    """Fields shared by both generation endpoints."""
    model: StrictStr = Field(description="an adapter name, or the base model's name (see GET /v1/models)")
    temperature: float | None = Field(1.0, ge=0, le=2, description="0 = greedy")
    top_p: float | None = Field(1.0, gt=0, le=1)
    n: StrictInt | None = Field(1, ge=1, le=MAX_N, description="choices to generate for each prompt")
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = Field(None, description=f"up to {MAX_STOP} stop strings")
    seed: StrictInt | None = Field(None, ge=0, lt=2**63)
    presence_penalty: float | None = Field(0.0, description="not supported: only 0")
    frequency_penalty: float | None = Field(0.0, description="not supported: only 0")
    logit_bias: dict[str, float] | None = Field(None, description="not supported: only empty")
    user: StrictStr | None = None
    # Extras (as vLLM accepts them)
    ignore_eos: StrictBool = Field(False, description="keep generating past end-of-sequence (benchmarks)")
    top_k: StrictInt = Field(0, ge=-1, description="0 or -1 = off")
    min_p: float = Field(0.0, ge=0, lt=1)
    repetition_penalty: float = Field(1.0, ge=0.01, le=100)
    min_tokens: StrictInt = Field(0, ge=0)
    stop_token_ids: list[StrictInt] | None = Field(None, max_length=64)
    # ortlora extras: adapter strength and combinations (exact; derived adapters are cached by recipe)
    adapter_scale: float = Field(1.0, ge=-100, le=100, allow_inf_nan=False,
                                 description="multiplies the adapter's delta (0 = the base model)")
    adapters: list[AdapterWeight] | None = Field(
        None, min_length=1, max_length=MAX_COMBINED,
        description="run sum(weight * adapter) instead of the adapter `model` names (names must be distinct)")

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _zero(cls, v):
        if v:
            raise ValueError("not supported by ortlora (only 0); use repetition_penalty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _empty(cls, v):
        if v:
            raise ValueError("not supported by ortlora (only null or {})")
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

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Sampling):
    prompt: _Text | Annotated[list[_Text], Field(min_length=1)] | Annotated[list[StrictInt], Field(min_length=1)] \
        | Annotated[list[Annotated[list[StrictInt], Field(min_length=1)]], Field(min_length=1)] = Field(
        description="text, a batch of texts, token ids, or a batch of token-id lists")
    max_tokens: StrictInt | None = Field(16, ge=1, description="new tokens per choice (default 16, as OpenAI)")
    echo: StrictBool | None = Field(False, description="prefix each choice with its prompt")
    logprobs: None = Field(None, description="not supported: only null")
    best_of: StrictInt | None = Field(None, ge=1, le=MAX_N, description="accepted only equal to n")
    suffix: StrictStr | None = Field(None, description="not supported: only null or empty")

    @field_validator("logprobs", mode="before")
    @classmethod
    def _no_logprobs(cls, v):
        if v is not None:
            raise ValueError("logprobs are not supported by ortlora (only null)")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        if v:
            raise ValueError("suffix is not supported by ortlora")
        return v


class TextPart(_Request):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1, description="default: the rest of the context")
    max_completion_tokens: StrictInt | None = Field(None, ge=1, description="same as max_tokens")
    logprobs: Literal[False] | None = Field(False, description="not supported: only false")
    top_logprobs: None = Field(None, description="not supported: only null")

    @field_validator("logprobs", "top_logprobs", mode="before")
    @classmethod
    def _no_logprobs(cls, v):
        if v is not None and v is not False:
            raise ValueError("logprobs are not supported by ortlora")
        return v


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length"]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


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
