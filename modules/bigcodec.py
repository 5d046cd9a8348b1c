"""X-Codec 2's acoustic encoder (BigCodec, Xin et al. 2024): DAC's encoder with anti-aliased SnakeBeta activations
(BigVGAN's alias-free up/down-sampling around each activation). Parameter names are transformers' ``Xcodec2Model``
(``acoustic_encoder.*``); models.xcodec2_layout maps the original's. Each op in the reference's order: codes of
the same weights are bitwise those of transformers'."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def kaiser_sinc_filter(cutoff: float, half_width: float, kernel_size: int) -> torch.Tensor:
    """(1, 1, kernel_size) Kaiser-windowed sinc low-pass (BigVGAN's alias-free filter), summing to 1."""
    even, half = kernel_size % 2 == 0, kernel_size // 2
    attenuation = 2.285 * (half - 1) * math.pi * 4 * half_width + 7.95
    if attenuation > 50.0:
        beta = 0.1102 * (attenuation - 8.7)
    elif attenuation >= 21.0:
        beta = 0.5842 * (attenuation - 21) ** 0.4 + 0.07886 * (attenuation - 21.0)
    else:
        beta = 0.0
    window = torch.kaiser_window(kernel_size, beta=beta, periodic=False, dtype=torch.float32)
    t = torch.arange(-half, half) + 0.5 if even else torch.arange(kernel_size) - half
    taps = 2 * cutoff * window * torch.sinc(2 * cutoff * t)
    return (taps / taps.sum()).view(1, 1, kernel_size)


class SnakeBeta(nn.Module):
    """``x + sin^2(e^alpha x) / e^beta`` with learned log-scale alpha and beta per channel. (B, C, T)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha, beta = self.alpha[None, :, None].exp(), self.beta[None, :, None].exp()
        return x + (1.0 / (beta + 1e-9)) * torch.pow(torch.sin(x * alpha), 2)


class AntiAliasedSnakeBeta(nn.Module):
    """Upsample x2 (low-pass, 12 taps) -> SnakeBeta -> low-pass and downsample x2; edges replicated. (B, C, T)."""

    RATIO, TAPS = 2, 12

    def __init__(self, channels: int):
        super().__init__()
        self.act = SnakeBeta(channels)
        r, k = self.RATIO, self.TAPS
        self.register_buffer("filter", kaiser_sinc_filter(0.5 / r, 0.6 / r, k), persistent=False)  # up and down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, k, c = self.RATIO, self.TAPS, x.shape[1]
        pad = k // r - 1
        x = F.pad(x, (pad, pad), mode="replicate")
        taps = self.filter.to(x.dtype).expand(c, -1, -1)
        x = r * F.conv_transpose1d(x, taps, stride=r, groups=c)
        x = x[..., pad * r + (k - r) // 2 : -(pad * r + (k - r + 1) // 2)]
        x = F.pad(self.act(x), (k // 2 - 1, k // 2), mode="replicate")
        return F.conv1d(x, taps, stride=r, groups=c)


class ResidualUnit(nn.Module):
    """Activation -> dilated conv k7 -> activation -> conv k1, plus skip. (B, C, T)."""

    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.snake1 = AntiAliasedSnakeBeta(dim)
        self.conv1 = nn.Conv1d(dim, dim, kernel_size=7, dilation=dilation, padding=3 * dilation)
        self.snake2 = AntiAliasedSnakeBeta(dim)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.snake2(self.conv1(self.snake1(x))))


class EncoderBlock(nn.Module):
    """Three residual units (dilations 1, 3, 9), activation, strided conv doubling the channels. (B, C, T)."""

    def __init__(self, dim: int, stride: int):
        super().__init__()
        self.res_unit1, self.res_unit2, self.res_unit3 = (ResidualUnit(dim // 2, d) for d in (1, 3, 9))
        self.snake1 = AntiAliasedSnakeBeta(dim // 2)
        self.conv1 = nn.Conv1d(dim // 2, dim, kernel_size=2 * stride, stride=stride, padding=math.ceil(stride / 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(self.snake1(self.res_unit3(self.res_unit2(self.res_unit1(x)))))


class BigCodecEncoder(nn.Module):
    """(B, 1, T) audio, T a multiple of prod(``ratios``) -> (B, ``out_dim``, T / prod(ratios)) latents.

    Args:
        width: channels after the first conv (48), doubled by each block.
        ratios: the blocks' strides ((2, 2, 4, 4, 5): 320 samples a frame).
        out_dim: latent channels (1024).
    """

    def __init__(self, width: int, ratios: Sequence[int], out_dim: int):
        super().__init__()
        self.conv1 = nn.Conv1d(1, width, kernel_size=7, padding=3)
        self.block = nn.ModuleList(EncoderBlock(width * 2**i, s) for i, s in enumerate(ratios, start=1))
        self.snake1 = AntiAliasedSnakeBeta(width * 2 ** len(ratios))
        self.conv2 = nn.Conv1d(width * 2 ** len(ratios), out_dim, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for block in self.block:
            x = block(x)
        return self.conv2(self.snake1(x))
