"""Training losses (spectral: (B, 1, T) ``(estimate, target)`` -> a scalar; adversarial) and ``losses.metrics``."""

from .adversarial import FeatureMatchingLoss, GANLoss
from .spectral import MelSpectrogramLoss, MultiResolutionSTFTLoss, SubbandMultiResolutionSTFTLoss, mel_spectrogram

__all__ = ["FeatureMatchingLoss", "GANLoss", "MelSpectrogramLoss", "MultiResolutionSTFTLoss",
           "SubbandMultiResolutionSTFTLoss", "mel_spectrogram"]  # fmt: skip
