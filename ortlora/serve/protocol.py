"""OpenAI's request and response shapes (completions, chat completions, models) plus ortlora's adapter API.

Unknown top-level request fields are accepted and ignored with a logged warning (vLLM's behaviour: clients send
fields of newer API versions); OpenAI fields ortlora cannot honour are a 400 that says "not supported". A few extra
fields that vLLM also accepts (`ignore_eos`, `top_k`, `min_p`, `repetition_penalty`, `min_tokens`,
`stop_token_ids`) are honoured.
ortlora's own extras: `adapter_scale` (the adapter's strength) and `adapters` (an exact weighted combination).

vLLM's request fields, and where each is honoured:
- `structured_outputs` {json, regex, choice, grammar, json_object} and the older `guided_*` names: one grammar
  (`translate.output_grammar` -> runtime/constraints.py), a 400 naming the field when it does not compile;
- `chat_template_kwargs`, `add_generation_prompt`, `continue_final_message`: the chat template's rendering
  (`ChatCompletionRequest.template_options` -> runtime/tokenizer.py `apply_chat_template`);
- `return_tokens_as_token_ids`: logprob tokens written `token_id:N` (`openai_compat.TokenText`);
- `prompt_logprobs`: the prompt's logprobs (`openai_compat.prompt_logprobs_json`, scored as `echo` is);
- `include_stop_str_in_output`, `skip_special_tokens`: the engine's detokenizing and stop-string scan
  (SamplingParams -> runtime request).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, StrictFloat, StrictInt, StrictStr,
                      field_validator, model_validator)

from ortlora.serve.errors import FieldError

MAX_N = 16
_Text = Annotated[StrictStr, Field(min_length=1)]
MAX_STOP = 16
MAX_LOGPROBS = 20
_TOKEN_ID = re.compile(r"[0-9]{1,9}")  # ASCII digits only ("²".isdigit() is true, int("²") fails)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


def lone_surrogate(value: Any) -> str | None:
    """Where in a JSON value a string holds a lone surrogate (JSON's "\\ud800" escape parses to one, but it is not
    Unicode text: tokenizers and file names refuse it), as `messages.[0].content`; None if nowhere."""
    stack: list[tuple[Any, tuple]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return ".".join(f"[{p}]" if isinstance(p, int) else _printable(str(p)[:40]) for p in path) or "body"
        elif isinstance(item, dict):
            stack.extend((k, path + (k,)) for k in item)  # a key may hold one too
            stack.extend((v, path + (k,)) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, path + (i,)) for i, v in enumerate(item))
    return None


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")  # a surrogate as its \\ud800 escape


class Unicode(BaseModel):
    """A request body whose every string is Unicode text (checked once, over the whole body, before its fields)."""

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data):
        where = lone_surrogate(data)
        if where is not None:
            raise FieldError(where, "the text holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which is "
                                    "not valid Unicode")
        return data


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


class StructuredOutputs(_Request):
    """vLLM's `structured_outputs`: exactly one of json, regex, choice, grammar, json_object."""
    json_: dict[str, Any] | StrictBool | StrictStr | None = Field(None, alias="json",
                                                                  description="a JSON schema (object or text)")
    regex: StrictStr | None = Field(None, min_length=1, description="the whole output matches it (Rust regex syntax)")
    choice: list[StrictStr] | None = Field(None, min_length=1, max_length=1024,
                                           description="the output is one of these")
    grammar: StrictStr | None = Field(None, min_length=1, description="a Lark or GBNF grammar")
    json_object: StrictBool | None = Field(None, description="any JSON object")
    structural_tag: Any = None
    whitespace_pattern: StrictStr | None = None
    disable_additional_properties: StrictBool | None = None
    # accepted: llguidance never falls back, and its JSON is compact already
    disable_fallback: StrictBool | None = None
    disable_any_whitespace: StrictBool | None = None
    _tag = _unsupported("structural_tag", " (send json, regex, choice or grammar)")
    _ws = _unsupported("whitespace_pattern")
    _additional = _unsupported("disable_additional_properties", " (write additionalProperties: false in the schema)")

    @field_validator("json_")
    @classmethod
    def _schema(cls, v):
        if isinstance(v, str):
            import json

            try:
                v = json.loads(v)
            except ValueError as exc:
                raise ValueError(f"json is not valid JSON: {exc}") from None
            if not isinstance(v, (dict, bool)):
                raise ValueError("json must be a JSON schema (an object)")
        return v

    def constraint(self) -> tuple[str, Any] | None:
        """(kind, value) of the one constraint set: kind is json, regex, choice, grammar or json_object."""
        set_ = [(k, v) for k, v in (("json", self.json_), ("regex", self.regex), ("choice", self.choice),
                                    ("grammar", self.grammar), ("json_object", self.json_object or None))
                if v is not None]
        return set_[0] if set_ else None

    @model_validator(mode="after")
    def _one(self):
        kinds = [k for k, v in (("json", self.json_), ("regex", self.regex), ("choice", self.choice),
                                ("grammar", self.grammar), ("json_object", self.json_object or None)) if v is not None]
        if len(kinds) != 1:
            raise FieldError("structured_outputs", "structured_outputs must set exactly one of json, regex, choice, "
                                                   f"grammar, json_object (got {kinds or 'none'})")
        return self


_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


MAX_COMBINED = 8  # adapters in one weighted combination


class AdapterWeight(_Request):
    name: StrictStr = Field(description="an adapter the API key may use")
    weight: StrictFloat = Field(1.0, ge=-100, le=100, allow_inf_nan=False)


class _Sampling(Unicode):
    """Fields shared by both generation endpoints; unknown ones are kept in `model_extra` (warned about, ignored)."""
    model_config = ConfigDict(extra="allow")
    model: StrictStr = Field(description="an adapter name, or the base model's name (see GET /v1/models)")
    temperature: StrictFloat | None = Field(1.0, ge=0, le=2, description="0 = greedy")
    top_p: StrictFloat | None = Field(1.0, gt=0, le=1)
    n: StrictInt | None = Field(1, ge=1, le=MAX_N, description="choices to generate for each prompt")
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = Field(None, description=f"up to {MAX_STOP} stop strings")
    seed: StrictInt | None = Field(None, ge=0, lt=2**63)
    presence_penalty: StrictFloat | None = Field(0.0, ge=-2, le=2)
    frequency_penalty: StrictFloat | None = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, Annotated[StrictFloat, Field(ge=-100, le=100)]] | None = Field(
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
    min_p: StrictFloat = Field(0.0, ge=0, lt=1)
    repetition_penalty: StrictFloat = Field(1.0, ge=0.01, le=100)
    min_tokens: StrictInt = Field(0, ge=0)
    stop_token_ids: list[StrictInt] | None = Field(None, max_length=64)
    structured_outputs: StructuredOutputs | None = Field(
        None, description="vLLM's constraints: exactly one of json, regex, choice, grammar, json_object")
    guided_json: dict[str, Any] | StrictStr | None = Field(None, description="older name of structured_outputs.json")
    guided_regex: StrictStr | None = Field(None, min_length=1, description="older name of structured_outputs.regex")
    guided_choice: list[StrictStr] | None = Field(None, min_length=1,
                                                  description="older name of structured_outputs.choice")
    guided_grammar: StrictStr | None = Field(None, min_length=1, description="older name of structured_outputs.grammar")
    guided_decoding_backend: StrictStr | None = Field(None, description="accepted; llguidance serves every kind")
    guided_whitespace_pattern: StrictStr | None = None
    _guided_ws = _unsupported("guided_whitespace_pattern")
    include_stop_str_in_output: StrictBool = Field(False, description="keep the stop string that ended a choice")
    skip_special_tokens: StrictBool = Field(True, description="leave special tokens out of the text")
    prompt_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                              description="the prompt tokens' logprobs and this many alternatives")
    return_tokens_as_token_ids: StrictBool = Field(False, description="logprob tokens written as `token_id:N`")
    _structured_param: str = PrivateAttr("structured_outputs")  # the field a structured constraint came in
    # ortlora extras: adapter strength and combinations (exact; derived adapters are cached by recipe)
    adapter_scale: StrictFloat = Field(1.0, ge=-100, le=100, allow_inf_nan=False,
                                 description="multiplies the adapter's delta (0 = the base model)")
    adapters: list[AdapterWeight] | None = Field(
        None, min_length=1, max_length=MAX_COMBINED,
        description="run sum(weight * adapter) instead of the adapter `model` names (names must be distinct)")

    @field_validator("logit_bias")
    @classmethod
    def _token_keys(cls, v):
        bad = [k[:20] for k in (v or {}) if not _TOKEN_ID.fullmatch(k)]
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

    @model_validator(mode="after")
    def _structured(self):
        """The `guided_*` aliases fold into `structured_outputs`; only one way of constraining the output."""
        guided = {name: getattr(self, name) for name in _GUIDED if getattr(self, name) is not None}
        if len(guided) > 1 or (guided and self.structured_outputs is not None):
            names = sorted(guided) + (["structured_outputs"] if self.structured_outputs is not None else [])
            raise FieldError(names[0], f"set only one of {', '.join(names)}")
        if guided:
            name, value = next(iter(guided.items()))
            self.structured_outputs = StructuredOutputs.model_validate({_GUIDED[name]: value})
            self._structured_param = name
        if self.structured_outputs is not None and self.response_format is not None \
                and self.response_format.type != "text":
            raise FieldError(self._structured_param, f"{self._structured_param} and response_format cannot both "
                                                     "constrain the output")
        if self.prompt_logprobs is not None and self.stream:
            raise FieldError("prompt_logprobs", "prompt_logprobs are not available when stream is true")
        return self

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
    reasoning_content: StrictStr | None = Field(None, description="an assistant's earlier reasoning (templates that "
                                                                  "show it read `reasoning_content`)")
    reasoning: StrictStr | None = Field(None, description="the same, vLLM's newer name")

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


_TEMPLATE_RESERVED = {"messages", "tools", "add_generation_prompt", "continue_final_message", "bos_token",
                      "eos_token"}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1, description="default: the rest of the context")
    max_completion_tokens: StrictInt | None = Field(None, ge=1, description="same as max_tokens")
    logprobs: StrictBool | None = Field(False, description="the sampled tokens' logprobs")
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS, description="alternatives per token")
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = Field(None, description="default true")
    # vLLM's chat template fields
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="extra variables for the chat template (e.g. enable_thinking)")
    add_generation_prompt: StrictBool = Field(True, description="end the prompt with the assistant turn's opening")
    continue_final_message: StrictBool = Field(
        False, description="continue the last (assistant) message instead of starting a new one")
    chat_template: StrictStr | None = None
    _template = _unsupported("chat_template", " (the model folder's chat template is used)")
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

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, v):
        taken = sorted(set(v or ()) & _TEMPLATE_RESERVED)
        if taken:
            raise ValueError(f"{', '.join(taken)} cannot be set in chat_template_kwargs (set by the request itself)")
        return v

    def template_options(self) -> dict[str, Any]:
        """Keyword arguments of `Tokenizer.apply_chat_template` beyond messages and tools."""
        return {**(self.chat_template_kwargs or {}), "add_generation_prompt": self.add_generation_prompt,
                "continue_final_message": self.continue_final_message}

    @model_validator(mode="after")
    def _consistent(self):
        if self.continue_final_message and self.add_generation_prompt:
            raise FieldError("continue_final_message", "continue_final_message needs add_generation_prompt: false "
                                                       "(the final message is continued, not answered)")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise FieldError("continue_final_message", "continue_final_message needs the last message to be the "
                                                       "assistant's")
        if self.structured_outputs is not None and self.tool_choice not in (None, "none", "auto") and self.tools:
            raise FieldError("tool_choice", f"{self._structured_param} and a required tool call cannot both "
                                            "constrain the output")
        if self.top_logprobs and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs needs logprobs: true")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise FieldError("tool_choice", "tool_choice needs tools")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {t.function.name for t in self.tools or ()}
            if self.tool_choice.function.name not in names:
                raise FieldError("tool_choice", f"tool_choice names {self.tool_choice.function.name!r}, which is not "
                                                f"among the tools {sorted(names)}")
        if self.response_format is not None and self.response_format.type != "text" \
                and self.tool_choice not in (None, "none", "auto") and self.tools:
            raise FieldError("response_format", "response_format and a required tool call cannot both constrain "
                                                "the output")
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
    """vLLM's entry of `prompt_logprobs`: one per token id (the prompt's own and the alternatives)."""
    logprob: float
    rank: int | None = Field(description="1 = the most likely token; null when below the alternatives asked for")
    decoded_token: str


PromptLogprobs = list[dict[str, PromptLogprob] | None]  # per prompt position, keyed by token id; null first


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
    reasoning_content: str | None = _absent  # with --reasoning-parser (llama.cpp's and vLLM's older name)
    reasoning: str | None = _absent  # vLLM's name


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


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = _absent
    prompt_logprobs: PromptLogprobs | None = _absent


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


class LoadAdapterRequest(_Request, Unicode):
    name: StrictStr = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    path: StrictStr | None = Field(None, min_length=1, max_length=4096,
                                   description="an .onnx_adapter file (or PEFT folder) inside the server's adapters "
                                               "directory")
    url: StrictStr | None = Field(None, min_length=1, max_length=4096,
                                  description="an .onnx_adapter file (or, without that suffix, a PEFT folder) at an "
                                              "http(s)://, s3://, gs:// or hf:// URL under a prefix the server allows "
                                              "(--allow-adapter-urls); fetched by the server into its cache")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.url is None):
            raise FieldError("path", "give exactly one of path (in the adapters directory) and url")
        return self


class VLLMLoadAdapter(_Request, Unicode):
    """vLLM's `POST /v1/load_lora_adapter` body."""
    lora_name: StrictStr = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    lora_path: StrictStr = Field(min_length=1, max_length=4096,
                                 description="an .onnx_adapter file inside the server's adapters directory, or a URL "
                                             "under a prefix the server allows (--allow-adapter-urls)")


class VLLMUnloadAdapter(_Request, Unicode):
    lora_name: StrictStr
    lora_int_id: StrictInt | None = None


class AdapterInfo(BaseModel):
    name: str
    loaded: bool = Field(description="held in memory by the adapter store now")
    path: str | None = Field(None, description="relative to the adapters directory")
    url: str | None = Field(None, exclude_if=lambda v: v is None,
                            description="where the server fetches it (no credentials or query string)")


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
