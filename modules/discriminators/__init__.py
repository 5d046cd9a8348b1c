"""Waveform / spectrogram GAN discriminators.

Every top-level discriminator shares one interface::

    logits, fmaps = disc(x)   # x: (B, 1, T) waveform

``logits`` is a list with one (B, N_i) tensor of raw (unbounded) scores per
sub-discriminator, and ``fmaps`` a list (same length) of lists of the hidden
post-activation feature maps of that sub-discriminator (the logits themselves
are not repeated in ``fmaps``). Feed ``logits`` to ``losses.GANLoss`` and
``fmaps`` of real and fake audio to ``losses.FeatureMatchingLoss``.
"""

from .builder import DISCRIMINATORS, DiscriminatorBank, build_discriminators
from .frequency import (
    FrequencyDiscriminator,
    MultiFrequencyDiscriminator,
    SpectrogramFeatures,
)
from .hifigan import (
    MultiPeriodDiscriminator,
    MultiScaleDiscriminator,
    PeriodDiscriminator,
    ScaleDiscriminator,
)
from .stft import MultiScaleSTFTDiscriminator, STFTDiscriminator

__all__ = [
    "DISCRIMINATORS",
    "DiscriminatorBank",
    "FrequencyDiscriminator",
    "MultiFrequencyDiscriminator",
    "MultiPeriodDiscriminator",
    "MultiScaleDiscriminator",
    "MultiScaleSTFTDiscriminator",
    "PeriodDiscriminator",
    "STFTDiscriminator",
    "ScaleDiscriminator",
    "SpectrogramFeatures",
    "build_discriminators",
]
