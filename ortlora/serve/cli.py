"""`ortlora serve`: an OpenAI-compatible server for one model and many LoRA adapters, batched together.

    ortlora serve -m out --adapters adapters/ --port 8000
    curl localhost:8000/v1/completions -d '{"model": "acme-support", "prompt": "Hello", "max_tokens": 16}'
"""

from __future__ import annotations

import argparse


def configure_parser(p: argparse.ArgumentParser) -> None:
    from ortlora.serve.config import ServeConfig

    ServeConfig.add_arguments(p)


def main(args: argparse.Namespace) -> int:
    from ortlora.serve import serve
    from ortlora.serve.config import ServeConfig

    return serve(config=ServeConfig.from_namespace(args))
