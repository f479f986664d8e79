"""What a request asks beyond plain text, turned into engine settings, and engine output shaped as OpenAI answers:
structured outputs (response_format, required tool calls) as a grammar, logprobs in both endpoints' shapes,
tool calls parsed from the text, and `system_fingerprint`.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field

from ortlora import __version__
from ortlora.runtime.logprobs import TokenLogprob
from ortlora.serve import protocol as P
from ortlora.serve.errors import APIError

log = logging.getLogger("ortlora.serve")
FINGERPRINT = f"fp_ortlora_{__version__}"


@dataclass
class Output:
    """One choice as it came from the engine."""
    text: str = ""
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # from the engine's prefill of the prompt


def warn_ignored(body) -> None:
    """Unknown request fields are ignored (as vLLM does); say so once per request in the log."""
    if body.model_extra:
        log.warning("ignoring unknown request fields: %s", ", ".join(sorted(body.model_extra)))


def grammar_of(server, body, tool_schema: dict | None = None) -> str | None:
    """The llguidance grammar a request's output must follow (None: free text): a required or named tool call's
    schema, else `response_format`'s. Compiled here (cached for the engine), so a bad schema is a 400."""
    from ortlora.runtime import constraints

    if tool_schema is not None:
        schema, param = tool_schema, "tools"
    else:
        fmt = body.response_format
        if fmt is None or fmt.type == "text":
            return None
        schema, param = (fmt.json_schema.schema_ if fmt.type == "json_schema" else None), "response_format"
    try:
        grammar = constraints.json_schema_grammar(schema)
        constraints.check(grammar, server.tokenizer, server.eos_ids)
    except constraints.GrammarError as exc:
        raise APIError(400, str(exc), param=param) from None
    return grammar


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


_TEXTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # server -> TokenText


def token_text(server) -> TokenText:
    if server not in _TEXTS:
        _TEXTS[server] = TokenText(server.tokenizer)
    return _TEXTS[server]


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


def vllm_prompt_logprobs(texts: TokenText, lps: list[TokenLogprob | None] | None) -> list | None:
    """vLLM's `prompt_logprobs`: per prompt token, None for the first, else token id -> (logprob, rank, text) for
    the token there and the k most likely."""
    if lps is None:
        return None
    out: list = []
    for lp in lps:
        if lp is None:
            out.append(None)
            continue
        ranks = {t: i + 1 for i, (t, _) in enumerate(lp.top)}
        entry = {str(lp.token): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": texts(lp.token)[0]}}
        for t, v in lp.top:
            entry.setdefault(str(t), {"logprob": v, "rank": ranks[t], "decoded_token": texts(t)[0]})
        out.append(entry)
    return out


# -- responses -----------------------------------------------------------------------------------------------------
def completion_response(rid: str, created: int, body: P.CompletionRequest, outs: list[Output], usage: P.Usage,
                        echo: list[str], echo_ids: list[list[int]], texts: TokenText) -> P.CompletionResponse:
    n = body.n or 1
    choices = []
    for i, out in enumerate(outs):
        prefix = echo[i // n]
        logprobs = None
        if body.logprobs is not None:
            ids, lps = out.token_ids[:len(out.logprobs)], list(out.logprobs)
            if body.echo:  # the prompt's own logprobs came with the choice's first event
                ids, lps = echo_ids[i // n] + ids, list(out.prompt_logprobs or []) + lps
            logprobs = completion_logprobs(texts, ids, lps)
        choices.append(P.CompletionChoice(index=i, text=prefix + out.text, finish_reason=out.finish_reason,
                                          logprobs=logprobs, prompt_logprobs=vllm_prompt_logprobs(
                                              texts, out.prompt_logprobs) if body.prompt_logprobs is not None
                                          else None))
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
                                    logprobs=logprobs, finish_reason=reason,
                                    prompt_logprobs=vllm_prompt_logprobs(texts, out.prompt_logprobs)))
    return P.ChatCompletionResponse(id=rid, created=created, model=body.model, usage=usage, choices=choices,
                                    system_fingerprint=FINGERPRINT)
