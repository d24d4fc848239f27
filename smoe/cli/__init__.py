"""The `smoe` command, one module per verb family (mlx-lm's layout):

    generate.py     generate, chat
    train.py        train, finetune
    analysis.py     routes, profile
    checkpoints.py  info, quantize, convert, lora merge, bench
    serve.py        serve (the OpenAI-compatible server, smoe/server)
    common.py       the model and sampling flags every model verb shares

User mistakes (bad path, bad flag value, broken checkpoint) print one line
`smoe: error: ...` and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from smoe import __version__
from smoe.cli import analysis, checkpoints, generate, serve, train
from smoe.cli.common import EXIT_USAGE, LOADED
from smoe.errors import SmoeError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smoe", description="Run Mixtral-family sparse mixture-of-experts models.",
        epilog="Example: smoe generate --model ./Mixtral-8x7B --prompt 'The capital of France is'",
    )
    parser.add_argument("--version", action="version", version=f"smoe {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for family in (generate, train, analysis, checkpoints, serve):
        family.register(sub)
    return parser


def _version() -> str:

    return __version__


def main(argv: list[str] | None = None) -> int:

    args = build_parser().parse_args(argv)
    try:
        code = args.run(args)
        for model in LOADED:
            print(model.expert_store.stats.format(), file=sys.stderr)
        LOADED.clear()
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below
        return code
    except BrokenPipeError:  # `smoe generate ... | head`: the reader has what it wanted
        # further writes to stdout (at exit too) must not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except SmoeError as e:
        print(f"smoe: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # unreadable file, permission denied, disk full
        print(f"smoe: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
