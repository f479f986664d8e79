"""`ortlora quickstart`: the whole pipeline on a built-in tiny model, no download."""

from __future__ import annotations

import argparse

from ortlora.argtypes import positive_int


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="ortlora-quickstart", help="where every stage writes (default: %(default)s)")
    p.add_argument("--pretrain-steps", type=positive_int, default=250)
    p.add_argument("--finetune-steps", type=positive_int, default=150)
    p.add_argument("--n-eval", type=positive_int, default=64, help="held-out prompts per task")


def main(args: argparse.Namespace) -> None:
    from ortlora.quickstart import quickstart

    quickstart(args.workdir, pretrain_steps=args.pretrain_steps, finetune_steps=args.finetune_steps,
               n_eval=args.n_eval)
