"""Training losses for the X-Codec generator and discriminators.

Reconstruction losses take ``(estimate, target)`` waveforms of shape (B, 1, T)
and return a scalar; adversarial losses take discriminator outputs (see
``modules.discriminators``).
"""

from .adversarial import FeatureMatchingLoss, GANLoss
from .spectral import (
    MelSpectrogramLoss,
    MultiResolutionSTFTLoss,
    SubbandMultiResolutionSTFTLoss,
    mel_spectrogram,
    stft_magnitude,
)

__all__ = [
    "FeatureMatchingLoss",
    "GANLoss",
    "MelSpectrogramLoss",
    "MultiResolutionSTFTLoss",
    "SubbandMultiResolutionSTFTLoss",
    "mel_spectrogram",
    "stft_magnitude",
]
