"""The one size bound: every builder estimates what its config would allocate and calls :func:`check_budget`
first, so a value of 10^9 ends in one line naming its key, not a MemoryError or a build that never ends."""

import math
from collections.abc import Callable, Mapping
from typing import Any

from utils.config import ConfigError

MAX_ELEMENTS = 2**31  # 8 GiB of float32: over 10x the largest release (0.2e9) and 37 h of 16 kHz audio in a clip
MAX_STEP_ELEMENTS = 8 * MAX_ELEMENTS  # a training step's few counted tensors: the release recipe's are 0.26e9


def elements(estimate: Callable[[Mapping[str, Any]], float], values: Mapping[str, Any]) -> float:
    """``estimate(values)`` as a float; an overflow, a NaN or a value the estimate cannot use is ``inf``."""
    try:
        n = float(estimate(values))
    except (OverflowError, ValueError, TypeError, ZeroDivisionError):
        return math.inf
    return n if n == n else math.inf


def check_budget(estimate: Callable[[Mapping[str, Any]], float], values: Mapping[str, Any], defaults: Mapping[str, Any],
                 where: str, what: str = "parameters", limit: int = MAX_ELEMENTS) -> None:  # fmt: skip
    """ConfigError ``{where}{key}: ...`` when ``estimate(values)`` (the config's keys as the user names them) exceeds
    ``limit``, blaming the key whose value in ``defaults`` (plausible ones) shrinks the estimate most."""
    total = elements(estimate, values)
    if total <= limit:  # NaN is never within
        return
    candidates = [k for k in values if k in defaults and values[k] != defaults[k]] or list(values)
    key = min(candidates, key=lambda k: elements(estimate, {**values, k: defaults.get(k, values[k])}))
    size = "an unbounded number of" if math.isinf(total) else f"about {total:.3g}"
    bound = f"over the bound of {limit:.3g}; not a plausible setting"
    raise ConfigError(f"{where}{key}: {values[key]!r} would allocate {size} {what}, {bound}")
