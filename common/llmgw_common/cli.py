"""``llmgw``: the project's one command.

Every subcommand comes from whichever of the project's packages are installed, found through the
``llmgw.commands`` entry-point group (as dask's CLI finds its plugins): the proxy package adds ``proxy``;
the operator package adds ``operator`` and ``status``; the development package adds ``fake-provider``,
``demo`` and ``cluster``. A package that is not installed (each image has one of the first two) is never
imported.

An entry point names a function ``register(subparsers)`` that adds its subcommand's parser and sets its
``run`` default: a function of the parsed arguments returning the exit code. Registering must stay cheap;
the subcommand imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import sys
from collections.abc import Callable

COMMANDS_GROUP = "llmgw.commands"
Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def plugins() -> list[Register]:
    """The installed packages' subcommands, in a stable order."""
    entry_points = sorted(importlib.metadata.entry_points(group=COMMANDS_GROUP), key=lambda ep: ep.name)
    return [ep.load() for ep in entry_points]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmgw", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--log-level",
        default=os.environ.get("LLMGW_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (env LLMGW_LOG_LEVEL)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in plugins():
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
