"""Training losses for the X-Codec generator and discriminators, and the evaluation metrics
built on them (``losses.metrics``). Reconstruction losses take ``(estimate, target)`` waveforms
(B, 1, T) and return a scalar; adversarial losses take discriminator outputs (``modules.discriminators``)."""

from .adversarial import FeatureMatchingLoss, GANLoss
from .spectral import MelSpectrogramLoss, MultiResolutionSTFTLoss, SubbandMultiResolutionSTFTLoss, mel_spectrogram

__all__ = [
    "FeatureMatchingLoss", "GANLoss", "MelSpectrogramLoss", "MultiResolutionSTFTLoss",
    "SubbandMultiResolutionSTFTLoss", "mel_spectrogram",
]  # fmt: skip
