"""`generate`: the onnxruntime-genai LoRA tutorial's app (the work function of `ortlora generate`).

    ortlora generate -m out -a a1.onnx_adapter a2.onnx_adapter -t "<|user|>{input}<|end|><|assistant|>" -p "Hi"

prints `[a1]: <streamed text>` then `[a2]: ...` (or `[Base]: ...` without adapters). Greedy unless a temperature
above 0 is given; `--chat` starts an interactive multi-turn session (one conversation per adapter).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Callable, Sequence, TextIO

BASE = "Base"


def adapter_names(paths: Sequence[str | Path]) -> list[str]:
    """`a1.onnx_adapter` -> `a1`; repeated stems get `-2`, `-3`, ..."""
    from ortlora.adapters.onnx_adapter import SUFFIX

    names: list[str] = []
    for path in paths:
        stem = Path(path).name.removesuffix(SUFFIX)
        name, n = stem, 1
        while name in names:
            n += 1
            name = f"{stem}-{n}"
        names.append(name)
    return names


def generate(model: str | Path, *, adapters: Sequence[str | Path] = (), template: str | None = None,
             system: str | None = None, prompt: str | None = None, max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             stop: Sequence[str] = (), ignore_eos: bool = False, chat: bool = False, threads: int | None = None,
             provider: str | None = None, out: TextIO | None = None,
             read: Callable[[str], str] | None = None) -> dict[str, str]:
    """Run the app; returns {adapter name or "Base": text} of the last turn. `provider` overrides the execution
    provider genai_config.json names (e.g. "cpu")."""
    from ortlora.errors import OrtloraError
    from ortlora.runtime.sampling import SamplingParams

    out = out or sys.stdout
    if prompt is None and not chat:
        raise OrtloraError("give a prompt with -p (or start an interactive session with --chat)")
    if max_new_tokens < 1:  # SamplingParams takes 0 (a prompt only scored); generating nothing is no generation
        raise OrtloraError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    # SamplingParams refuses what is out of range or not finite (top-p 5 too, even where greedy would ignore it)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=seed, stop=tuple(stop), ignore_eos=ignore_eos)
    if temperature == 0:  # greedy ignores top-p/top-k
        params = dataclasses.replace(params, top_p=1.0, top_k=0)
    return _run(model, adapters, template, system, prompt, params, chat, threads, provider, out, read)


def _run(model, adapters, template, system, prompt, params, chat, threads, provider, out, read) -> dict[str, str]:
    from ortlora.runtime.model import Model

    names = adapter_names(adapters) or [BASE]
    # in a chat each conversation keeps its KV slot, so a turn prefills only what it adds
    m = Model(model, slots=len(names) if chat else 1, threads=threads, provider=provider)
    for name, path in zip(names, adapters):
        m.adapters.load(path, name=name)
    conversations = {name: Conversation(m, template, system, m.reserve_slot() if chat else None) for name in names}

    def turn(user: str) -> dict[str, str]:
        texts = {}
        for name, conv in conversations.items():
            out.write(f"[{name}]: ")
            out.flush()
            pieces = []
            for chunk in m.stream(conv.prompt(user), adapter=None if name == BASE else name, params=params,
                                  lease=conv.lease):
                pieces.append(chunk.text)
                out.write(chunk.text)
                out.flush()
            out.write("\n")
            texts[name] = "".join(pieces)
            conv.reply(texts[name])
        return texts

    texts = turn(prompt) if prompt is not None else {}
    if not chat:
        return texts
    read = read or input
    while True:
        try:
            user = read("> ")
        except (EOFError, KeyboardInterrupt):
            break
        if user.strip() in ("", "exit", "quit"):
            break
        texts = turn(user)
    return texts


class Conversation:
    """The prompt of each turn: the chat template over the message history, or the {system}/{input} template
    appended to the transcript so far."""

    def __init__(self, model, template: str | None, system: str | None, lease=None):
        self.model, self.template, self.system, self.lease = model, template, system, lease
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.transcript = ""
        self.use_chat_template = template is None and model.tokenizer.chat_template is not None

    def prompt(self, user: str) -> str | list[int]:
        if self.use_chat_template:
            self.messages.append({"role": "user", "content": user})
            return self.model.encode(messages=self.messages)
        if self.template is None:
            turn = user if not self.system or self.transcript else f"{self.system}\n{user}"
        else:
            turn = self.template.replace("{system}", self.system or "").replace("{input}", user)
        self.transcript += turn
        return self.transcript

    def reply(self, text: str) -> None:
        if self.use_chat_template:
            self.messages.append({"role": "assistant", "content": text})
        else:
            self.transcript += text
