"""Reasoning parsers (`--reasoning-parser NAME`, vLLM's names): a thinking model's `<think>...</think>` block
separated from its answer, as `reasoning_content` / `reasoning` in chat and as a reasoning item in Responses.

    parser = get_parser("qwen3", tokenizer)
    thinking = parser.starts_thinking(generation_prompt(tokenizer, messages, options), options)
    r, content = parser.split(text, thinking)                 # a whole output
    stream = parser.stream(thinking); d = stream.feed(delta)  # d.reasoning, d.content; stream.finish() at the end
    gate = parser.gate(thinking)                              # runtime: the grammar applies once gate.ended

How the families behave (vLLM's `deepseek_r1` and `qwen3` parsers):
- the output starts inside the reasoning: R1 distills' templates open `<think>` in the prompt, Qwen3's leave it
  to the model, which writes it first; a `<think>` the model writes before any reasoning is dropped;
- everything before `</think>` is reasoning; an output cut before it is all reasoning (no content);
- the generation prompt can close the block already (Qwen3 with `enable_thinking: false` renders
  `<think>\n\n</think>\n\n` there): then the whole output is content, whatever tags it holds;
- `qwen3` also reads `enable_thinking` from chat_template_kwargs when its template renders no tag.

Text is split, not token ids, so a tag the tokenizer writes in several tokens splits alike; a suffix that may be a
tag's beginning is held back until the next delta decides. Whitespace around the block is dropped as the Qwen3 and
R1 templates drop it when they read a reasoning turn back (`.strip('\n')`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ortlora.errors import OrtloraError
from ortlora.runtime.constraints import ReasoningGate


@dataclass(frozen=True)
class Split:
    """What a piece of output adds to the reasoning and to the answer."""
    reasoning: str = ""
    content: str = ""


class ReasoningStream:
    """One choice's output split as it streams; `thinking`: whether it starts inside the reasoning."""

    def __init__(self, start: str, end: str, thinking: bool):
        self.start, self.end = start, end
        self.thinking = thinking
        self._held = ""  # text that may be a tag's beginning, or whitespace that may precede the end tag
        self._fresh_reasoning = True  # no reasoning text yet: leading whitespace and a `<think>` are dropped
        self._fresh_content = True  # no answer text yet: leading whitespace is dropped

    @property
    def ended(self) -> bool:
        return not self.thinking

    def feed(self, text: str) -> Split:
        if not self.thinking:
            return Split(content=self._content(text))
        buf = self._held + text
        self._held = ""
        if self._fresh_reasoning:
            buf = buf.lstrip()
            if buf.startswith(self.start):
                buf = buf[len(self.start):].lstrip()
            elif self.start.startswith(buf):  # maybe the opening tag, not complete yet
                self._held = buf
                return Split()
            if not buf:
                return Split()
            self._fresh_reasoning = False
        at = buf.find(self.end)
        if at >= 0:
            self.thinking = False
            return Split(reasoning=buf[:at].rstrip(), content=self._content(buf[at + len(self.end):]))
        keep = _tag_prefix(buf, self.end)
        body, tail = buf[:len(buf) - keep], buf[len(buf) - keep:]
        stripped = body.rstrip()  # whitespace right before `</think>` is not reasoning
        self._held = body[len(stripped):] + tail
        return Split(reasoning=stripped)

    def finish(self) -> Split:
        """The end of the output: what was held back was reasoning after all (an output cut inside it)."""
        held, self._held = self._held, ""
        if self.thinking and not self._fresh_reasoning:
            return Split(reasoning=held.rstrip())
        return Split()

    def _content(self, text: str) -> str:
        if self._fresh_content:
            text = text.lstrip()
            self._fresh_content = not text
        return text


def _tag_prefix(text: str, tag: str) -> int:
    """The length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ReasoningParser:
    """One family's tags and defaults, bound to a tokenizer (for the end tag's token ids the gate matches)."""
    name = "deepseek_r1"
    start, end = "<think>", "</think>"

    def __init__(self, tokenizer):
        self.end_ids = tuple(tokenizer.encode(self.end, add_special_tokens=False))
        if not self.end_ids:
            raise OrtloraError(f"reasoning parser {self.name!r}: the tokenizer encodes {self.end!r} to no tokens")

    def default_thinking(self, template_kwargs: dict[str, Any]) -> bool:
        """Whether the output starts in the reasoning when the generation prompt shows no tag."""
        return True

    def starts_thinking(self, generation_prompt: str, template_kwargs: dict[str, Any] | None = None) -> bool:
        """From the text the template adds for the answer (or the final message being continued): its last tag
        decides; without one, the family's default."""
        opened, closed = generation_prompt.rfind(self.start), generation_prompt.rfind(self.end)
        if opened < 0 and closed < 0:
            return self.default_thinking(template_kwargs or {})
        return opened > closed

    def stream(self, thinking: bool = True) -> ReasoningStream:
        return ReasoningStream(self.start, self.end, thinking)

    def split(self, text: str, thinking: bool = True) -> tuple[str | None, str | None]:
        """A whole output as (reasoning, content), None for an empty part: the stream's rules, in one piece."""
        stream = self.stream(thinking)
        a, b = stream.feed(text), stream.finish()
        return (a.reasoning + b.reasoning) or None, (a.content + b.content) or None

    def count(self, token_ids: list[int], thinking: bool = True) -> int:
        """How many of an output's tokens are reasoning: up to and including the end tag's."""
        if not thinking:
            return 0
        gate = self.gate(True)
        for n, token in enumerate(token_ids, 1):
            if gate.feed(token):
                return n
        return len(token_ids)

    def gate(self, thinking: bool = True) -> ReasoningGate:
        """For the engine: a grammar applies to the tokens after the end tag (or from the first, if not thinking)."""
        return ReasoningGate(self.end_ids, open=thinking)


class Qwen3Parser(ReasoningParser):
    name = "qwen3"

    def default_thinking(self, template_kwargs: dict[str, Any]) -> bool:
        return template_kwargs.get("enable_thinking", True) is not False


PARSERS: dict[str, type[ReasoningParser]] = {"deepseek_r1": ReasoningParser, "qwen3": Qwen3Parser}


def get_parser(name: str, tokenizer) -> ReasoningParser:
    try:
        cls = PARSERS[name]
    except KeyError:
        raise OrtloraError(f"unknown reasoning parser {name!r}; known: {', '.join(sorted(PARSERS))}") from None
    return cls(tokenizer)


def generation_prompt(tokenizer, messages: list[dict], options: dict[str, Any]) -> str:
    """The text the template writes after the conversation (the answer's opening), where R1 distills open and
    Qwen3 without thinking closes the reasoning block; with `continue_final_message`, the final message itself."""
    if options.get("continue_final_message"):
        content = messages[-1].get("content") if messages else ""
        return content if isinstance(content, str) else ""
    if not options.get("add_generation_prompt", True):
        return ""
    rest = {k: v for k, v in options.items() if k not in ("add_generation_prompt", "continue_final_message")}
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **rest)
    bare = tokenizer.apply_chat_template(messages, add_generation_prompt=False, **rest)
    # a template that renders the history differently with the generation prompt: its tail stands in
    return full[len(bare):] if full.startswith(bare) else full[-64:]


def chat_delta(split: Split) -> dict[str, str]:
    """A chat stream delta's reasoning fields (both names, as vLLM sends them)."""
    return {"reasoning_content": split.reasoning, "reasoning": split.reasoning} if split.reasoning else {}
