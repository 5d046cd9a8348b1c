"""Convolutional semantic encoder and decoder around the teacher features: plain (not
weight-normed) convs with ELU residual units, in the released checkpoints' layout
(``encoder_semantic.*``, ``decoder_semantic.*``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .acoustic import masked


class SameConv1d(nn.Module):
    """Conv1d with "same" padding for odd kernels; parameters live in ``.conv``."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, dilation: int = 1, bias: bool = True):
        super().__init__()
        padding = (kernel_size - 1) // 2 * dilation
        self.conv = nn.Conv1d(in_ch, out_ch, kernel_size, padding=padding, dilation=dilation, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class SemanticResidualUnit(nn.Module):
    """ELU -> conv k -> ELU -> conv 1x1, plus skip (no biases). (B, C, T) -> (B, C, T)."""

    def __init__(self, channels: int, kernel_size: int = 3, dilation: int = 1):
        super().__init__()
        self.activation = nn.ELU()
        self.conv1 = SameConv1d(channels, channels, kernel_size, dilation=dilation, bias=False)
        self.conv2 = nn.Conv1d(channels, channels, 1, bias=False)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        y = masked(self.conv1(self.activation(x)), lengths)
        y = masked(self.conv2(self.activation(y)), lengths)
        return x + y


class SemanticBlock(nn.Module):
    """Residual units and a length-preserving conv (stride 1, as in every release)."""

    def __init__(self, channels: int, dilations: Sequence[int], kernel_size: int, decoder: bool):
        super().__init__()
        self.decoder = decoder  # the conv before the units (decoder) or after them (encoder)
        self.res_units = nn.ModuleList([SemanticResidualUnit(channels, kernel_size, d) for d in dilations])
        self.conv = SameConv1d(channels, channels, 3)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if self.decoder:
            x = masked(self.conv(x), lengths)
        for unit in self.res_units:
            x = unit(x, lengths)
        if not self.decoder:
            x = masked(self.conv(x), lengths)
        return x


class SemanticEncoder(nn.Module):
    """Teacher features to semantic latents, (B, H, F) -> (B, H, F).

    Args:
        channels: teacher hidden size H (768 for base models).
        num_blocks: conv blocks (2 in the releases).
        dilations, kernel_size: of the residual units in each block (their first conv).
    """

    def __init__(self, channels: int, num_blocks: int = 2, dilations: Sequence[int] = (1, 1), kernel_size: int = 3):
        super().__init__()
        self.conv = SameConv1d(channels, channels, 3, bias=False)
        blocks = [SemanticBlock(channels, dilations, kernel_size, decoder=False) for _ in range(num_blocks)]
        self.conv_blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        x = masked(self.conv(masked(x, lengths)), lengths)
        for block in self.conv_blocks:
            x = block(x, lengths)
        return x


class SemanticDecoder(nn.Module):
    """Quantized semantic latents back to teacher features (training target only); as
    :class:`SemanticEncoder`."""

    def __init__(self, channels: int, num_blocks: int = 2, dilations: Sequence[int] = (1, 1), kernel_size: int = 3):
        super().__init__()
        self.conv1 = SameConv1d(channels, channels, 3, bias=False)
        blocks = [SemanticBlock(channels, dilations, kernel_size, decoder=True) for _ in range(num_blocks)]
        self.conv_blocks = nn.ModuleList(blocks)
        self.conv2 = SameConv1d(channels, channels, 3, bias=False)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        x = masked(self.conv1(masked(x, lengths)), lengths)
        for block in self.conv_blocks:
            x = block(x, lengths)
        return masked(self.conv2(x), lengths)
