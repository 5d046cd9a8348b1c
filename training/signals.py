"""A graceful stop on SIGTERM (schedulers, preemption) and SIGINT (Ctrl-C).

The training loop asks :meth:`StopSignals.requested_on_any_rank` after every step; once a
signal arrived on any rank, every rank leaves the loop at the same step, the final checkpoint
is saved and the script exits with 128 + the signal number. A second SIGINT interrupts at once.
"""

from __future__ import annotations

import signal

import torch

from utils import distributed as du


class StopSignals:
    """Install the handlers for the duration of a ``with`` block (main thread only).

    Attributes:
        received: the first signal number received (``None``: none).
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.received = signum

    def requested_on_any_rank(self, device: torch.device | str = "cpu") -> bool:
        """True on every rank once any rank received a signal (a collective with several ranks)."""
        if du.world_size() == 1:
            return self.received is not None
        return du.any_rank(self.received is not None, device)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def __enter__(self) -> StopSignals:
        try:
            self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        except ValueError:  # not the main thread: leave the defaults
            self._previous = {}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
