"""Construct the discriminators named in a training config."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from .frequency import MultiFrequencyDiscriminator
from .hifigan import MultiPeriodDiscriminator, MultiScaleDiscriminator
from .stft import MultiScaleSTFTDiscriminator

DISCRIMINATORS: dict[str, type[nn.Module]] = {
    "mfd": MultiFrequencyDiscriminator,
    "mpd": MultiPeriodDiscriminator,
    "msd": MultiScaleDiscriminator,
    "msstftd": MultiScaleSTFTDiscriminator,
}


def build_discriminators(
    d_list: Sequence[str], configs: Mapping[str, Mapping[str, Any]] | None = None
) -> nn.ModuleDict:
    """Instantiate discriminators by short name.

    Args:
        d_list: names from {"mfd", "mpd", "msd", "msstftd"}, e.g. ``["mfd"]`` for the released recipe.
        configs: ``configs[name]`` holds the constructor kwargs (the YAML ``config:`` sub-dict);
            a missing entry means the class defaults, which are the recipe values.

    Returns:
        ``nn.ModuleDict`` keyed by name, in ``d_list`` order.

    Raises:
        ValueError: on an unknown name.
    """
    configs = configs or {}
    unknown = [name for name in d_list if name not in DISCRIMINATORS]
    if unknown:
        raise ValueError(
            f"unknown discriminator(s) {unknown}; valid names are {sorted(DISCRIMINATORS)}"
        )
    return nn.ModuleDict(
        {name: DISCRIMINATORS[name](**dict(configs.get(name) or {})) for name in d_list}
    )
