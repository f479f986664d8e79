"""Tokenizer and chat template without transformers: `tokenizer.json` through `tokenizers`, templates through jinja2.

    tok = Tokenizer.from_folder("out")
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}]), add_special_tokens=False)
    stream = tok.stream()            # incremental detokenizer
    text = "".join(stream.add(t) for t in ids) + stream.flush()
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from ortlora.errors import ModelError
from ortlora.model_folder import read_genai_config, read_json

REPLACEMENT = "\ufffd"  # what a byte-level decoder yields for an incomplete UTF-8 sequence


def _token_text(value) -> str | None:
    """tokenizer_config.json spells special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


class Tokenizer:
    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelError(f"{folder} has no tokenizer.json (export copies it from the Hugging Face folder)")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise ModelError(f"{path} cannot be loaded by the tokenizers package: {exc}") from None
        config = read_json(folder / "tokenizer_config.json")
        generation = read_json(folder / "generation_config.json")
        genai = read_genai_config(folder).get("model", {})
        self.config = config  # tokenizer_config.json as written (GET /tokenizer_info shows it)
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.chat_template = self._find_template(folder, config)
        self.special_ids = {int(i) for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        eos = _ids(generation.get("eos_token_id")) or _ids(genai.get("eos_token_id"))
        if self.eos_token is not None and self.token_id(self.eos_token) is not None:
            eos.append(self.token_id(self.eos_token))
        self.eos_ids: list[int] = list(dict.fromkeys(eos))
        self.vocab_size = self._tok.get_vocab_size()

    @staticmethod
    def _find_template(folder: Path, config: dict) -> str | None:
        jinja = folder / "chat_template.jinja"  # transformers >= 4.47 saves it on its own
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        template = config.get("chat_template") or read_json(folder / "chat_template.json").get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        return template

    def max_token_chars(self) -> int:
        """The most characters one token can stand for (at least): bounds the tokens of a text by its length."""
        longest = max((len(t) for t in self._tok.get_vocab(with_added_tokens=True)), default=1)
        return max(longest, 1)

    def to_json(self) -> str:
        """tokenizer.json's text (grammar engines build their own vocabulary view from it)."""
        return self._tok.to_str()

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token: int) -> str | None:
        """The vocabulary's own spelling of a token (`Ġthe` in byte-level BPE), not its decoded text."""
        return self._tok.id_to_token(int(token))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            continue_final_message: bool = False, **kwargs) -> str:
        """Render the model's chat template (Hugging Face conventions) into the prompt text; `kwargs` are the
        template's own variables (`tools`, `enable_thinking`, ...). `continue_final_message` ends the prompt inside
        the last message, so the model continues it (transformers' rule: cut after the last occurrence of that
        message's text)."""
        if not self.chat_template:
            raise ModelError("the model has no chat template (no chat_template in tokenizer_config.json or "
                             "chat_template.jinja); pass a plain prompt or a template with {system} and {input}")
        if continue_final_message and add_generation_prompt:
            raise ModelError("continue_final_message and add_generation_prompt cannot both be set")
        text = _compile(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
            eos_token=self.eos_token or "", **kwargs)
        return _continue_final(text, messages) if continue_final_message else text


def _continue_final(text: str, messages: list[dict[str, Any]]) -> str:
    """`text` cut right after the final message's content, which the template rendered somewhere near its end."""
    final = messages[-1].get("content") if messages else None
    if isinstance(final, list):  # content parts: the last one with text
        final = next((p["text"] for p in reversed(final) if isinstance(p, dict) and "text" in p), None)
    if not isinstance(final, str) or not final.strip():
        raise ModelError("continue_final_message needs a final message with text to continue")
    at = text.rfind(final.strip())
    if at < 0:
        raise ModelError("continue_final_message: the chat template does not show the final message's text")
    # a template that keeps the message's spacing keeps its trailing spaces too; one that strips them, not
    end = at + len(final.lstrip()) if text[at:at + len(final.lstrip())] == final.lstrip() else at + len(final.strip())
    return text[:end]


_COMPILED: dict[str, Any] = {}


def _compile(template: str):
    """A sandboxed jinja2 environment set up like transformers' (trim_blocks, lstrip_blocks, tojson, ...)."""
    if template not in _COMPILED:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _COMPILED[template] = env.from_string(template)
    return _COMPILED[template]


class StreamDecoder:
    """Incremental detokenization: `add(token)` returns the text that token completes, never half a character.

    Byte-level tokens can end inside a multi-byte UTF-8 character; the decoder then yields U+FFFD, so text is held
    back until the character is complete. Decoding a window that starts a few tokens back keeps the leading-space
    and merge rules of the tokenizer (what `decode(all)` would give).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # tokens whose text has been emitted

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        decode = lambda ids: self.tokenizer.decode(ids, self.skip)  # noqa: E731
        prefix_text = decode(self.ids[self._prefix:self._read])
        text = decode(self.ids[self._prefix:])
        if len(text) > len(prefix_text) and not text.endswith(REPLACEMENT):
            new = text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self.ids)
            return new
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end decodes to U+FFFD)."""
        decode = lambda ids: self.tokenizer.decode(ids, self.skip)  # noqa: E731
        prefix_text = decode(self.ids[self._prefix:self._read])
        text = decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return text[len(prefix_text):]
