"""`ModelArgs`: a model's `config.json` as a frozen dataclass, with every derived value computed once."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ortlora.errors import ModelError


@dataclass(frozen=True)
class RopeArgs:
    """Rotary embedding settings, normalized from `rope_theta`/`rope_scaling` (transformers 4) or `rope_parameters`
    (5)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int | None = None
    short_factor: tuple[float, ...] | None = None  # longrope (phi3)
    long_factor: tuple[float, ...] | None = None
    attention_factor: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, theta: float) -> "RopeArgs":
        d = dict(d or {})
        rope_type = d.get("rope_type", d.get("type", "default"))
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names and v is not None}
        for k in ("short_factor", "long_factor"):
            if k in kwargs:
                kwargs[k] = tuple(float(x) for x in kwargs[k])
        kwargs["theta"] = float(d.get("rope_theta", theta))
        kwargs["rope_type"] = rope_type
        return cls(**kwargs)


@dataclass(frozen=True)
class ModelArgs:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    original_max_position_embeddings: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None
    partial_rotary_factor: float = 1.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    hidden_activation: str | None = None
    sliding_window: int | None = None
    use_sliding_window: bool | None = None
    max_window_layers: int | None = None
    layer_types: tuple[str, ...] | None = None
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    dtype: str | None = None
    # derived in __post_init__
    rope: RopeArgs = field(default=None, compare=False)  # type: ignore[assignment]
    rotary_dim: int = field(default=0, compare=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelArgs":
        names = {f.name for f in dataclasses.fields(cls)} - {"rope", "rotary_dim"}
        kwargs = {k: v for k, v in d.items() if k in names}
        if kwargs.get("layer_types") is not None:
            kwargs["layer_types"] = tuple(kwargs["layer_types"])
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ModelError(f"config.json is missing a required field: {exc}") from None

    def __post_init__(self) -> None:
        put = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        self._check_sizes()
        if self.num_key_value_heads is None:
            put("num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            put("head_dim", self.hidden_size // self.num_attention_heads)
            if self.head_dim < 1:
                raise ModelError(f"config.json: hidden_size={self.hidden_size} over num_attention_heads="
                                 f"{self.num_attention_heads} leaves no head_dim")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        params = self.rope_parameters or {}
        if "full_attention" in params:  # per-layer-type rope (gemma3 style): the full-attention one
            params = params["full_attention"]
        rope = RopeArgs.from_dict(params or self.rope_scaling, self.rope_theta)
        if rope.original_max_position_embeddings is None and self.original_max_position_embeddings:
            rope = dataclasses.replace(rope, original_max_position_embeddings=self.original_max_position_embeddings)
        put("rope", rope)
        prf = float(params.get("partial_rotary_factor", self.partial_rotary_factor))
        put("rotary_dim", int(self.head_dim * prf))
        if self.layer_types is None:
            window = self.sliding_window if self.use_sliding_window is not False else None
            kind = "sliding_attention" if window else "full_attention"
            put("layer_types", tuple([kind] * self.num_hidden_layers))

    def _check_sizes(self) -> None:
        """Every size must be a positive integer: one error listing each that is not (before anything divides)."""
        bad = []
        for name in _SIZES:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_SIZES:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad.append(f"{name}={value!r}")
        if bad:
            raise ModelError(f"config.json: {', '.join(bad)}: {'each' if len(bad) > 1 else 'it'} must be a "
                             "positive integer")

    @property
    def activation(self) -> str:
        return self.hidden_activation or self.hidden_act

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer` in tokens, or None for full attention."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None


_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
          "num_key_value_heads", "head_dim", "max_position_embeddings")
_OPTIONAL_SIZES = ("num_key_value_heads", "head_dim")  # derived when absent


def load_config(model_dir: str | Path) -> tuple[ModelArgs, dict[str, Any]]:
    """Read `config.json` from a Hugging Face model folder; returns the args and the raw dict."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir} is not a folder (a Hugging Face model folder with config.json was expected)")
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelError(f"{model_dir} has no config.json: not a Hugging Face model folder")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path} cannot be read as JSON: {exc}") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ModelError(f"{path} has no model_type: not a Hugging Face model config")
    if "text_config" in raw and "hidden_size" not in raw:
        raise ModelError(f"{path} describes a multimodal model ({raw['model_type']}); only text decoders are supported")
    return ModelArgs.from_dict(raw), raw


def eos_token_ids(model_dir: str | Path, args: ModelArgs) -> list[int]:
    """The EOS ids of a Hugging Face folder: generation_config.json's (what generate() stops on), else config.json's."""
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError) as exc:
            raise ModelError(f"{gen} cannot be read as a JSON object: {exc}") from None
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
    return args.eos_token_ids
