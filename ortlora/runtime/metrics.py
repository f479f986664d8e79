"""Prometheus-style metrics: counters, gauges and histograms with optional labels; every update takes one lock, so
the engine thread and the HTTP handlers can share them. `Metrics` holds the engine's and server's set; a server's
`/metrics` returns `Metrics.render()`.
"""

from __future__ import annotations

import bisect
import math
import threading

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ADAPTER_LABEL = "adapter"  # the one label whose values are adapter names (`a1`, or a combination `a1+a2`)


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.labelnames = name, help_, labels
        self._lock = threading.Lock()
        self._values: dict[tuple[str, ...], object] = {}

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        with self._lock:
            return float(self._values.get(self._key(labels), 0.0))

    def header(self) -> list[str]:
        return [f"# HELP {self.name}_total {self.help}", f"# TYPE {self.name}_total counter"]

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items()) or ([((), 0.0)] if not self.labelnames else [])
        return self.header() + [f"{self.name}_total{_labels(self.labelnames, k)} {_num(v)}" for k, v in items]


class Gauge(_Metric):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        with self._lock:
            self._values[self._key(labels)] = float(value)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self.inc(-amount, **labels)

    def get(self, **labels: str) -> float:
        with self._lock:
            return float(self._values.get(self._key(labels), 0.0))

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items()) or ([((), 0.0)] if not self.labelnames else [])
        return self.header() + [f"{self.name}{_labels(self.labelnames, k)} {_num(v)}" for k, v in items]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()):
        super().__init__(name, help_, labels)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            counts, total = self._values.get(key, ([0] * len(self.buckets), 0.0))
            counts[bisect.bisect_left(self.buckets, value)] += 1
            self._values[key] = (counts, total + value)

    def snapshot(self, **labels: str) -> dict[float, int]:
        """Cumulative counts per upper bound (`le`), as Prometheus reports them."""
        with self._lock:
            counts, _ = self._values.get(self._key(labels), ([0] * len(self.buckets), 0.0))
            counts = list(counts)
        out, acc = {}, 0
        for bound, c in zip(self.buckets, counts):
            acc += c
            out[bound] = acc
        return out

    def render(self) -> list[str]:
        with self._lock:
            items = sorted((k, (list(c), s)) for k, (c, s) in self._values.items())
        if not items and not self.labelnames:
            items = [((), ([0] * len(self.buckets), 0.0))]
        lines = self.header()
        for key, (counts, total) in items:
            acc = 0
            for bound, c in zip(self.buckets, counts):
                acc += c
                le = 'le="' + _num(bound) + '"'
                lines.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {acc}")
            lines.append(f"{self.name}_sum{_labels(self.labelnames, key)} {_num(total)}")
            lines.append(f"{self.name}_count{_labels(self.labelnames, key)} {acc}")
        return lines


_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_LOAD = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The server's metrics (all names prefixed `ortlora_`)."""

    def __init__(self, max_batch: int = 16):
        sizes = tuple(float(b) for b in sorted({1, 2, 4, 8, 16, 32, 64, 128, max_batch}) if b <= max(max_batch, 1))
        self.requests = Counter("ortlora_requests", "HTTP requests answered", ("endpoint", "status"))
        self.rejected = Counter("ortlora_requests_rejected", "generation requests refused before running",
                                ("reason",))
        self.prompt_tokens = Counter("ortlora_prompt_tokens", "prompt tokens prefilled")
        self.generation_tokens = Counter("ortlora_generation_tokens", "tokens generated")
        self.adapter_requests = Counter("ortlora_adapter_requests", "generation requests per adapter", ("adapter",))
        self.adapter_loads = Counter("ortlora_adapter_loads", "adapter versions loaded from their source (files, "
                                     "URLs) into memory")
        self.adapter_load_seconds = Histogram("ortlora_adapter_load_seconds", "time to fetch, read and check one "
                                              "adapter", _LOAD)
        self.adapter_cache_hits = Counter("ortlora_adapter_cache_hits", "requests whose adapter was already loaded",
                                          ("tenant",))
        self.adapter_cache_misses = Counter("ortlora_adapter_cache_misses", "requests whose adapter was loaded for "
                                            "them (cold)", ("tenant",))
        self.adapter_evictions = Counter("ortlora_adapter_evictions", "adapter versions let go, by reason: lru, "
                                         "tenant_share (evicted for room), replaced, unregistered, source_changed; "
                                         "idle, component_gone (scaled or combined adapters)", ("reason",))
        self.loaded_adapter_bytes = Gauge("ortlora_loaded_adapter_bytes", "bytes of adapter weights in memory")
        self.adapter_disk_cache_bytes = Gauge("ortlora_adapter_disk_cache_bytes", "bytes of adapters fetched by URL "
                                              "kept on local disk")
        self.finished = Counter("ortlora_requests_finished", "generation requests finished", ("reason",))
        self.decode_steps = Counter("ortlora_decode_steps", "batched decode steps run")
        self.prefills = Counter("ortlora_prefill_steps", "requests admitted to prefill")
        self.prefill_runs = Counter("ortlora_prefill_runs", "prompt runs (each a pass over the weights, but those "
                                    "counted in ortlora_prefill_runs_merged)")
        self.prefill_runs_merged = Counter("ortlora_prefill_runs_merged",
                                           "prompt runs that shared a decode step's pass over the weights")
        self.prefill_run_rows = Histogram("ortlora_prefill_run_rows", "prompts packed into one prompt run", sizes)
        self.preemptions = Counter("ortlora_preemptions", "running requests paused for a tenant below its fair share "
                                   "of slots (resumed later by recomputing their prefix)")
        self.queue_depth = Gauge("ortlora_queue_depth", "requests waiting for a batch slot")
        self.running = Gauge("ortlora_running_requests", "requests in the decode batch")
        self.loaded_adapters = Gauge("ortlora_loaded_adapters", "adapters held by the store")
        self.max_batch_adapters = Gauge("ortlora_decode_batch_adapters_max",
                                        "most distinct adapters (base counted as one) seen in one decode step")
        self.batch_size = Histogram("ortlora_decode_batch_size", "rows per decode step", sizes)
        self.batch_adapters = Histogram("ortlora_decode_batch_adapters",
                                        "distinct adapters (base counted as one) per decode step", sizes)
        self.ttft = Histogram("ortlora_time_to_first_token_seconds", "from arrival to first token", _LATENCY)
        self.latency = Histogram("ortlora_request_duration_seconds", "from arrival to the last token", _LATENCY)

    def all(self) -> list[_Metric]:
        return [v for v in vars(self).values() if isinstance(v, _Metric)]

    def render(self) -> str:
        lines: list[str] = []
        for m in self.all():
            lines += m.render()
        return "\n".join(lines) + "\n"
