"""Structured outputs: a grammar (JSON schema, any JSON object, a regex, a choice, Lark or GBNF) turned into a
per-row token mask.

    grammar = json_schema_grammar({"type": "object", ...})     # a string: it travels in SamplingParams
    grammar = regex_grammar("[0-9]{3}") / choice_grammar(["yes", "no"]) / cfg_grammar('root ::= "a" | "b"')
    check(grammar, tokenizer)                                    # OrtloraError naming the problem, at request time
    c = Constraint(grammar, tokenizer, eos_ids)                  # one per request (its parser state)
    allowed = c.allowed()                                        # bool [vocab] for the next token
    c.advance(token); c.finished                                 # finished: the grammar admits nothing more

The engine is llguidance (what onnxruntime-genai uses; Rust, no torch): it reads tokenizer.json itself. Each row
computes its own mask from its own parser, so rows with and without grammars, and with different adapters, share
a decode batch; a row without a grammar costs nothing. Compiled grammars are cached (one prototype parser per
grammar, copied per request; `grammar_cache.py`: bounded in bytes, in total and per tenant), so a schema sent
again is not compiled again.
"""

from __future__ import annotations

import threading
from typing import Iterable

import numpy as np

from ortlora.errors import OrtloraError
from ortlora.runtime.grammar_cache import GrammarBudget, GrammarCache, GrammarError, Hold  # noqa: F401 (re-exported)

# Compact JSON (",", ":" without spaces): a grammar that allows free whitespace lets a weak model emit
# whitespace for ever; OpenAI's structured outputs are compact too.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
CLOSING_TOKENS = 48  # a JSON value a few levels deep closes in far fewer one-byte tokens


def json_schema_grammar(schema: dict | bool | None) -> str:
    """The llguidance grammar for `schema` (None: any JSON object, OpenAI's `json_object`)."""
    import llguidance

    if schema is None:
        schema = {"type": "object"}
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
    except (ValueError, TypeError) as exc:
        raise GrammarError(f"invalid JSON schema: {exc}") from None


def lark_grammar(lark: str) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_lark(lark)


def regex_grammar(pattern: str) -> str:
    """The whole output matches `pattern` (Rust `regex` syntax, as vLLM's guidance backend reads it)."""
    return _grammar_from("regex", pattern, "regular expression")


def choice_grammar(choices: list[str]) -> str:
    """The output is exactly one of `choices`."""
    import json

    return _grammar_from("choice", json.dumps(list(choices)), "choice list")


def cfg_grammar(text: str) -> str:
    """A context-free grammar in Lark syntax (llguidance's) or llama.cpp's GBNF (`root ::= ...`), as vLLM's
    `grammar` field takes either."""
    return _grammar_from("grammar", text, "grammar")


def _grammar_from(kind: str, text: str, what: str) -> str:
    """llguidance's front end for `kind`, checked here so that a bad one is a GrammarError, not an engine failure
    (compiling against a vocabulary comes later, in `check`)."""
    import llguidance

    try:
        grammar = llguidance.grammar_from(kind, text)
    except (ValueError, TypeError) as exc:
        raise GrammarError(f"invalid {what}: {exc}") from None
    problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem:
        raise GrammarError(f"invalid {what}: {problem.strip()}")
    return grammar


_BUILDERS = {"json": json_schema_grammar, "json_object": lambda _: json_schema_grammar(None),
             "regex": regex_grammar, "choice": choice_grammar, "grammar": cfg_grammar}


def grammar_for(kind: str, value) -> str:
    """The grammar of one of vLLM's structured-output kinds: json, json_object, regex, choice, grammar."""
    try:
        build = _BUILDERS[kind]
    except KeyError:
        raise GrammarError(f"unknown structured output kind {kind!r}; known: {', '.join(_BUILDERS)}") from None
    return build(value)


class ReasoningGate:
    """Whether a reasoning model's thinking has ended, fed one sampled token at a time: a grammar (structured
    output, a required tool call) applies only to the answer after it, as vLLM applies it.

        gate = ReasoningGate(end_ids=(151668,), open=True)   # the ids of `</think>`; open: the output starts thinking
        gate.feed(token) -> gate.ended                        # True from the token after the end tag on

    The end tag may be several tokens (a tokenizer without a `</think>` token): it ends when the last tokens equal
    `end_ids`, the tag's canonical tokenization."""

    def __init__(self, end_ids: tuple[int, ...], open: bool = True):
        if not end_ids:
            raise OrtloraError("a reasoning gate needs the end tag's token ids")
        self.end_ids = tuple(int(t) for t in end_ids)
        self.ended = not open
        self._tail: list[int] = []

    def feed(self, token: int) -> bool:
        if not self.ended:
            self._tail = (self._tail + [int(token)])[-len(self.end_ids):]
            self.ended = tuple(self._tail) == self.end_ids
        return self.ended


class _Tokenizers:
    """One llguidance tokenizer per ortlora Tokenizer (building it reads the whole vocabulary: ~1 s at 150k)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_id: dict[tuple, tuple[object, object]] = {}

    def get(self, tokenizer, eos_ids: Iterable[int]):
        import llguidance

        eos = tuple(sorted(set(eos_ids)))
        key = (id(tokenizer), eos)
        with self._lock:
            found = self._by_id.get(key)
            if found is None or found[0] is not tokenizer:
                ll = llguidance.LLTokenizer(tokenizer.to_json(), n_vocab=tokenizer.vocab_size,
                                            eos_token=list(eos) or None)
                found = self._by_id[key] = (tokenizer, ll)
            return found[1]


    def preferences(self, tokenizer, eos_ids: Iterable[int]) -> tuple[np.ndarray, ...]:
        """Bool masks [vocab] of the tokens a value about to close prefers, best first: EOS; a quote that may end a
        string (`"`, `"}`, ...); container ends (`]`, `}`); separators (`,`, `:`); then any one-byte token."""
        ll = self.get(tokenizer, eos_ids)
        key = ("prefs", id(ll))
        with self._lock:
            found = self._by_id.get(key)
        if found is None:
            n = tokenizer.vocab_size
            tiers = tuple(np.zeros(n, bool) for _ in range(5))
            tiers[0][[t for t in ll.eos_tokens if t < n]] = True
            for t in range(n):
                raw = b"" if ll.is_special_token(t) else ll.decode_bytes([t])
                if not raw:
                    continue
                tiers[1][t] = raw[:1] == b'"' and not raw.strip(b'"]}')
                tiers[2][t] = not raw.strip(b"]}")
                tiers[3][t] = not raw.strip(b",:")
                tiers[4][t] = len(raw) == 1
            found = (ll, tiers)
            with self._lock:
                self._by_id[key] = found
        return found[1]


_TOKENIZERS = _Tokenizers()


def token_bytes(tokenizer, token: int) -> bytes:
    """The bytes a token stands for (a byte-level token may hold part of a character); special tokens: their
    text. llguidance maps every tokenizer family (byte-level BPE, byte fallback) to bytes already."""
    ll = _TOKENIZERS.get(tokenizer, ())
    if ll.is_special_token(token):
        return tokenizer.decode([token], skip_special_tokens=False).encode()
    return ll.decode_bytes([token])
GRAMMARS = GrammarCache()  # the process's compiled grammars (a server sizes it from its options)


def _prototype(grammar: str, tokenizer, eos_ids: Iterable[int]):
    """A compiled parser for `grammar` in its start state (cached; see `grammar_cache`)."""
    return GRAMMARS.prototype(_TOKENIZERS.get(tokenizer, eos_ids), grammar)


def check(grammar: str, tokenizer, eos_ids: Iterable[int] = (), tenant: str = "") -> None:
    """Compile `grammar` now (on the request's thread), so a bad schema is a 400 and the engine copies it later
    (cached, charged to `tenant`)."""
    GRAMMARS.hold(_TOKENIZERS.get(tokenizer, eos_ids), grammar, tenant).release()


def hold(grammar: str, tokenizer, eos_ids: Iterable[int] = (), tenant: str = "") -> Hold:
    """Compile (or find) `grammar` and keep it cached until the returned hold is released: a request holds its
    grammar from submission until it ends, so the engine thread finds it compiled."""
    return GRAMMARS.hold(_TOKENIZERS.get(tokenizer, eos_ids), grammar, tenant)


class Constraint:
    """One request's parser: which tokens may come next, and whether the grammar is complete."""

    def __init__(self, grammar: str, tokenizer, eos_ids: Iterable[int] = (), budget: int | None = None):
        self.matcher = _prototype(grammar, tokenizer, eos_ids).deep_copy()
        self.vocab = tokenizer.vocab_size
        self._preferences = _TOKENIZERS.preferences(tokenizer, eos_ids)
        # the last tokens of the budget steer to a close (half the budget at most: a short one is all closing)
        self.closing_from = None if budget is None else min(CLOSING_TOKENS, budget // 2)

    def allowed(self, width: int, left: int | None = None) -> np.ndarray:
        """Bool [width] (the logits' width: ids past the tokenizer's vocabulary are never allowed).

        When only `left` tokens of the budget remain (at most CLOSING_TOKENS), the allowed tokens narrow to the
        first tier of `preferences` that has any, so the value closes within the budget instead of being cut (a
        weak model may otherwise write digits or text until max_tokens): the shortest way out of a string, a
        number, an object or an array."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), np.uint8)
        mask = np.unpackbits(bits, bitorder="little")[:self.vocab].astype(bool)
        if left is not None and self.closing_from is not None and left <= self.closing_from:
            for prefer in self._preferences:
                narrowed = mask & prefer
                if narrowed.any():
                    mask = narrowed
                    break
        if mask.size < width:
            mask = np.concatenate([mask, np.zeros(width - mask.size, bool)])
        return mask[:width]

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise OrtloraError(f"the grammar refused token {token}: {self.matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """Nothing but EOS may follow (the JSON value is closed)."""
        return self.matcher.is_stopped()

    @property
    def complete(self) -> bool:
        """What was generated satisfies the grammar."""
        return self.matcher.is_accepting()
