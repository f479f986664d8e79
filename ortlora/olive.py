"""Olive's command-line flags that ortlora accepts so `olive ...` command lines run with `ortlora ...` unchanged.

A flag whose meaning ortlora carries out is an ordinary option of its command. A flag with no meaning here (telemetry,
the Azure shared cache, NPU/QDQ passes, PyTorch model scripts) is registered with `no_effect()`: it parses exactly as
Olive's does and prints one line saying it has no effect. The flag lists come from Olive 0.13.0's parsers
(olive/cli/*.py; tests/test_olive_flags.py keeps them); docs/olive.md tables what each one does here.
"""

from __future__ import annotations

import argparse
import sys

# Olive's options shared by most of its commands, and why each has no meaning here.
TELEMETRY = ("--disable_telemetry", "ortlora sends no telemetry")
SHARED_CACHE = (("--account_name", "--container_name"), "Olive's Azure shared cache does not exist here")
LOG_LEVEL = ("--log_level", "ortlora prints progress to stderr and errors as one line; there is no log level")
SAVE_CONFIG = ("--save_config_file", "there is no Olive workflow config to save (finetune writes run_config.json)")
TEST_MODEL = ("--test", "ortlora does not build random test models from a hub architecture; "
                        "see ortlora.testing for tiny local ones")
TASK = ("-t", "--task")
SCRIPT = (("--model_script", "--script_dir"), "ortlora takes Hugging Face folders, not PyTorch model scripts")


class _NoEffect(argparse.Action):
    """Parses like Olive's flag; when given, prints one line naming it and why nothing happens."""

    def __init__(self, option_strings, dest, reason: str = "", **kwargs):
        self.reason = reason
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"ortlora: warning: {option_string} has no effect: {self.reason}", file=sys.stderr)
        setattr(namespace, self.dest, values if self.nargs != 0 else True)


def no_effect(p: argparse.ArgumentParser, *flags: str, reason: str, nargs=None, type=None) -> None:
    """Accept `flags` (a switch when nargs=0) and warn that they do nothing here."""
    kwargs = {"nargs": nargs} if nargs is not None else {}
    if type is not None:
        kwargs["type"] = type
    dest = "_olive_" + flags[-1].lstrip("-").replace("-", "_")
    p.add_argument(*flags, action=_NoEffect, reason=reason, dest=dest, default=None, help=argparse.SUPPRESS, **kwargs)


def add_common(p: argparse.ArgumentParser, *, cache: bool = True, save_config: bool = True, dry_run: bool = True,
               log_level: bool = True, telemetry: bool = True) -> None:
    """Olive's logging / telemetry / shared-cache / config options (whichever the command has)."""
    if log_level:
        no_effect(p, LOG_LEVEL[0], reason=LOG_LEVEL[1], type=int)
    if telemetry:
        no_effect(p, TELEMETRY[0], reason=TELEMETRY[1], nargs=0)
    if cache:
        for flag in SHARED_CACHE[0]:
            no_effect(p, flag, reason=SHARED_CACHE[1])
    if save_config:
        no_effect(p, SAVE_CONFIG[0], reason=SAVE_CONFIG[1], nargs=0)
    if dry_run:
        p.add_argument("--dry_run", action="store_true",
                       help="check the arguments and stop before doing the work (Olive's --dry_run)")


def add_input_model(p: argparse.ArgumentParser, *, task: bool = True, test: bool = True,
                    script: bool = True) -> None:
    """The parts of Olive's input-model options that have no meaning here (-m, -a, --trust_remote_code are real
    options of each command)."""
    if task:
        no_effect(p, *TASK, reason="ortlora exports and trains causal LMs for text generation only")
    if test:
        no_effect(p, TEST_MODEL[0], reason=TEST_MODEL[1], nargs="?")
    if script:
        for flag in SCRIPT[0]:
            no_effect(p, flag, reason=SCRIPT[1])


def parse_bool(text: str) -> bool:
    """Olive's `type=bool` flags take a value (`--add_special_tokens False`); unlike bool(), "False" is false."""
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def note(command: str, text: str) -> None:
    """One line on stderr: where ortlora's behaviour deliberately differs from Olive's default."""
    print(f"ortlora {command}: note: {text}", file=sys.stderr)
