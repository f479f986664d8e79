"""How much prompt work a step may do: the token budget the planner (planner.py) spends, from measured costs.

A run takes about `fixed + tokens x per_token` seconds: `fixed` is a pass over the weights (what a decode step of a
few rows costs too), `per_token` the compute of one more token. Both are measured at start (`calibrate`: two runs of
different lengths, within the model's context) and tracked online from every prefill run and decode step.

    nothing decoding:  budget = max_num_batched_tokens (default IDLE_TOKENS) + one run's overhead: a burst of
                       prompts is prefilled in one step, in runs of at most RUN_TOKENS padded tokens (each
                       run's fixed cost amortized over many prompts), before any of them starts streaming
    streams decoding:  budget = (GAP - 1) x decode_step(rows) x max(1, joining / decoding) / per_token
                       rows = decoding + joining (the prompts holding slots: they decode once in). A step (decode
                       run + prompt runs) takes at most GAP decode steps of the batch it leads to while fewer
                       prompts join than streams decode: streams keep their pace while a long prompt comes in.
                       When more join than decode (a burst next to a few streams), each newcomer may stall the
                       streams by as much once, so the burst goes in together (one run's fixed cost, not one a
                       prompt) and the few streams see one longer gap instead of many
                       (`prefill_chunk` instead: that many tokens a step, the old fixed chunk)
    always:            the first waiting prompt gets at least max(MIN_CHUNK, overhead / 2) tokens a step

A decode step of n rows is modelled as the run cost fixed + n x per_token, scaled to the steps measured (their
moving average and the rows they had). Costs are in tokens: a run's overhead is fixed / per_token tokens, so the
planner weighs one more run against padding in one currency. The numbers behind GAP and the defaults:
benchmarks/NOTES.md#token-budget.
"""

from __future__ import annotations

import time

from ortlora.errors import OrtloraError
from ortlora.runtime.planner import Limits

GAP = 2.5  # a step with prompt work takes at most this many decode steps (bench_isolation: longest gap <= 3x median)
IDLE_TOKENS = 8192  # prompt tokens a step with nothing decoding (vLLM's max_num_batched_tokens default, offline)
MIN_CHUNK = 8  # the least a step gives the first waiting prompt
RUN_TOKENS = 2048  # padded tokens a run holds at most (see engine.PREFILL_CHUNK)
LOGIT_BYTES = 64 << 20  # logits a run returns at most, in bytes (prompt logprobs: a vocabulary of floats a position)


class Budget:
    """Measured run costs and the budget of the next step. One thread (the engine's) updates and reads it."""

    def __init__(self, *, max_num_batched_tokens: int | None = None, prefill_chunk: int | None = None,
                 vocab_size: int = 0):
        for name, v in (("max_num_batched_tokens", max_num_batched_tokens), ("prefill_chunk", prefill_chunk)):
            if v is not None and v < 1:
                raise OrtloraError(f"{name} must be at least 1, got {v}")
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_chunk = prefill_chunk
        self.logit_rows = max(1, LOGIT_BYTES // (4 * vocab_size)) if vocab_size else 128
        self.fixed = 0.0  # seconds: a prefill run's fixed part
        self.per_token = 0.0  # seconds a token
        self.decode_s = 0.0  # seconds a decode step (moving average)
        self.decode_rows = 0.0  # the rows of those steps (moving average)

    @property
    def known(self) -> bool:
        return self.per_token > 0

    @property
    def overhead(self) -> float:
        """A run's fixed cost, in tokens."""
        return self.fixed / self.per_token if self.known else 0.0

    def idle_tokens(self) -> int:
        return IDLE_TOKENS if self.max_num_batched_tokens is None else self.max_num_batched_tokens

    def tokens(self, decoding: int, joining: int = 0) -> float:
        """The budget of a step in which `decoding` rows decode and `joining` prompts holding slots will join them
        (overheads and padding count as tokens)."""
        if not decoding:
            return self.idle_tokens() + self.overhead
        if self.prefill_chunk is not None:
            return self.prefill_chunk + self.overhead
        if not (self.known and self.decode_s):
            return RUN_TOKENS  # until the costs are known (`calibrate`)
        return (GAP - 1) * self.decode_time(decoding + joining) * max(1.0, joining / decoding) / self.per_token

    def decode_time(self, rows: int) -> float:
        """Seconds a decode step of `rows` rows takes: the measured steps, scaled by the run cost model."""
        if not self.decode_rows:
            return self.decode_s

        def model(n: float) -> float:
            return self.fixed + n * self.per_token

        return self.decode_s * model(rows) / model(self.decode_rows) if model(self.decode_rows) else self.decode_s

    def limits(self) -> Limits:
        """The planner's limits: the first prompt's least chunk keeps its run at least a third useful (half the
        run's fixed cost in tokens), however small the budget; a fixed `prefill_chunk` caps it."""
        min_chunk = max(MIN_CHUNK, int(self.overhead / 2))
        if self.prefill_chunk is not None:
            min_chunk = min(min_chunk, self.prefill_chunk)
        return Limits(run_tokens=RUN_TOKENS, logit_rows=self.logit_rows, overhead=self.overhead, min_chunk=min_chunk)

    # -- measuring ----------------------------------------------------------------------------------------------
    def calibrate(self, engine) -> None:
        """Measure a prefill run's fixed and per-token time (probe runs: no slot used) with lengths the model's
        context holds, so that the first long prompt is already planned with the right costs."""
        collapsing = getattr(engine, "hugepages_thread", None)
        if collapsing is not None:  # it competes for the cores and memory bandwidth: times taken meanwhile run long
            collapsing.join()
        large = max(2, min(144, engine.info.context_length, engine.max_len))
        small = max(1, min(16, large // 4))
        times = []
        for n in (small, large, small, large):
            t0 = time.perf_counter()
            engine.probe({}, [1 + k % 255 for k in range(n)])
            times.append(time.perf_counter() - t0)
        t_small, t_large = min(times[0::2]), min(times[1::2])
        self.per_token = max((t_large - t_small) / (large - small), 1e-6)
        self.fixed = max(t_small - small * self.per_token, 0.0)

    def observe_prefill(self, padded: int, seconds: float) -> None:
        """A prefill run of `padded` tokens took `seconds`: the per-token part follows (it grows with the context
        attended to); short runs say little about it."""
        if self.known and padded >= MIN_CHUNK:
            per_token = (seconds - self.fixed) / padded
            self.per_token = _average(self.per_token, max(per_token, 1e-6))

    def observe_decode(self, seconds: float, rows: int = 0) -> None:
        self.decode_s = _average(self.decode_s, seconds)
        if rows:
            self.decode_rows = _average(self.decode_rows, rows)


def _average(mean: float, x: float) -> float:
    return x if not mean else 0.8 * mean + 0.2 * x
