"""Semantic encoder and decoder around the teacher features: plain convs with ELU residual units, in the released
layout (``encoder_semantic.*``, ``decoder_semantic.*``)."""

from __future__ import annotations

import torch
from torch import nn

from .acoustic import masked


class SameConv1d(nn.Module):
    """Conv1d k3 with "same" padding, its parameters under ``.conv`` (the released layout). (B, C, T)."""

    def __init__(self, channels: int, bias: bool = True):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class SemanticResidualUnit(nn.Module):
    """ELU -> conv k3 -> ELU -> conv 1x1, plus skip (no biases). (B, C, T) -> (B, C, T)."""

    def __init__(self, channels: int):
        super().__init__()
        self.activation = nn.ELU()
        self.conv1 = SameConv1d(channels, bias=False)
        self.conv2 = nn.Conv1d(channels, channels, 1, bias=False)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        y = masked(self.conv1(self.activation(x)), lengths)
        y = masked(self.conv2(self.activation(y)), lengths)
        return x + y


class SemanticBlock(nn.Module):
    """Two residual units and a length-preserving conv (stride 1 and dilation 1, as in every release)."""

    def __init__(self, channels: int, decoder: bool):
        super().__init__()
        self.decoder = decoder  # the conv before the units (decoder) or after them (encoder)
        self.res_units = nn.ModuleList([SemanticResidualUnit(channels) for _ in range(2)])
        self.conv = SameConv1d(channels)

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
    """

    def __init__(self, channels: int, num_blocks: int = 2):
        super().__init__()
        self.conv = SameConv1d(channels, bias=False)
        self.conv_blocks = nn.ModuleList(SemanticBlock(channels, decoder=False) for _ in range(num_blocks))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        x = masked(self.conv(masked(x, lengths)), lengths)
        for block in self.conv_blocks:
            x = block(x, lengths)
        return x


class SemanticDecoder(nn.Module):
    """Quantized semantic latents back to teacher features (training target only); as :class:`SemanticEncoder`."""

    def __init__(self, channels: int, num_blocks: int = 2):
        super().__init__()
        self.conv1 = SameConv1d(channels, bias=False)
        self.conv_blocks = nn.ModuleList(SemanticBlock(channels, decoder=True) for _ in range(num_blocks))
        self.conv2 = SameConv1d(channels, bias=False)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        x = masked(self.conv1(masked(x, lengths)), lengths)
        for block in self.conv_blocks:
            x = block(x, lengths)
        return masked(self.conv2(x), lengths)
