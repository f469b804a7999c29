"""Shared command-line plumbing: ``--config FILE key=value ...`` and one-line errors.

Every console script is ``main = entry_point(prog, run)``: a :class:`UserError` anywhere
below becomes ``prog: error: <message>`` on stderr and exit code 2, with no traceback.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from launch.config import Schema, describe_fields, load_config
from launch.errors import UserError

S = TypeVar("S", bound=Schema)


def config_parser(prog: str, schema: type[Schema], description: str) -> argparse.ArgumentParser:
    """A parser taking ``--config FILE`` and ``key=value`` overrides; ``--help`` lists every key."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="settings (override any with key=value):\n" + "\n".join(describe_fields(schema)),
    )
    parser.add_argument("--config", type=Path, default=None, help="YAML config file (defaults <- file <- overrides)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. trainer.epochs=5")
    return parser


def parse_config(
    parser: argparse.ArgumentParser, schema: type[S], argv: Sequence[str] | None
) -> tuple[S, argparse.Namespace]:
    args = parser.parse_args(argv)
    return load_config(schema, args.config, args.overrides), args


def entry_point(prog: str, run: Callable[[list[str]], int | None]) -> Callable[[list[str] | None], int]:
    """Wrap ``run(argv)`` as a console script: logging set up, user errors -> exit 2."""

    @functools.wraps(run)
    def main(argv: list[str] | None = None) -> int:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        try:
            code = run(list(sys.argv[1:] if argv is None else argv))
        except UserError as err:
            print(f"{prog}: error: {err}", file=sys.stderr)
            raise SystemExit(err.exit_code) from None
        return int(code or 0)

    return main
