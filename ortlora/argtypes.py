"""argparse `type=` functions for flags with a range: a value outside it is a usage error at parse time.

    p.add_argument("--threads", type=positive_int)      # ortlora serve: error: argument --threads: must be an
                                                        # integer >= 1, got -1   (exit 2, nothing started)

Each raises `argparse.ArgumentTypeError`, whose text argparse prints after the flag's name. The work functions keep
their own checks for callers that do not come through the command line.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable


def int_range(least: int, most: int | None = None) -> Callable[[str], int]:
    """An integer in [least, most] (no upper bound when `most` is None)."""
    span = f">= {least}" if most is None else f"from {least} to {most}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer {span}, got {text!r}") from None
        if value < least or (most is not None and value > most):
            raise argparse.ArgumentTypeError(f"must be an integer {span}, got {value}")
        return value

    return parse


def float_range(least: float, most: float | None = None, *, open_low: bool = False) -> Callable[[str], float]:
    """A finite number in [least, most] ((least, most] with `open_low`); NaN and infinities are refused."""
    low = "(" if open_low else "["
    span = f"{'>' if open_low else '>='} {least:g}" if most is None else f"in {low}{least:g}, {most:g}]"
    span = "" if least == -math.inf and most is None else " " + span

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number{span}, got {text!r}") from None
        if not math.isfinite(value) or value < least or (open_low and value == least) \
                or (most is not None and value > most):
            raise argparse.ArgumentTypeError(f"must be a finite number{span}, got {text}")
        return value

    return parse


positive_int = int_range(1)
non_negative_int = int_range(0)
port = int_range(1, 65535)
probability = float_range(0.0, 1.0, open_low=True)  # top-p: 0 would keep no token
non_negative_float = float_range(0.0)
finite_float = float_range(-math.inf)  # any number but NaN and the infinities
