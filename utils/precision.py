"""Inference precision: the names, their check, and what the CPU can do fast."""

from __future__ import annotations

import functools
import warnings

import torch

PRECISIONS = ("fp32", "bf16")

_warned: set[str] = set()


def warn_once(message: str, stacklevel: int = 3) -> None:
    """A RuntimeWarning, once per process per message."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)


def reset_warnings() -> None:
    """Forget which :func:`warn_once` messages were given (tests)."""
    _warned.clear()


@functools.cache
def cpu_has_amx() -> bool | None:
    """Whether this CPU has AMX tiles (fast bf16 matrix units); None when unknown."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if probe is not None:
        try:
            return bool(probe())
        except RuntimeError:
            pass
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    return None if flags is None else "amx_tile" in flags


def check_precision(precision: str, device: torch.device | None = None) -> str:
    """Return ``precision`` after checking it is one of :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" and device is not None and device.type == "cpu" and cpu_has_amx() is False:
        warn_once(
            "bf16 on a CPU without AMX runs at about half the float32 rate (oneDNN has no "
            "fast bf16 kernels there): precision='fp32' is faster on this machine"
        )
    return precision
