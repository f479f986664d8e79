"""The runtime: `Model` (session, KV cache, sampler, tokenizer, adapters) and the step-level `Engine` under it.

    from ortlora.runtime import Model
"""

from __future__ import annotations


def __getattr__(name: str):
    if name == "Model":
        from ortlora.runtime.model import Model

        return Model
    if name == "Engine":
        from ortlora.runtime.engine import Engine

        return Engine
    if name == "SamplingParams":
        from ortlora.runtime.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'ortlora.runtime' has no attribute {name!r}")


__all__ = ["Engine", "Model", "SamplingParams"]
