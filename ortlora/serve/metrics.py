"""The server's metrics: the runtime's Prometheus-style set (ortlora.runtime.metrics), rendered at `/metrics`."""

from ortlora.runtime.metrics import CONTENT_TYPE, Counter, Gauge, Histogram, Metrics  # noqa: F401
