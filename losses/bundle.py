"""Every loss of the training recipe in one module, configured from the recipe's sections."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from .adversarial import FeatureMatchingLoss, GANLoss
from .spectral import MelSpectrogramLoss, MultiResolutionSTFTLoss, SubbandMultiResolutionSTFTLoss


class LossBundle(nn.Module):
    """The generator's and discriminators' losses.

    Args:
        full_stft: ``fft_sizes``, ``hop_sizes``, ``win_sizes`` of the full-band STFT loss
            (the recipe's ``full_multi_scale_stft_loss``).
        sub_stft: ``num_bands`` and the same sizes for the PQMF sub-band loss (``sub_multi_scale_stft_loss``).
        mel: :class:`MelSpectrogramLoss` arguments (``mel_scale_loss``).

    Attributes: ``full_stft``, ``sub_stft`` and ``mel`` (``(estimate (B, 1, T), target (B, 1, T)) -> ()``),
    ``gan`` (``.generator(fake_logits)`` / ``.discriminator(real_logits, fake_logits)``) and
    ``feature_matching`` (``(real_fmaps, fake_fmaps) -> ()``).
    """

    def __init__(self, full_stft: Mapping[str, Any], sub_stft: Mapping[str, Any], mel: Mapping[str, Any]):
        super().__init__()
        self.full_stft = MultiResolutionSTFTLoss(full_stft["fft_sizes"], full_stft["hop_sizes"], full_stft["win_sizes"])
        self.sub_stft = SubbandMultiResolutionSTFTLoss(sub_stft["num_bands"], sub_stft["fft_sizes"],
                                                       sub_stft["hop_sizes"], sub_stft["win_sizes"])  # fmt: skip
        self.mel = MelSpectrogramLoss(**mel)
        self.gan = GANLoss()
        self.feature_matching = FeatureMatchingLoss()
