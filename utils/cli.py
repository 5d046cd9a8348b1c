"""What the command-line tools share: one-line fatal errors, exit codes, the device choice."""

import argparse
import sys
from collections.abc import Callable

import torch

from utils.distributed import first_to_report

EXIT_OK, EXIT_SOME_FAILED, EXIT_ERROR = 0, 1, 2


class CliError(Exception):
    """A fatal problem, reported as one line on stderr (no traceback)."""


def cli_main(parse_args: Callable[[list[str] | None], argparse.Namespace], run: Callable[[argparse.Namespace], int],
             argv: list[str] | None = None, one_line: tuple[type[BaseException], ...] = ()) -> int:  # fmt: skip
    """Parse and run; :class:`CliError`, OSError and ``one_line`` types become one ``error:`` line, exit code 2."""
    args = parse_args(argv)
    try:
        return run(args)
    except (CliError, OSError, *one_line) as exc:
        report_error(exc)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def report_error(exc: BaseException) -> None:
    """A fatal error as one ``error:`` line on stderr, once per job; an OSError path first (a rename's target)."""
    line = f"error: {exc}"
    if isinstance(exc, OSError):
        where = exc.filename2 or exc.filename
        line = f"error: {str(where) + ': ' if where else ''}{exc.strerror or exc}"
    if first_to_report(line):
        print(line, file=sys.stderr, flush=True)


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` with every real default shown (not ``None`` or ``False``), the description as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def argument_parser(description: str) -> argparse.ArgumentParser:
    """The tools' parser: ``--help`` shows every default."""
    return argparse.ArgumentParser(description=description, formatter_class=DefaultsHelpFormatter)


def resolve_device(device: str | None) -> str:
    """``--device``: the given torch device, checked (``cpu`` or ``cuda[:N]``), or cuda when available, else cpu."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise CliError(f"unknown --device {device!r}; use cpu or cuda[:N]") from None
    if kind not in ("cpu", "cuda"):
        raise CliError(f"--device {device}: not supported; use cpu or cuda[:N]")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"--device {device}: CUDA is not available on this machine")
    return device
