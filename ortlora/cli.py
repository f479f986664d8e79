"""The `ortlora` command: one entry point, each subcommand a module imported only when it runs.

Where things live, the same for every command:
- the command's CLI module is `ortlora/<package>/cli.py` (`<package>/<command>_cli.py` where one package serves two
  commands) and holds only `configure_parser(parser)` and `main(args)`; `main` unpacks the parsed flags and calls
- the command's work function, a plain keyword-argument function exported by the package:
  `from ortlora.<package> import <function>` (table below), which tests and the server call directly.
A CLI module that sets `PASSTHROUGH = True` gets the flags its parser does not know in `args._extra` (finetune:
Hugging Face TrainingArguments flags, as `olive finetune` passes them through).
SIGTERM stops a command as Ctrl-C does (an exception), so the temporaries of atomic writes are removed either
way.

Failures, the same for every command (one handler, in `main`):
- a command line argparse refuses (unknown flag, missing or out-of-range value, no command): one line
  `ortlora CMD: error: ...` (the usage for `ortlora` alone), exit 2, argparse's convention for usage errors;
- an error the user can cause once the command runs (an `OrtloraError`, or an `OSError` of a file the command
  reads or writes: missing, not a folder, no permission, disk full, read-only): one line `ortlora CMD: error: ...`,
  exit 1; `--debug` (or ORTLORA_DEBUG=1) shows its traceback instead;
- anything else is a bug in ortlora: its traceback, with a note asking for a report (exit 1);
- Ctrl-C exits 130, SIGTERM 143, a closed stdout (`| head`) 141, each without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading

from ortlora import __version__
from ortlora.errors import OrtloraError

# command -> (CLI module, one-line help); the work function of each is in WORK
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("ortlora.quickstart.cli", "the whole path on a built-in tiny model (no download)"),
    "export": ("ortlora.export.cli", "Hugging Face checkpoint -> ONNX decoder with LoRA inputs"),
    "capture-onnx-graph": ("ortlora.export.capture_cli", "Olive's capture-onnx-graph: export, flags of Olive's"),
    "generate-adapter": ("ortlora.export.generate_adapter_cli",
                         "a model folder with LoRA inputs plus one .onnx_adapter per PEFT adapter"),
    "convert-adapters": ("ortlora.adapters.cli", "PEFT adapter -> .onnx_adapter, checked against a model"),
    "merge-adapters": ("ortlora.adapters.merge_cli", "a weighted combination of adapters as one .onnx_adapter"),
    "inspect": ("ortlora.inspect.cli", "show what a model folder or adapter file holds"),
    "quantize": ("ortlora.quantize.cli", "int4/int8 weight-only quantization that keeps LoRA inputs float"),
    "finetune": ("ortlora.finetune.cli", "train LoRA / QLoRA / DoRA adapters with PEFT from local data"),
    "generate": ("ortlora.generate.cli", "generate text with the base model and each adapter, streaming"),
    "serve": ("ortlora.serve.cli", "OpenAI-compatible server batching requests for different adapters together"),
}
# command -> its work function, `package:function` (tests/test_olive_flags.py checks each resolves)
WORK: dict[str, str] = {
    "quickstart": "ortlora.quickstart:quickstart", "export": "ortlora.export:export",
    "capture-onnx-graph": "ortlora.export:generate_adapter", "generate-adapter": "ortlora.export:generate_adapter",
    "convert-adapters": "ortlora.adapters:convert_adapters", "merge-adapters": "ortlora.adapters:merge_adapters",
    "inspect": "ortlora.inspect:inspect",
    "quantize": "ortlora.quantize:quantize", "finetune": "ortlora.finetune:finetune",
    "generate": "ortlora.generate:generate", "serve": "ortlora.serve:serve",
}
# Olive's names for the same commands, so its command lines work unchanged.
ALIASES = {"auto-opt": "export"}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that the same `except` / `finally` blocks clean up."""


def _raise_terminated(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a repeated SIGTERM must not cut the cleanup short
    raise Terminated


@contextlib.contextmanager
def _sigterm_raises():
    if threading.current_thread() is not threading.main_thread():  # only the main thread can own handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose usage errors are one line: a command's full usage (Olive's flags included) is a
    screenful that would hide the line that matters."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="ortlora", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ortlora {__version__}")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,  # absent unless given
                        help="show the traceback of an error too (as ORTLORA_DEBUG=1 does), for a bug report")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        aliases = [a for a, target in ALIASES.items() if target == name]
        p = sub.add_parser(name, help=help_, aliases=aliases, description=help_)
        if name == command:  # import only the module that runs
            importlib.import_module(module).configure_parser(p)
            p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    command = ALIASES.get(command, command)
    parser = build_parser(command if command in COMMANDS else None)
    module = importlib.import_module(COMMANDS[command][0]) if command in COMMANDS else None
    try:
        if getattr(module, "PASSTHROUGH", False):
            args, args._extra = parser.parse_known_args(argv)
        else:
            args = parser.parse_args(argv)
    except SystemExit as exc:  # -h, --version (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    if module is None:  # `ortlora` alone (an unknown command is a usage error above)
        parser.print_help(sys.stderr)
        print("ortlora: error: give a command (`ortlora COMMAND -h` lists its options)", file=sys.stderr)
        return 2
    debug = vars(args).pop("debug", False) or os.environ.get("ORTLORA_DEBUG", "") not in ("", "0")
    try:
        with _sigterm_raises():
            result = importlib.import_module(args._module).main(args)
    except Terminated:
        print(f"ortlora {command}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"ortlora {command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`ortlora inspect ... | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush cannot fail again
        return 128 + signal.SIGPIPE
    except Exception as exc:
        message = user_error(exc)
        if message is None:
            if hasattr(exc, "add_note"):  # Python >= 3.11
                exc.add_note(f"ortlora {command}: this is a bug in ortlora, not a problem with the input: please "
                             "report it with this traceback")
            raise
        if debug:
            raise
        print(f"ortlora {command}: error: {message}", file=sys.stderr)
        return 1
    return int(result or 0)


def user_error(exc: BaseException) -> str | None:
    """The one-line message of an error the user can cause (None: a bug, whose traceback is shown)."""
    if isinstance(exc, OrtloraError):
        return str(exc)
    if isinstance(exc, OSError):  # a file read or written: missing, not a folder, no permission, disk full, ...
        if exc.filename is None:
            return exc.strerror or str(exc)
        where = str(exc.filename) + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
        return f"{where}: {exc.strerror or exc}"
    return None


if __name__ == "__main__":
    sys.exit(main())
