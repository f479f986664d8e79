"""Log-probabilities of tokens, as OpenAI and vLLM report them.

A token's logprob is log-softmax of the model's raw logits at its position: before penalties, logit bias, the
grammar mask and temperature (vLLM's default `raw_logprobs`; OpenAI's values do not move with temperature either).
So a score does not depend on how the token was chosen, and prompt scoring (`echo`, vLLM's `prompt_logprobs`) and
sampling agree. A prompt's own logprobs come from the engine's prefill of that prompt (logits of every position, the
engine's one session): see request.py and batch.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the token there, its logprob, and the `top` most likely tokens with theirs, best first."""
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = field(default=())
    rank: int | None = None  # 1 + the number of tokens more likely there (prompt tokens; vLLM reports it)


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


def prompt_logprobs(logits: np.ndarray, ids: Sequence[int], k: int) -> list[TokenLogprob]:
    """The logprob of ids[i] under logits[i] ([n, vocab]: the position before it) and the k best there, a few
    positions at a time (float64 log-softmax of a whole chunk would be vocabulary-sized arrays times n)."""
    out = []
    for i, token in enumerate(ids):
        lp = log_softmax(logits[i])
        out.append(TokenLogprob(int(token), float(lp[token]), _top(lp, k), 1 + int((lp > lp[token]).sum())))
    return out
