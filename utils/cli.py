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


def load_codec(checkpoint: str, config, device: str | None):
    """``XCodec.from_pretrained`` for a CLI: default device, and one-line errors as CliError."""
    import torch

    from models import XCodec
    from models.pretrained import CheckpointError

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(device)
    except RuntimeError:
        raise CliError(f"unknown --device {device!r}") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"--device {device}: CUDA is not available on this machine")
    try:
        return XCodec.from_pretrained(checkpoint, config=config, device=device)
    except CheckpointError as exc:
        raise CliError(str(exc)) from None
