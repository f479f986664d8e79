"""Engine output shaped as OpenAI answers: logprobs in both endpoints' shapes, tool calls parsed from the text,
whole response bodies, and `system_fingerprint`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ortlora import __version__
from ortlora.runtime.logprobs import TokenLogprob
from ortlora.serve import protocol as P

log = logging.getLogger("ortlora.serve")
FINGERPRINT = f"fp_ortlora_{__version__}"


@dataclass
class Output:
    """One choice as it came from the engine."""
    text: str = ""
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # when asked: per prompt position


def warn_ignored(body) -> None:
    """Unknown request fields are ignored (as vLLM does); say so once per request in the log."""
    if body.model_extra:
        log.warning("ignoring unknown request fields: %s", ", ".join(sorted(body.model_extra)))


# -- logprobs ------------------------------------------------------------------------------------------------------
class TokenText:
    """A token's text and bytes as OpenAI shows them (cached per token id)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        found = self._cache.get(token)
        if found is None:
            from ortlora.runtime.constraints import token_bytes

            raw = token_bytes(self.tokenizer, token)
            found = self._cache[token] = (raw.decode("utf-8", errors="replace"), list(raw))
        return found


def chat_logprobs(texts: TokenText, lps: list[TokenLogprob]) -> P.ChoiceLogprobs:
    return P.ChoiceLogprobs(content=[_chat_token(texts, lp) for lp in lps])


def chat_logprobs_json(texts: TokenText, lps: list[TokenLogprob]) -> dict:
    return {"content": [_chat_token(texts, lp).model_dump() for lp in lps], "refusal": None}


def _chat_token(texts: TokenText, lp: TokenLogprob) -> P.TokenLogprob:
    text, raw = texts(lp.token)
    top = [P.TopLogprob(token=texts(t)[0], logprob=v, bytes=texts(t)[1]) for t, v in lp.top]
    return P.TokenLogprob(token=text, logprob=lp.logprob, bytes=raw, top_logprobs=top)


def completion_logprobs(texts: TokenText, token_ids: list[int], lps: list[TokenLogprob | None],
                        offset: int = 0) -> P.CompletionLogprobs:
    """Completions' shape; a `None` entry is an echoed prompt token nothing predicts (the first one)."""
    tokens, values, tops, offsets = [], [], [], []
    for token, lp in zip(token_ids, lps):
        text = texts(token)[0]
        tokens.append(text)
        values.append(lp.logprob if lp is not None else None)
        tops.append(_by_text(texts, lp.top) if lp is not None else None)
        offsets.append(offset)
        offset += len(text)
    return P.CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)


def _by_text(texts: TokenText, top) -> dict[str, float]:
    """Completions key alternatives by text: tokens with equal text (parts of one character) keep the best."""
    out: dict[str, float] = {}
    for t, v in top:
        out.setdefault(texts(t)[0], v)
    return out


# -- responses -----------------------------------------------------------------------------------------------------
def completion_response(rid: str, created: int, body: P.CompletionRequest, outs: list[Output], usage: P.Usage,
                        echo: list[str], prompts: list[list[int]], texts: TokenText) -> P.CompletionResponse:
    n = body.n or 1
    choices = []
    for i, out in enumerate(outs):
        prefix = echo[i // n]
        logprobs = None
        if body.logprobs is not None:
            ids, lps = out.token_ids[:len(out.logprobs)], list(out.logprobs)
            if body.echo:
                ids, lps = prompts[i // n] + ids, list(out.prompt_logprobs or ()) + lps
            logprobs = completion_logprobs(texts, ids, lps)
        choices.append(P.CompletionChoice(index=i, text=prefix + out.text, finish_reason=out.finish_reason,
                                          logprobs=logprobs))
    return P.CompletionResponse(id=rid, created=created, model=body.model, usage=usage, choices=choices,
                                system_fingerprint=FINGERPRINT)


def chat_response(rid: str, created: int, body: P.ChatCompletionRequest, outs: list[Output], usage: P.Usage,
                  plan, texts: TokenText) -> P.ChatCompletionResponse:
    choices = []
    for i, out in enumerate(outs):
        content, calls = plan.parse(out.text)
        reason = "tool_calls" if calls and out.finish_reason == "stop" else out.finish_reason
        logprobs = chat_logprobs(texts, out.logprobs) if body.logprobs else None
        choices.append(P.ChatChoice(index=i, message=P.AssistantMessage(content=content, tool_calls=calls or None),
                                    logprobs=logprobs, finish_reason=reason))
    return P.ChatCompletionResponse(id=rid, created=created, model=body.model, usage=usage, choices=choices,
                                    system_fingerprint=FINGERPRINT)
