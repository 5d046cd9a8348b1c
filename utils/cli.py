"""What the command-line tools share: one-line fatal errors and exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

EXIT_OK, EXIT_SOME_FAILED, EXIT_ERROR = 0, 1, 2


class CliError(Exception):
    """A fatal problem, reported as one line on stderr (no traceback)."""


def cli_main(parse_args: Callable[[list[str] | None], argparse.Namespace], run: Callable[[argparse.Namespace], int],
             argv: list[str] | None = None) -> int:
    """Parse, run, and turn :class:`CliError` into one ``error:`` line and exit code 2."""
    args = parse_args(argv)
    try:
        return run(args)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
