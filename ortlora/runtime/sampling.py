"""Choosing the next token from numpy logits: greedy, temperature, top-k, top-p, min-p, repetition, presence and
frequency penalties, logit bias, an allowed-token mask (structured outputs), seed.

Order, as vLLM applies them: penalties, logit bias, banned ids (EOS before min_new_tokens), the allowed mask,
then temperature and the top-k / top-p / min-p cuts.

Each request owns a `Sampler` (its own `np.random.Generator`), so the same seed gives the same text whatever else
runs in the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ortlora.errors import GenerationError, OrtloraError

_NAN = ("the model's logits hold NaN or infinity, so no token can be chosen (an adapter with huge weights "
        "or a numeric overflow in the model)")
_MIN_TEMPERATURE = 1e-6
MAX_LOGPROBS = 20
_CANDIDATES = 512  # top-p/min-p look at the best few hundred tokens first, the whole vocabulary only if needed


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_new_tokens: int = 0  # EOS is masked out until this many tokens are out
    stop_token_ids: tuple[int, ...] = field(default=())
    presence_penalty: float = 0.0  # OpenAI: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence in the generated tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    logprobs: int | None = None  # None = off; k = the sampled token's logprob and the k most likely (0-20)
    prompt_logprobs: int | None = None  # vLLM's: each prompt token's logprob and the k most likely there (0-20)
    grammar: str | None = None  # an llguidance grammar (ortlora.runtime.constraints) the output must match
    grammar_after: tuple[int, ...] | None = None  # the grammar applies after these ids (a reasoning's end tag)
    skip_special_tokens: bool = True  # special tokens' text left out of the output
    include_stop_str_in_output: bool = False  # the stop string (or stop token's text) that ended it is kept

    def __post_init__(self):
        problems = []
        if self.max_new_tokens < 0:  # 0: the prompt is only scored (prompt_logprobs)
            problems.append(f"max_new_tokens must be at least 0, got {self.max_new_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):  # NaN fails every comparison
            problems.append(f"temperature must be a finite number >= 0, got {self.temperature}")
        elif 0 < self.temperature < _MIN_TEMPERATURE:  # logits / temperature would overflow float32
            problems.append(f"temperature {self.temperature} is too small to sample with: use 0 for greedy or at "
                            f"least {_MIN_TEMPERATURE}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            problems.append(f"min_p must be in [0, 1), got {self.min_p}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            problems.append(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        if self.seed is not None and not (isinstance(self.seed, int) and self.seed >= 0):
            problems.append(f"seed must be an integer >= 0, got {self.seed}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                problems.append(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if isinstance(self.logit_bias, dict):
            object.__setattr__(self, "logit_bias", tuple((int(k), float(v)) for k, v in self.logit_bias.items()))
        bad = [(t, b) for t, b in self.logit_bias if t < 0 or not -100 <= b <= 100]
        if bad:
            problems.append(f"logit_bias takes token ids >= 0 with biases in [-100, 100], got {bad[:3]}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                problems.append(f"{name} must be in [0, {MAX_LOGPROBS}], got {k}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if any(not s for s in self.stop):
            problems.append("stop strings must not be empty")
        if problems:
            raise OrtloraError("invalid sampling settings: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, previous: Sequence[int] = (), banned: Sequence[int] = (),
                 generated: Sequence[int] = (), allowed: np.ndarray | None = None) -> int:
        """One token id from `logits` [vocab]; `previous` = prompt + generated ids (for the repetition penalty),
        `generated` = the output so far (presence / frequency penalties), `banned` = ids that must not come (EOS
        before min_new_tokens), `allowed` = a bool mask [vocab] of the ids a grammar permits (None = all)."""
        p = self.params
        logits = np.asarray(logits, dtype=np.float32)
        if p.repetition_penalty != 1.0 and len(previous):
            logits = repetition_penalty(logits, previous, p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and len(generated):
            logits = presence_frequency_penalty(logits, generated, p.presence_penalty, p.frequency_penalty)
        bias = [(t, b) for t, b in p.logit_bias if t < logits.size]  # ids past the logits: nothing to bias
        if bias:
            logits = logits.copy()
            np.add.at(logits, [t for t, _ in bias], np.asarray([b for _, b in bias], np.float32))
        ids = None
        if len(banned) or allowed is not None:  # draw among the permitted ids only (exp(-inf) is slow, not free)
            keep = np.ones(logits.size, bool) if allowed is None else allowed.copy()
            keep[list(banned)] = False
            if allowed is not None and not keep.any():  # the grammar allows only what is banned (EOS): it wins
                keep = allowed
            ids = np.flatnonzero(keep)
            if not ids.size:
                raise GenerationError("no token is allowed here (the grammar and the banned tokens exclude all)")
            logits = logits[ids]
        token = self._choose(logits)
        return int(ids[token]) if ids is not None else token

    def _choose(self, logits: np.ndarray) -> int:
        p = self.params
        if p.greedy:
            token = int(np.argmax(logits))  # argmax stops at the first NaN: one look tells
            if np.isnan(logits[token]):
                raise GenerationError(_NAN)
            return token
        if not np.isfinite(logits.max()):  # NaN (the max propagates it) or +inf: no probabilities to draw from
            raise GenerationError(_NAN)
        return self._sample(logits / np.float32(p.temperature))

    def _sample(self, logits: np.ndarray) -> int:
        p = self.params
        if p.top_p >= 1.0 and p.min_p == 0 and (p.top_k == 0 or p.top_k >= logits.size):
            # nothing to cut: draw from the whole softmax without sorting it (sorting 151k logits cost ~30 ms a
            # token, more than a decode step of the model)
            cdf = np.cumsum(np.exp(logits - logits.max(), dtype=np.float64))
            return int(min(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"), logits.size - 1))
        idx, probs = self.candidates(logits)
        return int(idx[self.rng.choice(len(idx), p=probs / probs.sum())])

    def candidates(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The tokens top-k / top-p / min-p keep, best first, and their probabilities (before renormalizing)."""
        p = self.params
        vocab = logits.size
        k = min(p.top_k or vocab, vocab)
        weights = np.exp(logits - logits.max(), dtype=np.float64)  # unnormalized probabilities [vocab]
        if k < vocab:
            best = np.argpartition(-logits, k - 1)[:k]
            total = weights[best].sum()
        else:
            best, total = None, weights.sum()
        # the cut of top-p / min-p usually falls within the best few hundred tokens: sort only those
        n = min(k, _CANDIDATES)
        idx = np.argpartition(-logits, n - 1)[:n] if n < vocab else np.arange(vocab)
        idx = idx[np.argsort(-logits[idx], kind="stable")]
        probs = weights[idx] / total
        cut_inside = ((p.top_p < 1.0 and probs.sum() >= p.top_p)
                      or (p.min_p > 0 and probs[-1] < p.min_p * probs[0]))
        if n < k and not cut_inside:
            idx = best if best is not None else np.arange(vocab)
            idx = idx[np.argsort(-logits[idx], kind="stable")]
            probs = weights[idx] / total
        keep = len(idx)
        if p.top_p < 1.0:
            keep = min(keep, int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1)
        if p.min_p > 0:
            keep = min(keep, int((probs >= p.min_p * probs[0]).sum()))
        return idx[:keep], probs[:keep]


def presence_frequency_penalty(logits: np.ndarray, generated: Sequence[int], presence: float,
                               frequency: float) -> np.ndarray:
    """OpenAI's rule: logit -= frequency * count(token in output) + presence * (count > 0)."""
    ids, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
    out = logits.copy()
    out[ids] -= (frequency * counts + presence).astype(np.float32)
    return out


def repetition_penalty(logits: np.ndarray, previous: Sequence[int], penalty: float) -> np.ndarray:
    """CTRL / transformers rule: a seen token's logit is divided by `penalty` when positive, multiplied when not."""
    ids = np.unique(np.asarray(previous, dtype=np.int64))
    out = logits.copy()
    seen = out[ids]
    out[ids] = np.where(seen > 0, seen / penalty, seen * penalty)
    return out
