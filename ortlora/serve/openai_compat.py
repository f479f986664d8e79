"""Engine output shaped as OpenAI answers: logprobs in both endpoints' shapes, tool calls parsed from the text,
whole response bodies, and `system_fingerprint`.
"""

from __future__ import annotations

import codecs
import logging
from dataclasses import dataclass, field, replace

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
    """A token's text and bytes as OpenAI shows them (cached per token id): a token that is not valid UTF-8 on its
    own (part of a character) is written `bytes:\\xe2\\x80`, OpenAI's convention, so such tokens do not all read
    "\ufffd" and collide as completions' `top_logprobs` keys; with `as_ids` (vLLM's return_tokens_as_token_ids)
    every token is `token_id:N`. The bytes are the token's own either way."""

    def __init__(self, tokenizer, as_ids: bool = False):
        self.tokenizer = tokenizer
        self.as_ids = as_ids
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        found = self._cache.get(token)
        if found is None:
            from ortlora.runtime.constraints import token_bytes

            raw = token_bytes(self.tokenizer, token)
            found = self._cache[token] = (self._text(token, raw), list(raw))
        return found

    def _text(self, token: int, raw: bytes) -> str:
        if self.as_ids:
            return f"token_id:{token}"
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


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
    """Completions' shape; a `None` entry is an echoed prompt token nothing predicts (the first one). Offsets count
    the characters of the text before each token (a character split over tokens counts once, at its last)."""
    tokens, values, tops, offsets = [], [], [], []
    chars = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token, lp in zip(token_ids, lps):
        text, raw = texts(token)
        tokens.append(text)
        values.append(lp.logprob if lp is not None else None)
        tops.append(_by_text(texts, lp.top) if lp is not None else None)
        offsets.append(offset)
        offset += len(chars.decode(bytes(raw)))
    return P.CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)


def _by_text(texts: TokenText, top) -> dict[str, float]:
    """Completions key alternatives by text; tokens of equal text (a byte-level and a merged spelling) keep the
    best."""
    out: dict[str, float] = {}
    for t, v in top:
        out.setdefault(texts(t)[0], v)
    return out


def top(scores: list[TokenLogprob | None], k: int | None) -> list[TokenLogprob | None]:
    """Prompt scores with at most `k` alternatives each (echo and prompt_logprobs share one scoring, at the larger
    of their two k)."""
    return [lp if lp is None or k is None or len(lp.top) <= k else replace(lp, top=lp.top[:k]) for lp in scores]


def prompt_logprobs_json(texts: TokenText, prompt: list[int], scores: list[TokenLogprob | None]
                         ) -> list[dict[str, dict] | None]:
    """vLLM's `prompt_logprobs`: per prompt position, {token id: {logprob, rank, decoded_token}} for the prompt's
    own token and the alternatives (the engine's prefill scores them); null for the first position. The prompt
    token's rank is exact (1 + the tokens more likely there), the alternatives' their place among the best."""
    out: list[dict[str, dict] | None] = []
    for token, lp in zip(prompt, scores):
        if lp is None:
            out.append(None)
            continue
        ranks = {t: r for r, (t, _) in enumerate(lp.top, 1)}
        rank = lp.rank if lp.rank is not None else ranks.get(token)
        entry = {str(token): {"logprob": lp.logprob, "rank": rank, "decoded_token": texts(token)[0]}}
        for t, v in lp.top:
            entry.setdefault(str(t), {"logprob": v, "rank": ranks[t], "decoded_token": texts(t)[0]})
        out.append(entry)
    return out


# -- responses -----------------------------------------------------------------------------------------------------
def completion_response(rid: str, created: int, body: P.CompletionRequest, outs: list[Output], usage: P.Usage,
                        echo: list[str], prompts: list[list[int]], texts: TokenText) -> P.CompletionResponse:
    n = body.n or 1
    choices = []
    for i, out in enumerate(outs):
        prefix, prompt = echo[i // n], prompts[i // n]
        logprobs = scored = None
        if body.logprobs is not None:
            ids, lps = out.token_ids[:len(out.logprobs)], list(out.logprobs)
            if body.echo:
                ids, lps = prompt + ids, top(out.prompt_logprobs or [], body.logprobs) + lps
            logprobs = completion_logprobs(texts, ids, lps)
        if body.prompt_logprobs is not None:
            scored = prompt_logprobs_json(texts, prompt, top(out.prompt_logprobs or [], body.prompt_logprobs))
        choices.append(P.CompletionChoice(index=i, text=prefix + out.text, finish_reason=out.finish_reason,
                                          logprobs=logprobs, prompt_logprobs=scored))
    return P.CompletionResponse(id=rid, created=created, model=body.model, usage=usage, choices=choices,
                                system_fingerprint=FINGERPRINT)


def chat_response(rid: str, created: int, body: P.ChatCompletionRequest, outs: list[Output], usage: P.Usage,
                  plan, texts: TokenText, reasoning=None, thinking: bool = True,
                  prompt: list[int] | None = None) -> P.ChatCompletionResponse:
    """`reasoning` (a serve.reasoning.ReasoningParser) splits each output's reasoning off before tools are parsed
    from the answer; `thinking`: whether the output starts inside the reasoning (ReasoningParser.starts_thinking).
    `prompt`: its ids, for `prompt_logprobs` (one list for the request, as vLLM places it)."""
    choices = []
    for i, out in enumerate(outs):
        thought, answer = reasoning.split(out.text, thinking) if reasoning is not None else (None, out.text)
        content, calls = plan.parse(answer) if answer is not None else (None, [])
        reason = "tool_calls" if calls and out.finish_reason == "stop" else out.finish_reason
        logprobs = chat_logprobs(texts, out.logprobs) if body.logprobs else None
        message = P.AssistantMessage(content=content, tool_calls=calls or None, reasoning_content=thought,
                                     reasoning=thought)
        choices.append(P.ChatChoice(index=i, message=message, logprobs=logprobs, finish_reason=reason))
    scored = None
    if body.prompt_logprobs is not None and prompt is not None and outs:
        scored = prompt_logprobs_json(texts, prompt, top(outs[0].prompt_logprobs or [], body.prompt_logprobs))
    return P.ChatCompletionResponse(id=rid, created=created, model=body.model, usage=usage, choices=choices,
                                    system_fingerprint=FINGERPRINT, prompt_logprobs=scored)
