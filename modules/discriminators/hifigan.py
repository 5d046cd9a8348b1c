"""HiFi-GAN multi-period ("mpd") and multi-scale ("msd") waveform discriminators."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

Logits = list[torch.Tensor]
FeatureMaps = list[list[torch.Tensor]]

_LRELU_SLOPE = 0.1

# (in, out, kernel, stride, groups) of HiFi-GAN's DiscriminatorS
_SCALE_LAYERS = (
    (1, 128, 15, 1, 1),
    (128, 128, 41, 2, 4),
    (128, 256, 41, 2, 16),
    (256, 512, 41, 4, 16),
    (512, 1024, 41, 4, 16),
    (1024, 1024, 41, 1, 16),
    (1024, 1024, 5, 1, 1),
)


def _run_stack(
    convs: nn.ModuleList, post: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    fmaps = []
    for conv in convs:
        x = F.leaky_relu(conv(x), _LRELU_SLOPE)
        fmaps.append(x)
    return post(x).flatten(1), fmaps


class PeriodDiscriminator(nn.Module):
    """Discriminator on the waveform folded into a (T / period, period) image.

    Args:
        period: folding period p in samples.
        kernel_size: kernel length along the folded time axis.
        stride: stride along the folded time axis for the first four convs.

    Shapes:
        (B, 1, T) -> logits (B, N) and 5 feature maps (B, C, T_i, p).
    """

    def __init__(self, period: int, kernel_size: int = 5, stride: int = 3):
        super().__init__()
        self.period = period
        widths = [1, 32, 128, 512, 1024, 1024]
        strides = [stride] * 4 + [1]
        pad = (kernel_size - 1) // 2
        self.convs = nn.ModuleList(
            weight_norm(
                nn.Conv2d(c_in, c_out, (kernel_size, 1), (s, 1), padding=(pad, 0))
            )
            for c_in, c_out, s in zip(widths[:-1], widths[1:], strides)
        )
        self.conv_post = weight_norm(nn.Conv2d(widths[-1], 1, (3, 1), padding=(1, 0)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        remainder = x.shape[-1] % self.period
        if remainder:
            x = F.pad(x, (0, self.period - remainder), mode="reflect")
        x = x.reshape(x.shape[0], x.shape[1], -1, self.period)
        return _run_stack(self.convs, self.conv_post, x)


class MultiPeriodDiscriminator(nn.Module):
    """HiFi-GAN multi-period discriminator ("mpd").

    Args:
        period_sizes: one :class:`PeriodDiscriminator` per period.
        period_kernel_size: kernel length of the period discriminators.

    Forward:
        x: waveform (B, 1, T).
        Returns ``(logits, fmaps)``: ``logits[i]`` is (B, N_i), ``fmaps[i]`` the 5 hidden activations.
    """

    def __init__(
        self,
        period_sizes: Sequence[int] = (2, 3, 5, 7, 11),
        period_kernel_size: int = 5,
    ):
        super().__init__()
        self.discriminators = nn.ModuleList(
            PeriodDiscriminator(p, period_kernel_size) for p in period_sizes
        )

    def forward(self, x: torch.Tensor) -> tuple[Logits, FeatureMaps]:
        x = x.reshape(x.shape[0], 1, x.shape[-1])
        outs = [d(x) for d in self.discriminators]
        return [o[0] for o in outs], [o[1] for o in outs]


class ScaleDiscriminator(nn.Module):
    """Grouped 1-D conv stack on a (possibly pooled) waveform.

    Args:
        use_spectral_norm: spectral instead of weight normalisation (HiFi-GAN uses it on the raw scale).

    Shapes:
        (B, 1, T) -> logits (B, N) and 7 feature maps (B, C, T_i).
    """

    def __init__(self, use_spectral_norm: bool = False):
        super().__init__()
        norm = spectral_norm if use_spectral_norm else weight_norm
        self.convs = nn.ModuleList(
            norm(nn.Conv1d(c_in, c_out, k, s, groups=g, padding=(k - 1) // 2))
            for c_in, c_out, k, s, g in _SCALE_LAYERS
        )
        self.conv_post = norm(nn.Conv1d(1024, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return _run_stack(self.convs, self.conv_post, x)


class MultiScaleDiscriminator(nn.Module):
    """HiFi-GAN multi-scale discriminator ("msd").

    Scale 0 sees the raw waveform (spectral norm); each further scale sees the
    previous one average-pooled.

    Args:
        num_scales: number of scale discriminators.
        pool_kernel_size: average-pool kernel between scales.
        pool_stride: average-pool stride between scales.

    Forward:
        x: waveform (B, 1, T).
        Returns ``(logits, fmaps)``: ``logits[i]`` is (B, N_i), ``fmaps[i]`` the 7 hidden activations.
    """

    def __init__(
        self, num_scales: int = 3, pool_kernel_size: int = 4, pool_stride: int = 2
    ):
        super().__init__()
        self.discriminators = nn.ModuleList(
            ScaleDiscriminator(use_spectral_norm=i == 0) for i in range(num_scales)
        )
        self.pool = nn.AvgPool1d(
            pool_kernel_size, pool_stride, padding=pool_kernel_size // 2
        )

    def forward(self, x: torch.Tensor) -> tuple[Logits, FeatureMaps]:
        x = x.reshape(x.shape[0], 1, x.shape[-1])
        logits, fmaps = [], []
        for i, disc in enumerate(self.discriminators):
            if i > 0:
                x = self.pool(x)
            out, feats = disc(x)
            logits.append(out)
            fmaps.append(feats)
        return logits, fmaps
