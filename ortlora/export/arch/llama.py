"""Llama (1, 2, 3.x): the common decoder as it is; Llama-3 rope scaling lives in `ortlora.export.rope`."""

from ortlora.export.arch.base import Arch

ARCH = Arch()
