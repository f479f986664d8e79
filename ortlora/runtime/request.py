"""A request and what it yields: sampling (seeded), incremental detokenizing, stop strings, grammar constraints,
logprobs of sampled tokens and of the prompt's own tokens (vLLM's `prompt_logprobs`, completions' `echo`).

A request holds its KV slot and its adapter (a reference counted by `ortlora.runtime.adapters.Adapters`) while the
batch (batch.py) runs it, until it finishes or is cancelled; it owns nothing of the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

import numpy as np

from ortlora.errors import GenerationError, OrtloraError
from ortlora.runtime.adapters import Adapter
from ortlora.runtime.logprobs import TokenLogprob, prompt_logprobs, token_logprob
from ortlora.runtime.sampling import Sampler, SamplingParams
from ortlora.runtime.tokenizer import StreamDecoder, Tokenizer


@dataclass
class Chunk:
    """What one step adds to a request: new text (never half a character), the sampled ids, and at the end why."""
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" (EOS, stop token or string), "length" (max tokens or context), "error"
    error: OrtloraError | None = None  # why it ended with "error" (GenerationError, AdapterInvalid); others go on
    logprobs: list[TokenLogprob] | None = None  # one per sampled id, when the request asked for logprobs
    # the first chunk of a request that asked for prompt_logprobs: one per prompt token (None for the first)
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # every sampled id, the final EOS included
    prompt_tokens: int
    finish_reason: str
    adapter: str | None = None


@dataclass(eq=False)
class SlotLease:
    """A KV slot kept across generations (one conversation): each prompt reuses the cached prefix it shares with
    the previous prompt + output, and only the rest is prefilled."""
    slot: int
    ids: list[int] = field(default_factory=list)  # the tokens whose keys and values the slot holds
    busy: bool = False


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    tokenizer: Tokenizer
    adapter: Adapter | None = None
    eos_ids: frozenset[int] = frozenset()
    slot: int | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    released: bool = False  # the adapter reference went back to the store
    lease: SlotLease | None = None
    reused: int = 0  # prompt tokens whose KV came from the lease
    error: OrtloraError | None = None  # GenerationError, or AdapterInvalid from its adapter's first step
    label: str | None = None  # the adapter's name in messages (a server's store key differs); default its name
    cache_namespace: Hashable = None  # prompt prefixes' KV is reused only within one namespace (a server: tenant)

    def __post_init__(self):
        self.sampler = Sampler(self.params)
        self.scored: list[TokenLogprob | None] = [None]  # the prompt's logprobs so far (prompt_logprobs)
        self.detok: StreamDecoder = self.tokenizer.stream(self.params.skip_special_tokens)
        self._held = ""  # text that may be the start of a stop string
        self._stop_ids = frozenset(self.params.stop_token_ids)
        self._eos_list = sorted(self.eos_ids)
        self.constraint = None  # the grammar's parser (structured outputs), built here from params.grammar
        if self.params.grammar is not None:
            from ortlora.runtime.constraints import Constraint  # llguidance only when a request uses a grammar

            self.constraint = Constraint(self.params.grammar, self.tokenizer, self.eos_ids, self.params.max_new_tokens)
        self.gate = None  # open while a reasoning model thinks: the grammar waits for its end tag
        if self.constraint is not None and self.params.grammar_after:
            from ortlora.runtime.constraints import ReasoningGate

            self.gate = ReasoningGate(self.params.grammar_after)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def context(self) -> list[int]:
        """What the slot must hold before the request decodes: its prompt, and for one resumed after preemption
        also its output but the last token (which its next decode step feeds)."""
        return self.prompt_ids + self.token_ids[:-1] if self.token_ids else self.prompt_ids

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Every prompt position's logits are still needed (so no prefix of the prompt may come from a cache)."""
        return self.params.prompt_logprobs is not None and len(self.scored) < len(self.prompt_ids)

    def score_prompt(self, start: int, logits: np.ndarray) -> None:
        """Logits [n, vocab] of context positions [start, start + n): position i predicts prompt token i + 1."""
        if start + 1 != len(self.scored):
            raise OrtloraError(f"prompt logprobs from position {start}, but {len(self.scored)} are scored")
        ids = self.prompt_ids[start + 1:start + 1 + len(logits)]
        self.scored += prompt_logprobs(logits[:len(ids)], ids, self.params.prompt_logprobs)

    def unscored(self) -> None:
        """The prompt's slot went (preempted before its prompt was in): scoring starts again from the start."""
        if self.wants_prompt_logprobs:
            self.scored = [None]

    def first_chunk(self, logits: np.ndarray | None, context_full: bool) -> Chunk:
        """The prompt is in: its first token (sampled from `logits`), or, asked for none, the end."""
        if self.params.max_new_tokens == 0:
            chunk = self._finish("length", "", [])
        else:
            chunk = self.feed(logits, context_full)
        if self.params.prompt_logprobs is not None:
            chunk.prompt_logprobs = self.scored
        return chunk

    def feed(self, logits: np.ndarray, context_full: bool) -> Chunk:
        """Sample the next token from `logits` [vocab] and return what it adds to the output; a request that
        cannot go on ends with finish_reason "error" (and the error) instead of failing the batch."""
        p = self.params
        history = self.prompt_ids + self.token_ids if p.repetition_penalty != 1.0 else ()
        banned = self._eos_list if len(self.token_ids) < p.min_new_tokens else ()
        try:
            allowed = None
            constrained = self.constraint is not None and (self.gate is None or self.gate.ended)
            if constrained:
                allowed = self.constraint.allowed(len(logits), p.max_new_tokens - len(self.token_ids))
            token = self.sampler(logits, history, banned, generated=self.token_ids, allowed=allowed)
            if constrained:
                self.constraint.advance(token)
            elif self.gate is not None:
                self.gate.feed(token)
        except OrtloraError as exc:
            label = self.label or (self.adapter.name if self.adapter is not None else None)
            name = f"adapter {label!r}" if label else "the base model"
            self.error = GenerationError(f"generation with {name} stopped after {len(self.token_ids)} tokens: {exc}")
            self.finish_reason = "error"
            return Chunk("", [], "error", self.error)
        self.token_ids.append(token)
        logprobs = None if p.logprobs is None else [token_logprob(logits, token, p.logprobs)]
        stop_token = token in self._stop_ids or (token in self.eos_ids and not p.ignore_eos)
        if stop_token:  # the EOS / stop token's own text is not part of the output (unless asked for)
            piece, _ = self._scan((self.detok.add(token) if p.include_stop_str_in_output else "")
                                  + self.detok.flush(), final=True)
            chunk = self._finish("stop", piece, [token])
        else:
            piece, hit = self._scan(self.detok.add(token))
            if hit or (self.constraint is not None and self.constraint.finished):  # the grammar's value is closed
                rest, _ = ("", False) if hit else self._scan(self.detok.flush(), final=True)
                chunk = self._finish("stop", piece + rest, [token])
            elif len(self.token_ids) >= p.max_new_tokens or context_full:
                rest, hit = self._scan(self.detok.flush(), final=True)
                chunk = self._finish("stop" if hit else "length", piece + rest, [token])
            else:
                chunk = self._emit(piece, [token])
        chunk.logprobs = logprobs
        return chunk

    def _scan(self, new: str, final: bool = False) -> tuple[str, bool]:
        """Append `new`; return (the text now safe to emit, whether a stop string ended it). A suffix that may be
        the start of a stop string is held back until the next token decides (or `final` releases it)."""
        stops = self.params.stop
        text = self._held + new
        self._held = ""
        hits = [(text.find(s), -len(s)) for s in stops if s in text]
        if hits:
            at, length = min(hits)  # the first stop string; of two there, the longer
            return text[:at - length if self.params.include_stop_str_in_output else at], True
        if not stops or final:
            return text, False
        hold = 0
        for s in stops:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        self._held = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold], False

    def _emit(self, text: str, ids: list[int]) -> Chunk:
        self.text += text
        return Chunk(text, ids)

    def _finish(self, reason: str, text: str, ids: list[int]) -> Chunk:
        self.finish_reason = reason
        self._held = ""
        chunk = self._emit(text, ids)
        chunk.finish_reason = reason
        return chunk

    def completion(self) -> Completion:
        return Completion(self.text, list(self.token_ids), len(self.prompt_ids), self.finish_reason or "cancelled",
                          self.adapter.name if self.adapter else None)
