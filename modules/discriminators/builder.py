"""Construct the discriminators named in a training config, and run them as one module."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
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


class DiscriminatorBank(nn.Module):
    """The discriminators of ``d_list`` behind one forward (one DDP wrapper, one call per step).

    Args:
        discriminators: name -> discriminator (the interface of this package).

    Forward:
        x: (B, 1, T) waveforms.
        Returns ``{name: (logits, fmaps)}``; ``logits`` a list of (B, N_i), ``fmaps`` a
        list (per sub-discriminator) of lists of feature maps (B, C, ...).
    """

    def __init__(self, discriminators: nn.ModuleDict):
        super().__init__()
        self.discs = discriminators

    def forward(self, x: torch.Tensor) -> dict[str, tuple[list[torch.Tensor], list[list[torch.Tensor]]]]:
        return {name: disc(x) for name, disc in self.discs.items()}
