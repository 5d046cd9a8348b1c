"""DAC-style acoustic encoder and decoder in the released layout (``encoder.block.*``, ``decoder_2.model.*``), with
X-Codec's quirks: ``output_padding = stride % 2``, no final tanh. Optional per-item ``lengths``: positions past
an item's length are zeroed after each conv, so each item of a padded batch gets exactly what it gets alone."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from .snake import snake, snake_reference


def masked(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """(B, C, T) ``x`` with positions past each item's valid length zeroed (``None``: all valid)."""
    if lengths is None:
        return x
    return x * (torch.arange(x.shape[-1], device=lengths.device)[None, None, :] < lengths[:, None, None]).to(x.dtype)


def _conv(*args, wn: bool = True, transpose: bool = False, **kwargs) -> nn.Module:
    conv = (nn.ConvTranspose1d if transpose else nn.Conv1d)(*args, **kwargs)
    return weight_norm(conv) if wn else conv


class Snake1d(nn.Module):
    """Snake activation ``x + sin^2(alpha x) / alpha`` with a learned alpha per channel (B, C, T)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Without autograd the same ops run in place on cache-sized slices (bitwise equal).
        if not torch.is_grad_enabled() or not (x.requires_grad or self.alpha.requires_grad):
            return snake(x, self.alpha)
        return snake_reference(x, self.alpha)


def conv_out_length(lengths: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """Output lengths of a Conv1d / ConvTranspose1d for input lengths (ints or integer tensors)."""
    k, s, p, d = conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0]
    if isinstance(conv, nn.ConvTranspose1d):
        return (lengths - 1) * s - 2 * p + d * (k - 1) + conv.output_padding[0] + 1
    return (lengths + 2 * p - d * (k - 1) - 1) // s + 1


class ResidualUnit(nn.Module):
    """Snake -> dilated conv k7 -> Snake -> conv k1, plus skip. Input/output (B, C, T)."""

    def __init__(self, dim: int, dilation: int, wn: bool = True):
        super().__init__()
        self.block = nn.Sequential(
            Snake1d(dim),
            _conv(dim, dim, kernel_size=7, dilation=dilation, padding=3 * dilation, wn=wn),
            Snake1d(dim),
            _conv(dim, dim, kernel_size=1, wn=wn),
        )

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        y = masked(self.block[1](self.block[0](x)), lengths)
        y = masked(self.block[3](self.block[2](y)), lengths)
        return x + y


def _run(layers: nn.Sequential, x: torch.Tensor, lengths: torch.Tensor | None):
    """Run a Sequential of convs, Snakes, residual units and blocks, tracking lengths."""
    if lengths is None:
        return layers(x), None
    x = masked(x, lengths)
    for layer in layers:
        if isinstance(layer, ResidualUnit):
            x = layer(x, lengths)
        elif isinstance(layer, Block):
            x, lengths = _run(layer.block, x, lengths)
        elif isinstance(layer, (nn.Conv1d, nn.ConvTranspose1d)):
            x = layer(x)
            lengths = conv_out_length(lengths, layer)
            x = masked(x, lengths)
        else:
            x = layer(x)
    return x, lengths


class Block(nn.Module):
    """An encoder stage (3 residual units, Snake, strided conv) or decoder stage (Snake, convT, 3 units)."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class AcousticEncoder(nn.Module):
    """Waveform to latent frames, (B, 1, T) -> (B, D, T // hop).

    Args:
        width: channels after the first conv (64 in the releases); doubled per stage.
        ratios: downsampling strides, e.g. [8, 5, 4, 2] (hop 320).
        latent_dim: output channels D.
        wn: weight-norm parametrization (training); ``False`` builds plain convs (inference).
    """

    def __init__(self, width: int, ratios: Sequence[int], latent_dim: int, wn: bool = True):
        super().__init__()
        layers: list[nn.Module] = [_conv(1, width, kernel_size=7, padding=3, wn=wn)]
        for stride in ratios:
            units = [ResidualUnit(width, dilation, wn) for dilation in (1, 3, 9)]
            down = _conv(width, 2 * width, kernel_size=2 * stride, stride=stride, padding=math.ceil(stride / 2), wn=wn)
            layers.append(Block(*units, Snake1d(width), down))
            width *= 2
        layers += [Snake1d(width), _conv(width, latent_dim, kernel_size=3, padding=1, wn=wn)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return _run(self.block, x, lengths)[0]

    def output_length(self, lengths: torch.Tensor) -> torch.Tensor:
        """Frames produced for inputs of ``lengths`` samples."""
        for conv in self.block.modules():
            if isinstance(conv, nn.Conv1d):
                lengths = conv_out_length(lengths, conv)
        return lengths


class AcousticDecoder(nn.Module):
    """Latent frames to waveform, (B, D, F) -> (B, 1, F * hop).

    Args:
        latent_dim: input channels D.
        channels: channels after the first conv (1024 in the releases); halved per stage.
        ratios: upsampling strides, in the same order as the encoder's (an X-Codec quirk).
        wn: weight-norm parametrization (training) or plain convs (inference).
    """

    def __init__(self, latent_dim: int, channels: int, ratios: Sequence[int], wn: bool = True):
        super().__init__()
        layers: list[nn.Module] = [_conv(latent_dim, channels, kernel_size=7, padding=3, wn=wn)]
        out_dim = channels
        for i, stride in enumerate(ratios):
            in_dim, out_dim = channels // 2**i, channels // 2 ** (i + 1)
            up = _conv(in_dim, out_dim, kernel_size=2 * stride, stride=stride, padding=math.ceil(stride / 2),
                       output_padding=stride % 2, transpose=True, wn=wn)  # fmt: skip
            layers.append(Block(Snake1d(in_dim), up, *(ResidualUnit(out_dim, dilation, wn) for dilation in (1, 3, 9))))
        layers += [Snake1d(out_dim), _conv(out_dim, 1, kernel_size=7, padding=3, wn=wn)]
        self.model = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return _run(self.model, z, lengths)[0]
