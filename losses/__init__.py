"""Training losses (reconstruction: ``(estimate, target)`` (B, 1, T) waveforms -> a scalar; adversarial: on
discriminator outputs) and the evaluation metrics built on them (``losses.metrics``)."""

from .adversarial import FeatureMatchingLoss, GANLoss
from .spectral import MelSpectrogramLoss, MultiResolutionSTFTLoss, SubbandMultiResolutionSTFTLoss, mel_spectrogram

__all__ = [
    "FeatureMatchingLoss", "GANLoss", "MelSpectrogramLoss", "MultiResolutionSTFTLoss",
    "SubbandMultiResolutionSTFTLoss", "mel_spectrogram",
]  # fmt: skip
