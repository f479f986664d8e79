"""The server's metrics: the runtime's Prometheus-style set (ortlora.runtime.metrics), rendered at `/metrics`, and
what a key may see of them."""

from __future__ import annotations

import re
from typing import Callable

from ortlora.runtime.metrics import (ADAPTER_LABEL, CONTENT_TYPE, Counter, Gauge, Histogram,  # noqa: F401
                                     Metrics)

_ADAPTER_VALUE = re.compile(r'[{,]' + ADAPTER_LABEL + r'="((?:[^"\\]|\\.)*)"')
_TENANT_VALUE = re.compile(r'[{,]tenant="((?:[^"\\]|\\.)*)"')


def filter_exposition(text: str, visible: Callable[[str], bool], tenant: str) -> str:
    """`text` (an exposition, one process's or Ray's merged one) without the samples whose `adapter` label names an
    adapter that `visible` refuses (a combination `a1+a2` needs every part visible) or whose `tenant` label names
    another tenant than `tenant`. HELP/TYPE lines and samples without those labels stay: totals tell how much,
    never whose."""
    out = []
    for line in text.splitlines():
        if not line.startswith("#"):
            m = _ADAPTER_VALUE.search(line)
            if m is not None and not all(visible(part) for part in _unescape(m.group(1)).split("+")):
                continue
            m = _TENANT_VALUE.search(line)
            if m is not None and _unescape(m.group(1)) != tenant:
                continue
        out.append(line)
    return "\n".join(out) + "\n"


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda c: "\n" if c.group(1) == "n" else c.group(1), value)
