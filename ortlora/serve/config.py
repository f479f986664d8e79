"""`ServeConfig`: every `ortlora serve` option, its default and its help, written once.

    config = ServeConfig(model="out", adapters="adapters/")        # Python
    ServeConfig.add_arguments(parser); ServeConfig.from_namespace(args)   # the CLI
    ServeConfig.parse({"model": "out", "max_batch": "8"})          # Ray Serve config files (strings)

The same frozen object goes from the CLI to the single-process server, to the Ray application and to each of its
engine replicas. Each field's metadata holds its help text (and flag spelling where it differs); a problem with
any value is reported with all the others in one error.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ortlora.argtypes import float_range, int_range
from ortlora.errors import OrtloraError
from ortlora.runtime.adapter_reader import DEFAULT_MAX_RANK

DEFAULT_MAX_LEN = 4096  # tokens per sequence when the model's context is longer (KV cache reserved per slot)
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
REASONING_PARSERS = ("deepseek_r1", "qwen3")  # serve.reasoning.PARSERS' names (checked there to agree)


def _opt(default, help_: str, *, minimum: float | None = None, maximum: float | None = None,
         choices: tuple[str, ...] | None = None, flag: str | None = None, short: str | None = None,
         metavar: str | None = None):
    return field(default=default, metadata={"help": help_, "min": minimum, "max": maximum, "choices": choices,
                                            "flag": flag, "short": short, "metavar": metavar})


@dataclass(frozen=True)
class ServeConfig:
    model: str = _opt(None, "exported model folder (ortlora export)", short="-m")
    adapters: str | None = _opt(None, "where the adapters are: a folder of .onnx_adapter files (or PEFT folders), "
                                      "each served under its file stem; a URL prefix (s3://bucket/prefix/, gs://, "
                                      "hf://org/repo) listed the same way; or an index file (.toml/.json, local or "
                                      "by URL) naming each adapter's URL. URL adapters are fetched on first use into "
                                      "--adapter-cache (default: none)", metavar="DIR|URL|INDEX")
    host: str = _opt("127.0.0.1", "address to listen on (default: %(default)s, loopback only)")
    port: int = _opt(8000, "default: %(default)s; 0: any free port", minimum=0, maximum=65535)
    max_batch: int = _opt(16, "rows decoded together (KV cache slots; default: %(default)s)", minimum=1)
    max_loaded_adapters: int = _opt(64, "adapters held in memory (LRU, shared fairly among tenants: one over its "
                                        "share evicts its own first; default: %(default)s)", minimum=1)
    pin: tuple[str, ...] = _opt((), "keep this adapter loaded (a name or shell-style pattern; repeatable): loaded "
                                    "at start, never evicted", metavar="NAME")
    adapter_cache: str | None = _opt(None, "folder for local copies of adapters fetched by URL, bounded by "
                                           "--adapter-cache-bytes and kept across restarts; each process (each Ray "
                                           "replica) takes its own subfolder (default: "
                                           "$XDG_CACHE_HOME/ortlora/adapters, used only for URL adapters)",
                                     metavar="DIR")
    adapter_cache_bytes: int = _opt(8 << 30, "bytes of adapter copies the cache keeps (least recently used go "
                                             "first; default: %(default)s)", minimum=1)
    adapter_revalidate: float = _opt(60.0, "seconds after which a used adapter's source is asked again whether "
                                           "its content changed (a file: one stat; a URL: one metadata request); "
                                           "new content is a new version (default: %(default)s)", minimum=0,
                                     metavar="SECONDS")
    allow_adapter_urls: tuple[str, ...] = _opt((), "let admins register adapters by URL under this prefix "
                                                   "(https://host/path/, s3://bucket/prefix/; repeatable). Without "
                                                   "it, URL registrations are refused: the server would fetch "
                                                   "whatever address a caller names", metavar="PREFIX")
    max_queue: int = _opt(256, "waiting requests before answering 429 (default: %(default)s)", minimum=1)
    max_num_batched_tokens: int | None = _opt(None, "prompt tokens a step may prefill while nothing decodes (vLLM's "
                                                    "flag; default: sized from measured run costs, see "
                                                    "README 'Serving')", minimum=1)
    max_lora_rank: int = _opt(DEFAULT_MAX_RANK, "largest LoRA rank an adapter (or a weighted combination: the sum "
                                                "of its parts') may have; larger ones are refused (vLLM's flag; "
                                                "default: %(default)s)", minimum=1)
    prefill_chunk: int | None = _opt(None, "prompt tokens prefilled per step while other requests decode "
                                           "(default: sized from measured step times, so running streams keep "
                                           "their pace)", minimum=1)
    unified_steps: bool = _opt(False, "let a step's prompt run share the decode rows' run (one pass over the "
                                      "weights for both, where the model's graph allows); every prefill run then "
                                      "copies its LoRA results once more (benchmarks/NOTES.md#unified-steps)")
    max_model_len: int | None = _opt(None, f"tokens per sequence (prompt + output); default min(context length, "
                                           f"{DEFAULT_MAX_LEN})", minimum=2)
    tenants: str | None = _opt(None, "TOML file: API key hashes -> tenants -> adapters (default: none: any key, "
                                     "loopback only)")
    model_name: str | None = _opt(None, "the base model's name in the API (default: folder name)")
    threads: int | None = _opt(None, "onnxruntime intra-op threads (default: genai_config)", minimum=1)
    insecure_no_auth: bool = _opt(False, "allow a non-loopback --host without --tenants (anyone reaching it may "
                                         "use it)")
    log_level: str = _opt("info", "default: %(default)s", choices=LOG_LEVELS)
    provider: str | None = _opt(None, "run on this execution provider (cpu, cuda, dml, ...) instead of the one "
                                      "genai_config.json names; --provider cpu runs a GPU-exported folder on the "
                                      "CPU (default: genai_config.json's)")
    replicas: str | None = _opt(None, "serve on Ray Serve with N engine replicas (MIN:MAX: autoscaled on ongoing "
                                      "requests), each request routed to a replica holding its adapter; needs "
                                      "ortlora[ray]", metavar="N|MIN:MAX")
    ray_address: str | None = _opt(None, "with --replicas: join this Ray cluster (default: start a local Ray "
                                         "instance on 127.0.0.1)")
    max_body_bytes: int = _opt(16 << 20, "largest request body in bytes (default: %(default)s)", minimum=1)
    max_upload_bytes: int = _opt(1 << 30, "largest adapter upload in bytes (default: %(default)s)", minimum=1)
    max_choices: int = _opt(64, "most choices (prompts x n) one request may ask for (default: %(default)s)",
                            minimum=1)
    reasoning_parser: str | None = _opt(None, "a thinking model's <think> block returned apart from the answer "
                                              "(chat: reasoning_content / reasoning; Responses: a reasoning item), "
                                              "grammars applied after it, as vLLM's parser of that name does "
                                              "(default: none: the reasoning stays in the text)",
                                        choices=REASONING_PARSERS)
    # connections (serve/connections.py; the single-process server: under Ray, its proxy's own settings apply)
    header_timeout: float = _opt(10.0, "seconds a client has to send a request's head (request line and headers) "
                                       "after connecting or after the previous answer; then 408 and close "
                                       "(default: %(default)s)", minimum=0.01)
    body_timeout: float = _opt(30.0, "seconds a request body may take to start arriving, extended by a second per "
                                     "--body-min-rate bytes received; then 408 and close (default: %(default)s)",
                               minimum=0.01)
    body_min_rate: int = _opt(1024, "bytes per second a request body must keep up on average past --body-timeout "
                                    "(default: %(default)s)", minimum=1)
    keep_alive_timeout: float = _opt(5.0, "seconds an idle connection stays open between requests (default: "
                                          "%(default)s)", minimum=0.01)
    max_connections: int = _opt(1024, "open connections at most; past it an idle one is closed to make room, else "
                                      "503 (a few more answer /health); lowered to fit the file descriptor limit "
                                      "(default: %(default)s)", minimum=1)
    # compiled structured-output grammars (runtime/grammar_cache.py), an estimate of their memory
    grammar_cache_bytes: int = _opt(256 << 20, "bytes of compiled structured-output grammars kept, in use or "
                                               "cached (default: %(default)s)", minimum=1 << 20)
    grammar_cache_tenant_bytes: int = _opt(64 << 20, "of which one API key's grammars may take (default: "
                                                     "%(default)s)", minimum=1 << 20)

    def __post_init__(self):
        problems = []
        if not self.model:
            problems.append("model is required")
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if value is None or isinstance(value, tuple):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(f"{_flag(f)} must be a finite number, got {value}")
                continue
            if meta["min"] is not None and value < meta["min"]:
                problems.append(f"{_flag(f)} must be at least {meta['min']}, got {value}")
            if meta["max"] is not None and value > meta["max"]:
                problems.append(f"{_flag(f)} must be at most {meta['max']}, got {value}")
            if meta["choices"] is not None and value not in meta["choices"]:
                problems.append(f"{_flag(f)} must be one of {', '.join(meta['choices'])}, got {value!r}")
        if self.replicas is not None:
            try:
                self.scaling()
            except OrtloraError as exc:
                problems.append(str(exc))
        for prefix in self.allow_adapter_urls:
            from ortlora.runtime.registry import check_prefix

            try:
                check_prefix(prefix)
            except OrtloraError as exc:
                problems.append(str(exc))
        if problems:
            raise OrtloraError("; ".join(problems))

    # -- building --------------------------------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One CLI flag per field, with its default and help from the field."""
        for f in dataclasses.fields(cls):
            meta, kind = f.metadata, _base(f.name)
            names = [n for n in (meta["short"], meta["flag"] or "--" + f.name.replace("_", "-")) if n]
            kw: dict = {"dest": f.name, "help": meta["help"]}
            if kind is bool:
                kw["action"] = "store_true"
            elif kind is tuple:  # repeatable
                kw["action"] = "append"
                if meta["metavar"]:
                    kw["metavar"] = meta["metavar"]
            else:  # a value out of range is a usage error at parse time (exit 2, nothing started)
                ranged = meta["min"] is not None or meta["max"] is not None
                if kind is float:  # finite, and in range when bounded
                    kind = float_range(-math.inf if meta["min"] is None else meta["min"], meta["max"])
                elif kind is int and ranged:
                    kind = int_range(meta["min"], meta["max"])
                kw.update(type=kind, default=f.default)
                if meta["choices"]:
                    kw["choices"] = meta["choices"]
                if meta["metavar"]:
                    kw["metavar"] = meta["metavar"]
            if f.name == "model":
                kw["required"] = True
            parser.add_argument(*names, **kw)

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> "ServeConfig":
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()
                      if not (v is None and _base(k) is tuple)})

    @classmethod
    def parse(cls, values: dict) -> "ServeConfig":
        """From a config file's values (strings or typed); unknown keys and bad values named in one error."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        problems = [f"unknown argument {k!r}" for k in values if k not in known]
        typed = {}
        for key, value in values.items():
            if key not in known or value is None:
                continue
            kind = _base(key)
            try:
                typed[key] = _convert(value, kind)
            except (TypeError, ValueError):
                problems.append(f"{key} must be {_KIND_WORDS.get(kind, 'text')}, got {value!r}")
        if problems:
            raise OrtloraError("; ".join(problems))
        return cls(**typed)

    def replace(self, **changes) -> "ServeConfig":
        return dataclasses.replace(self, **changes)

    def absolute(self) -> "ServeConfig":
        """Paths made absolute (Ray replicas run in another working directory); URLs stay as they are."""
        return self.replace(**{k: str(Path(getattr(self, k)).expanduser().resolve())
                               for k in ("model", "adapters", "tenants", "adapter_cache")
                               if getattr(self, k) and "://" not in getattr(self, k)})

    def adapter_registry(self, reserved: tuple[str, ...] = ()):
        """The `AdapterRegistry` of these options (`--adapters`, the cache, the allowed URL prefixes): the single
        process, the Ray ingress and each replica open their own, each with its own cache folder."""
        from ortlora.runtime.registry import AdapterRegistry, default_cache_root, open_cache

        root = self.adapter_cache or default_cache_root()
        return AdapterRegistry(self.adapters, reserved=reserved, allow_urls=self.allow_adapter_urls,
                               cache=lambda: open_cache(root, max_bytes=self.adapter_cache_bytes,
                                                        revalidate_s=self.adapter_revalidate))

    # -- derived -------------------------------------------------------------------------------------------------
    def scaling(self) -> dict:
        """Ray Serve replica options for `replicas`: a fixed count, or autoscaling between MIN and MAX."""
        text = self.replicas or "1"
        try:
            low, _, high = text.partition(":")
            low, high = int(low), int(high or low)
        except ValueError:
            raise OrtloraError(f"--replicas must be N or MIN:MAX, got {text!r}") from None
        if not 1 <= low <= high:
            raise OrtloraError(f"--replicas must be N >= 1 or MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
        if low == high:
            return {"num_replicas": low}
        return {"autoscaling_config": {"min_replicas": low, "max_replicas": high,
                                       "target_ongoing_requests": self.max_batch}}

    @property
    def ray(self) -> bool:
        return self.replicas is not None or self.ray_address is not None


def _flag(f: dataclasses.Field) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def _base(name: str) -> type:
    """A field's value type: int for `int | None`, str for `str`, ..."""
    hint = typing.get_type_hints(ServeConfig)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint  # tuple[str, ...] -> tuple


def _convert(value, kind: type):
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes"):
            return True
        if text in ("false", "0", "no"):
            return False
        raise ValueError(value)
    if kind is int:
        if isinstance(value, bool):
            raise TypeError(value)
        return int(value)
    if kind is float:
        if isinstance(value, bool):
            raise TypeError(value)
        return float(value)
    if kind is tuple:  # a list, or one comma-separated string
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
            raise TypeError(value)
        return tuple(i.strip() for i in items if i.strip())
    return str(value)


_KIND_WORDS = {int: "an integer", float: "a number", bool: "true or false", tuple: "a list of strings"}
