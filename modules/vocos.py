"""Vocos (Siuzdak 2023) backbone and ISTFT head as YuE's 44.1 kHz vocoders use them (the ``vocos`` package needs
torchaudio); parameter names are Vocos' (no AdaLayerNorm): its state dicts load as they are."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvNeXtBlock(nn.Module):
    """Depthwise conv k7 -> LayerNorm -> MLP (GELU) -> layer scale (none when <= 0), residual. (B, C, T)."""

    def __init__(self, dim: int, intermediate_dim: int, layer_scale_init_value: float):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.gamma = None
        if layer_scale_init_value > 0:
            self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).transpose(1, 2)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        if self.gamma is not None:
            y = self.gamma * y
        return x + y.transpose(1, 2)


class VocosBackbone(nn.Module):
    """Conv embedding, LayerNorm, ``num_layers`` ConvNeXt blocks, final LayerNorm.

    Args:
        input_channels: input feature channels (YuE: 1024, the quantizer's latents); ``dim``: hidden channels.
        intermediate_dim, num_layers: ConvNeXt MLP width and block count.
        layer_scale_init_value: initial layer scale (``None`` or 0: ``1 / num_layers``, as Vocos).
    """

    def __init__(self, input_channels: int, dim: int, intermediate_dim: int, num_layers: int,
                 layer_scale_init_value: float | None = None):  # fmt: skip
        super().__init__()
        self.embed = nn.Conv1d(input_channels, dim, kernel_size=7, padding=3)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        scale = layer_scale_init_value or 1 / num_layers  # Vocos' rule: 0 also means the default
        self.convnext = nn.ModuleList(ConvNeXtBlock(dim, intermediate_dim, scale) for _ in range(num_layers))
        self.final_layer_norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, input_channels, T) -> (B, T, dim) (time-major, as the head takes it)."""
        x = self.norm(self.embed(x).transpose(1, 2)).transpose(1, 2)
        for block in self.convnext:
            x = block(x)
        return self.final_layer_norm(x.transpose(1, 2))


class ISTFT(nn.Module):
    """Inverse STFT with "same" padding (``torch.istft`` only trims centred frames): ``T`` frames give exactly
    ``T * hop_length`` samples (Hann-windowed overlap-add over the summed squared window, ends trimmed)."""

    def __init__(self, n_fft: int, hop_length: int):
        super().__init__()
        if (n_fft - hop_length) % 2:
            raise ValueError(f"same padding needs n_fft - hop_length even, got {n_fft} and {hop_length}")
        self.n_fft, self.hop_length = n_fft, hop_length
        self.register_buffer("window", torch.hann_window(n_fft))

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        """(B, n_fft // 2 + 1, T) complex spectrum -> (B, T * hop_length) audio."""
        frames = spec.shape[-1]
        pad = (self.n_fft - self.hop_length) // 2
        length = (frames - 1) * self.hop_length + self.n_fft
        ifft = torch.fft.irfft(spec, self.n_fft, dim=1, norm="backward") * self.window[None, :, None]
        fold = {"output_size": (1, length), "kernel_size": (1, self.n_fft), "stride": (1, self.hop_length)}
        y = F.fold(ifft, **fold)[:, 0, 0, pad:-pad]
        envelope = F.fold(self.window.square().expand(1, frames, -1).transpose(1, 2), **fold).squeeze()[pad:-pad]
        return y / envelope.clamp_min(1e-11)


class ISTFTHead(nn.Module):
    """Linear projection of ``dim`` channels to ``n_fft + 2`` log-magnitude and phase bins,
    then :class:`ISTFT`; ``padding``: only ``"same"`` (what YuE's vocoders use)."""

    def __init__(self, dim: int, n_fft: int, hop_length: int, padding: str = "same"):
        super().__init__()
        if padding != "same":
            raise ValueError(f"ISTFTHead padding {padding!r}: only 'same' is implemented")
        self.out = nn.Linear(dim, n_fft + 2)
        self.istft = ISTFT(n_fft, hop_length)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, dim) -> (B, T * hop_length) audio."""
        mag, phase = self.out(x).transpose(1, 2).chunk(2, dim=1)
        mag = torch.exp(mag).clamp(max=1e2)  # Vocos' safeguard against huge magnitudes
        return self.istft(torch.polar(mag, phase))
