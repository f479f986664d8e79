"""Log-probabilities of tokens, as OpenAI and vLLM report them.

A token's logprob is log-softmax of the model's raw logits at its position: before penalties, logit bias, the
grammar mask and temperature (vLLM's default `raw_logprobs`; OpenAI's values do not move with temperature either).
So a score does not depend on how the token was chosen, and prompt scoring (`echo`) and sampling agree.

`PromptScorer` gives every prompt position's logprobs (completions `echo` + `logprobs`): the engine's prefill keeps
only the last position's logits, so it runs the model folder's graph once more, on its own session, without a KV
cache, with the request's adapter tensors as inputs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the token there, its logprob, and the `top` most likely tokens with theirs, best first."""
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = field(default=())


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """[..., vocab] -> float64 log-probabilities (float64: a 150k-token logsumexp in float32 drifts ~1e-5)."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def token_logprob(logits: np.ndarray, token: int, k: int) -> TokenLogprob:
    """The logprob of `token` under `logits` [vocab] and the k best tokens' (ties: lower id first)."""
    lp = log_softmax(logits)
    return TokenLogprob(int(token), float(lp[token]), _top(lp, k))


def _top(lp: np.ndarray, k: int) -> tuple[tuple[int, float], ...]:
    if k <= 0:
        return ()
    k = min(k, lp.size)
    best = np.argpartition(-lp, k - 1)[:k]
    best = best[np.lexsort((best, -lp[best]))]
    return tuple((int(t), float(lp[t])) for t in best)


class PromptScorer:
    """Every position's logprobs for a prompt, from a plain session over the model folder (no KV cache reuse).

    Thread-safe (onnxruntime sessions are); built on first use, so a server that never scores prompts never pays
    for a second copy of the weights."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        self.folder = Path(folder)
        self.threads = threads
        self._session = None
        self._lock = threading.Lock()

    def _open(self):
        with self._lock:
            if self._session is None:
                import onnxruntime as ort

                from ortlora.runtime.engine import ModelInfo, session_options

                info = ModelInfo.read(self.folder)
                session = ort.InferenceSession(str(self.folder / info.filename), session_options(self.threads),
                                               providers=["CPUExecutionProvider"])
                past = {i.name: i for i in session.get_inputs()}
                first = info.kv_names()[0][0]
                dtype = np.float16 if "float16" in past[first].type else np.float32
                self._empty = {name: np.zeros((1, info.kv_heads, 0, info.head_dim), dtype)
                               for name, _ in info.kv_names()}
                self._keep = "num_logits_to_keep" in past
                self._session = session
        return self._session

    def logits(self, ids: Sequence[int], adapter_params: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Logits [len(ids), vocab] of every position (position i predicts token i + 1)."""
        session = self._open()
        feeds = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64),
                 **self._empty, **(adapter_params or {})}
        if self._keep:
            feeds["num_logits_to_keep"] = np.array(len(ids), np.int64)
        return session.run(["logits"], feeds)[0][0].astype(np.float32)

    def score(self, ids: Sequence[int], k: int, adapter_params: dict[str, np.ndarray] | None = None
              ) -> list[TokenLogprob | None]:
        """Per prompt token: its logprob given the tokens before it and the k best there; None for the first
        (nothing predicts it), as OpenAI's `echo` reports it."""
        lp = log_softmax(self.logits(ids, adapter_params)[:-1])  # [len - 1, vocab]
        out: list[TokenLogprob | None] = [None]
        for i, token in enumerate(ids[1:]):
            out.append(TokenLogprob(int(token), float(lp[i, token]), _top(lp[i], k)))
        return out
