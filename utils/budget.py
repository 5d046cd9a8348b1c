"""The one size bound: what a config would allocate, estimated before anything is built.

A config value of 10^9 must end in one line naming it, not in a MemoryError or a build that never
ends: every builder estimates from its config the elements it would allocate and calls
:func:`check_budget` first, which blames the key whose default shrinks the estimate most.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from utils.config import ConfigError

# 2^31 elements: 8 GiB of float32 in one model or one tensor, over 10x the largest release
# (about 0.2e9 parameters) and 37 hours of 16 kHz audio in one clip.
MAX_ELEMENTS = 2**31
# One training step's estimate counts a few of its tensors only; the release recipe's is 0.26e9,
# and a large GPU fits tens of times that batch.
MAX_STEP_ELEMENTS = 8 * MAX_ELEMENTS


def elements(estimate: Callable[[Mapping[str, Any]], float], values: Mapping[str, Any]) -> float:
    """``estimate(values)`` as a float; an overflow, a NaN or a value the estimate cannot use is ``inf``."""
    try:
        n = float(estimate(values))
    except (OverflowError, ValueError, TypeError, ZeroDivisionError):
        return math.inf
    return n if n == n else math.inf


def over_budget(n: float, limit: int = MAX_ELEMENTS) -> bool:
    """``n`` elements (a float: inf and NaN count as too many) is more than ``limit``."""
    return not n <= limit


def check_budget(estimate: Callable[[Mapping[str, Any]], float], values: Mapping[str, Any], defaults: Mapping[str, Any],
                 where: str, what: str = "parameters", limit: int = MAX_ELEMENTS) -> None:  # fmt: skip
    """Refuse ``values`` (the config's keys as the user names them) when ``estimate(values)`` elements
    (float arithmetic) exceed ``limit``; ``defaults``: a plausible value for each key, ``where``: the
    message's prefix (``"config.yaml: generator.config."``), ``what``: what is counted.

    Raises:
        ConfigError: ``{where}{key}: ...`` naming the key whose default shrinks the estimate most.
    """
    total = elements(estimate, values)
    if not over_budget(total, limit):
        return
    candidates = [k for k in values if k in defaults and values[k] != defaults[k]] or list(values)
    key = min(candidates, key=lambda k: elements(estimate, {**values, k: defaults.get(k, values[k])}))
    size = "an unbounded number of" if math.isinf(total) else f"about {total:.3g}"
    bound = f"over the bound of {limit:.3g}; not a plausible setting"
    raise ConfigError(f"{where}{key}: {values[key]!r} would allocate {size} {what}, {bound}")
