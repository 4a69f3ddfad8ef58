"""The ``lorakit`` command line (also ``python -m lorakit``): the parser and ``main``.

Each verb is one module here with ``register(subparsers)``, which declares its arguments and sets
``run`` to a function taking the parsed args and returning the exit code. Adding a verb is one module
and one entry in ``VERBS``; shared argument helpers live in cli/common.py.

    lorakit inspect MODEL [--targets query,value | --regex RE] [--r 8] [--alpha 16] [--rslora]
    lorakit merge --base MODEL --adapter DIR --out DIR
    lorakit train --task TASK --method METHOD --out DIR       lorakit compare --task TASK --out DIR
    lorakit demo          lorakit analyze ADAPTER_DIR --out DIR          lorakit lorahub --out DIR
    lorakit finetune --model M --data FILE --out DIR   lorakit generate --model M [--adapter DIR] --prompt T
    lorakit chat --model M [--adapter DIR]

A refused command (lorakit.LoraError) prints its message and exits with status 2, no traceback.
transformers and matplotlib load inside the verb that needs them, so ``lorakit --help`` stays quick.
"""

from __future__ import annotations

import argparse
import logging
import sys

from lorakit import __version__
from lorakit.cli import (analyze, chat, check_adapter, compare, demo, finetune, generate, inspect,
                         lorahub, merge, serve, train)
from lorakit.errors import LoraError
from lorakit.quant.formats import IMPORT_NOISE_LOGGERS

VERBS = (inspect, train, compare, merge, demo, analyze, lorahub, finetune, generate, chat, serve,
         check_adapter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="Low-Rank Adaptation for PyTorch "
                                     "models: inspect, train, compare, merge, analyze, lorahub, demo.")
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb in VERBS:
        verb.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    for name in IMPORT_NOISE_LOGGERS:         # torchao's import-time warnings; real errors still show
        logging.getLogger(name).setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except LoraError as err:
        print(f"lorakit {args.verb}: error: {err}", file=sys.stderr)
        return 2
