"""EnCodec multi-scale complex STFT discriminator ("msstftd")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

Logits = list[torch.Tensor]
FeatureMaps = list[list[torch.Tensor]]


def _same_padding(
    kernel_size: tuple[int, int], dilation: tuple[int, int] = (1, 1)
) -> tuple[int, int]:
    return (
        (kernel_size[0] - 1) * dilation[0] // 2,
        (kernel_size[1] - 1) * dilation[1] // 2,
    )


class STFTDiscriminator(nn.Module):
    """2-D conv discriminator on the real/imaginary parts of one STFT.

    The STFT is un-centred and, when ``normalized``, divided by the window's
    L2 norm (torchaudio's ``normalized=True`` convention used by EnCodec).

    Args:
        filters: base channel count.
        in_channels: audio channels.
        out_channels: logit channels.
        n_fft: FFT size.
        hop_length: STFT hop.
        win_length: Hann window length.
        max_filters: channel cap.
        filters_scale: channel growth factor per layer.
        kernel_size: (time, freq) kernel.
        dilations: time dilations of the strided convs.
        stride: (time, freq) stride of the dilated convs.
        normalized: normalise the STFT by the window norm.

    Shapes:
        (B, in_channels, T) -> logits (B, N) and 5 feature maps (B, C, frames, F_i).
    """

    def __init__(
        self,
        filters: int,
        in_channels: int = 1,
        out_channels: int = 1,
        n_fft: int = 1024,
        hop_length: int = 256,
        win_length: int = 1024,
        max_filters: int = 1024,
        filters_scale: int = 1,
        kernel_size: tuple[int, int] = (3, 9),
        dilations: Sequence[int] = (1, 2, 4),
        stride: tuple[int, int] = (1, 2),
        normalized: bool = True,
    ):
        super().__init__()
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.win_length = win_length
        self.normalized = normalized
        self.register_buffer("window", torch.hann_window(win_length), persistent=False)

        kernel_size = tuple(kernel_size)
        square = (kernel_size[0], kernel_size[0])
        # EnCodec leaves the very first conv un-normalised.
        convs = [
            nn.Conv2d(
                2 * in_channels,
                filters,
                kernel_size,
                padding=_same_padding(kernel_size),
            )
        ]
        in_chs = min(filters_scale * filters, max_filters)
        for i, dilation in enumerate(dilations):
            out_chs = min(filters_scale ** (i + 1) * filters, max_filters)
            convs.append(
                weight_norm(
                    nn.Conv2d(
                        in_chs,
                        out_chs,
                        kernel_size,
                        stride=tuple(stride),
                        dilation=(dilation, 1),
                        padding=_same_padding(kernel_size, (dilation, 1)),
                    )
                )
            )
            in_chs = out_chs
        out_chs = min(filters_scale ** (len(dilations) + 1) * filters, max_filters)
        convs.append(
            weight_norm(
                nn.Conv2d(in_chs, out_chs, square, padding=_same_padding(square))
            )
        )
        self.convs = nn.ModuleList(convs)
        self.conv_post = weight_norm(
            nn.Conv2d(out_chs, out_channels, square, padding=_same_padding(square))
        )

    def spectrogram(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T) -> (B, 2C, frames, n_fft // 2 + 1), real parts then imaginary parts."""
        b, c, t = x.shape
        spec = torch.stft(
            x.reshape(b * c, t).float(),
            self.n_fft,
            self.hop_length,
            self.win_length,
            self.window,
            center=False,
            return_complex=True,
        )
        if self.normalized:
            spec = spec / self.window.pow(2).sum().sqrt()
        spec = spec.reshape(b, c, *spec.shape[-2:])
        return torch.cat([spec.real, spec.imag], dim=1).transpose(2, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.spectrogram(x)
        fmaps = []
        for conv in self.convs:
            z = F.leaky_relu(conv(z), 0.2)
            fmaps.append(z)
        return self.conv_post(z).flatten(1), fmaps


class MultiScaleSTFTDiscriminator(nn.Module):
    """EnCodec multi-scale STFT discriminator ("msstftd").

    Args:
        filters: base channel count of every sub-discriminator.
        in_channels: audio channels.
        out_channels: logit channels.
        n_ffts: FFT size per scale.
        hop_lengths: hop per scale.
        win_lengths: window length per scale.
        **kwargs: forwarded to :class:`STFTDiscriminator`.

    Forward:
        x: waveform (B, 1, T), T >= max(win_lengths).
        Returns ``(logits, fmaps)``: ``logits[i]`` is (B, N_i), ``fmaps[i]`` the 5 hidden activations.
    """

    def __init__(
        self,
        filters: int = 32,
        in_channels: int = 1,
        out_channels: int = 1,
        n_ffts: Sequence[int] = (1024, 2048, 512),
        hop_lengths: Sequence[int] = (256, 512, 128),
        win_lengths: Sequence[int] = (1024, 2048, 512),
        **kwargs,
    ):
        super().__init__()
        if not len(n_ffts) == len(hop_lengths) == len(win_lengths):
            raise ValueError(
                "n_ffts, hop_lengths and win_lengths must have the same length"
            )
        self.discriminators = nn.ModuleList(
            STFTDiscriminator(
                filters,
                in_channels,
                out_channels,
                n_fft=n,
                hop_length=h,
                win_length=w,
                **kwargs,
            )
            for n, h, w in zip(n_ffts, hop_lengths, win_lengths)
        )

    def forward(self, x: torch.Tensor) -> tuple[Logits, FeatureMaps]:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        outs = [d(x) for d in self.discriminators]
        return [o[0] for o in outs], [o[1] for o in outs]
