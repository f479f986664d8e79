"""vLLM's tokenizer endpoints, as lm-evaluation-harness (`tokenizer_backend=remote`) and other clients call them:

    POST /tokenize        {prompt | messages, add_special_tokens, return_token_strs, ...} -> TokenizeResponse
    POST /detokenize      {tokens}                                                         -> {prompt}
    GET  /tokenizer_info  tokenizer_config.json's fields plus the effective special tokens and chat template
    GET  /version         {version}

Pure functions over a `runtime.tokenizer.Tokenizer`; the route only authenticates and calls them (off the event
loop: tokenizing a long text takes a while).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, model_validator

from ortlora import __version__
from ortlora.errors import OrtloraError
from ortlora.serve import protocol as P
from ortlora.serve.errors import APIError, FieldError, validation_error


class _Body(P.Unicode):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = Field(None, description="accepted; every model here shares one tokenizer")


class TokenizeRequest(_Body):
    """Either `prompt` (text) or `messages` (rendered by the chat template first), as vLLM takes them."""
    prompt: StrictStr | None = None
    messages: list[P.ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: StrictBool | None = Field(None, description="default: true for a prompt, false for messages "
                                                                    "(the template writes them)")
    return_token_strs: StrictBool = Field(False, description="also the tokens' vocabulary spellings")
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[P.Tool] | None = None

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise FieldError("prompt", "send exactly one of prompt and messages")
        if self.continue_final_message and self.add_generation_prompt:
            raise FieldError("continue_final_message", "continue_final_message needs add_generation_prompt: false")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Body):
    tokens: list[StrictInt]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """tokenizer_config.json as the model folder has it (so `extra` fields pass through), with the fields clients
    read filled in from what the server uses."""
    model_config = ConfigDict(extra="allow")
    tokenizer_class: str
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    chat_template: str | None
    model_max_length: int
    vocab_size: int


class Version(BaseModel):
    version: str


def tokenize(tokenizer, body: TokenizeRequest, context_length: int) -> TokenizeResponse:
    if body.prompt is not None:
        special = True if body.add_special_tokens is None else body.add_special_tokens
        ids = tokenizer.encode(body.prompt, add_special_tokens=special)
    else:
        from ortlora.serve.tools import template_messages

        try:
            chat = P.ChatCompletionRequest(model=body.model or "", messages=body.messages, tools=body.tools,
                                           chat_template_kwargs=body.chat_template_kwargs,
                                           add_generation_prompt=body.add_generation_prompt,
                                           continue_final_message=body.continue_final_message)
        except ValidationError as exc:  # e.g. continuing a final message that is not the assistant's
            raise validation_error(exc.errors()) from None
        extra = {"tools": [t.model_dump(exclude_none=True) for t in body.tools]} if body.tools else {}
        try:
            text = tokenizer.apply_chat_template(template_messages(chat), **chat.template_options(), **extra)
        except OrtloraError as exc:
            raise APIError(400, str(exc), param="messages") from None
        except Exception as exc:  # jinja2 TemplateError: the template refused these messages
            raise APIError(400, f"the model's chat template refused the messages: {exc}", param="messages") from None
        ids = tokenizer.encode(text, add_special_tokens=bool(body.add_special_tokens))
    strs = [tokenizer.id_to_token(t) or "" for t in ids] if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=context_length, tokens=ids, token_strs=strs)


def detokenize(tokenizer, body: DetokenizeRequest) -> DetokenizeResponse:
    bad = [t for t in body.tokens if not 0 <= t < tokenizer.vocab_size]
    if bad:
        raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary [0, {tokenizer.vocab_size})",
                       param="tokens")
    return DetokenizeResponse(prompt=tokenizer.decode(body.tokens, skip_special_tokens=False))


def tokenizer_info(tokenizer, context_length: int) -> TokenizerInfo:
    config = {k: v for k, v in tokenizer.config.items() if k != "added_tokens_decoder"}  # large, and vLLM omits it
    pad = config.get("pad_token")
    return TokenizerInfo(**{
        **config, "tokenizer_class": config.get("tokenizer_class") or "PreTrainedTokenizerFast",
        "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
        "pad_token": pad.get("content") if isinstance(pad, dict) else pad, "chat_template": tokenizer.chat_template,
        "model_max_length": context_length, "vocab_size": tokenizer.vocab_size})


def version() -> Version:
    return Version(version=__version__)
