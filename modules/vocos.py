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


class ResNetBlock(nn.Module):
    """GroupNorm(32) -> SiLU -> conv k3, twice, plus skip (X-Codec 2's Vocos backbone). (B, C, T)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, dim, eps=1e-6)
        self.conv1 = nn.Conv1d(dim, dim, kernel_size=3, padding=1)
        self.norm2 = nn.GroupNorm(32, dim, eps=1e-6)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))


class RMSNorm(nn.Module):
    """RMS norm over the last dim, computed in float32 (Llama's)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention without biases. (B, T, dim).

    X-Codec 2 rotates queries and keys by a RoPE angle per *head* (its positions index heads, not time); one angle
    on both sides of a dot product cancels, so the scores are the same without it (up to float rounding)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, heads * head_dim, bias=False) for _ in range(3))
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.heads, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class TransformerLayer(nn.Module):
    """Pre-norm attention and SiLU MLP (no biases), each with a skip. (B, T, dim)."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_dim: int):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(dim), RMSNorm(dim)
        self.self_attn = SelfAttention(dim, heads, head_dim)
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(dim, mlp_dim, bias=False), nn.SiLU(), nn.Linear(mlp_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class TransformerVocos(nn.Module):
    """X-Codec 2's decoder: linear, conv embedding, 2 ResNet blocks, Transformer layers, 2 ResNet blocks,
    LayerNorm, ISTFT head. (B, F, in_dim) latents -> (B, F * hop) audio. Names as transformers' ``Xcodec2Model``
    (``acoustic_decoder.*``), but the head's linear: ``head.out`` (Vocos', as the original)."""

    def __init__(self, in_dim: int, dim: int, layers: int, heads: int, head_dim: int, mlp_dim: int, hop: int):
        super().__init__()
        self.fc = nn.Linear(in_dim, dim)
        self.embed = nn.Conv1d(dim, dim, kernel_size=7, padding=3)
        self.prior_net = nn.ModuleList(ResNetBlock(dim) for _ in range(2))
        self.layers = nn.ModuleList(TransformerLayer(dim, heads, head_dim, mlp_dim) for _ in range(layers))
        self.post_net = nn.ModuleList(ResNetBlock(dim) for _ in range(2))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = ISTFTHead(dim, 4 * hop, hop)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.embed(self.fc(z).transpose(1, 2))
        for block in self.prior_net:
            x = block(x)
        x = x.transpose(1, 2)
        for layer in self.layers:
            x = layer(x)
        x = x.transpose(1, 2)
        for block in self.post_net:
            x = block(x)
        return self.head(self.norm(x.transpose(1, 2)))
