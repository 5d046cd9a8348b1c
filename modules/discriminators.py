"""Waveform / spectrogram GAN discriminators: (B, 1, T) -> ``(logits, fmaps)``, one (B, N_i) score tensor and
one list of hidden post-activation feature maps per sub-discriminator (for ``losses.GANLoss`` and
``losses.FeatureMatchingLoss``)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm, weight_norm
from transformers.audio_utils import mel_filter_bank

Logits = list[torch.Tensor]
FeatureMaps = list[list[torch.Tensor]]


def _unzip(outs: list[tuple[torch.Tensor, list]]) -> tuple[Logits, FeatureMaps]:
    return [o[0] for o in outs], [o[1] for o in outs]


def _run_stack(convs: nn.ModuleList, post: nn.Module, x: torch.Tensor, slope: float) -> tuple[torch.Tensor, list]:
    fmaps = []
    for conv in convs:
        x = F.leaky_relu(conv(x), slope)
        fmaps.append(x)
    return post(x).flatten(1), fmaps


class SpectrogramFeatures(nn.Module):
    """Magnitude STFT front-end of :class:`MultiFrequencyDiscriminator`: centred,
    reflect-padded, ``normalized=True`` (x n_fft^-0.5) STFT of ``n_fft`` (= window) and
    ``hop_length``, as the original; ``mel_scale`` warps the frequency axis with a square
    HTK mel matrix for ``sample_rate``. ``domain``: "linear" (magnitude), "log" (dB less
    ``ref_level_db``, ``min_level_db`` mapped to 0, clamped to [0, 1]) or "double" (both).

    Shapes: (B, T) -> (B, C, n_fft // 2 + 1, T // hop_length + 1), C = 2 for "double" else 1.
    """

    def __init__(self, n_fft: int, hop_length: int, domain: str = "double", mel_scale: bool = True,
                 sample_rate: int = 16000, ref_level_db: float = 20.0, min_level_db: float = -100.0):  # fmt: skip
        super().__init__()
        if domain not in ("linear", "log", "double"):
            raise ValueError(f"domain must be 'linear', 'log' or 'double', got {domain!r}")
        self.n_fft, self.hop_length, self.domain = n_fft, hop_length, domain
        self.ref_level_db, self.min_level_db = ref_level_db, min_level_db
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        fb = None
        if mel_scale:
            # Square HTK mel matrix clamped to [1e-6, 1]: with as many bands as FFT bins many low bands fall
            # between bins; the original's floor keeps them non-zero (finite logs; no "all zero" warning).
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                n = n_fft // 2 + 1
                fb = mel_filter_bank(num_frequency_bins=n, num_mel_filters=n, min_frequency=0.0,
                                     max_frequency=float(sample_rate // 2), sampling_rate=sample_rate,
                                     norm=None, mel_scale="htk")  # fmt: skip
            fb = torch.from_numpy(fb).float().clamp(1e-6, 1.0)
        self.register_buffer("mel_fb", fb, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(x.float(), self.n_fft, self.hop_length, self.n_fft, self.window, center=True,
                          pad_mode="reflect", normalized=True, return_complex=True)  # fmt: skip
        mag = torch.view_as_real(spec).pow(2).sum(-1).clamp(min=1e-7).sqrt()
        if self.mel_fb is not None:
            mag = torch.einsum("fm,bft->bmt", self.mel_fb, mag)
        if self.domain == "linear":
            return mag.unsqueeze(1)
        log_mag = 20 * torch.log10(mag) - self.ref_level_db
        log_mag = ((log_mag - self.min_level_db) / -self.min_level_db).clamp(0.0, 1.0)
        if self.domain == "log":
            return log_mag.unsqueeze(1)
        return torch.stack([mag, log_mag], dim=1)


class FrequencyDiscriminator(nn.Module):
    """Seven 3x3 reflect-padded weight-normed 2-D convs over one spectrogram resolution;
    widths grow from ``hidden_channels // 32`` to ``hidden_channels``, frequency and time
    are halved three times.

    Shapes: (B, in_channels, F, N) -> logits (B, N') and 6 feature maps (B, C_i, F_i, N_i).
    """

    def __init__(self, in_channels: int, hidden_channels: int = 512):
        super().__init__()
        widths = [in_channels] + [hidden_channels // d for d in (32, 16, 8, 4, 2, 1)] + [1]
        strides = [1, 2, 1, 2, 1, 2, 1]
        self.convs = nn.ModuleList(
            weight_norm(nn.Conv2d(c_in, c_out, kernel_size=3, stride=s))
            for c_in, c_out, s in zip(widths[:-1], widths[1:], strides)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        fmaps = []
        for i, conv in enumerate(self.convs):
            if i > 0:
                # The original's in-place LeakyReLU rewrote its stored feature maps: they are post-activation.
                x = F.leaky_relu(x, 0.2)
                fmaps.append(x)
            x = conv(F.pad(x, (1, 1, 1, 1), mode="reflect"))
        return x.flatten(1), fmaps


class MultiFrequencyDiscriminator(nn.Module):
    """Multi-resolution spectrogram discriminator ("mfd", the released recipe's): resolution i is an STFT with hop
    ``hop_lengths[i]`` and FFT/window ``4 * hop_lengths[i]``, its last hidden width ``hidden_channels[i]``; other
    arguments as :class:`SpectrogramFeatures`. Input (B, 1, T) or (B, T), T > ``2 * max(hop_lengths)``."""

    def __init__(self, hop_lengths: Sequence[int] = (32, 64, 128, 256, 512, 1024),
                 hidden_channels: Sequence[int] = (64, 128, 256, 512, 512, 512), domain: str = "double",
                 mel_scale: bool = True, sample_rate: int = 16000):  # fmt: skip
        super().__init__()
        if len(hop_lengths) != len(hidden_channels):
            raise ValueError("hop_lengths and hidden_channels must have the same length")
        self.spectrograms = nn.ModuleList(
            SpectrogramFeatures(4 * h, h, domain, mel_scale, sample_rate) for h in hop_lengths
        )
        channels = 2 if domain == "double" else 1
        self.discriminators = nn.ModuleList(FrequencyDiscriminator(channels, c) for c in hidden_channels)

    def forward(self, x: torch.Tensor) -> tuple[Logits, FeatureMaps]:
        x = x.reshape(-1, x.shape[-1])
        return _unzip([disc(spectrogram(x)) for spectrogram, disc in zip(self.spectrograms, self.discriminators)])


class PeriodDiscriminator(nn.Module):
    """Discriminator on the waveform folded into a (T / period, period) image, with kernels
    of ``kernel_size`` and ``stride`` along the folded time axis (first four convs).

    Shapes: (B, 1, T) -> logits (B, N) and 5 feature maps (B, C, T_i, p).
    """

    def __init__(self, period: int, kernel_size: int = 5, stride: int = 3):
        super().__init__()
        self.period = period
        widths = [1, 32, 128, 512, 1024, 1024]
        pad = (kernel_size - 1) // 2
        self.convs = nn.ModuleList(
            weight_norm(nn.Conv2d(c_in, c_out, (kernel_size, 1), (s, 1), padding=(pad, 0)))
            for c_in, c_out, s in zip(widths[:-1], widths[1:], [stride] * 4 + [1])
        )
        self.conv_post = weight_norm(nn.Conv2d(widths[-1], 1, (3, 1), padding=(1, 0)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        remainder = x.shape[-1] % self.period
        if remainder:
            x = F.pad(x, (0, self.period - remainder), mode="reflect")
        return _run_stack(self.convs, self.conv_post, x.reshape(x.shape[0], x.shape[1], -1, self.period), 0.1)


class MultiPeriodDiscriminator(nn.Module):
    """HiFi-GAN multi-period discriminator ("mpd"): one :class:`PeriodDiscriminator` per
    period of ``period_sizes``, with kernels of ``period_kernel_size``."""

    def __init__(self, period_sizes: Sequence[int] = (2, 3, 5, 7, 11), period_kernel_size: int = 5):
        super().__init__()
        self.discriminators = nn.ModuleList(PeriodDiscriminator(p, period_kernel_size) for p in period_sizes)

    def forward(self, x: torch.Tensor) -> tuple[Logits, FeatureMaps]:
        x = x.reshape(x.shape[0], 1, x.shape[-1])
        return _unzip([d(x) for d in self.discriminators])


# (in, out, kernel, stride, groups) of HiFi-GAN's DiscriminatorS
_SCALE_LAYERS = ((1, 128, 15, 1, 1), (128, 128, 41, 2, 4), (128, 256, 41, 2, 16), (256, 512, 41, 4, 16),
                 (512, 1024, 41, 4, 16), (1024, 1024, 41, 1, 16), (1024, 1024, 5, 1, 1))  # fmt: skip


class ScaleDiscriminator(nn.Module):
    """Grouped 1-D conv stack: (B, 1, T) -> logits (B, N) and 7 feature maps (B, C, T_i).
    ``use_spectral_norm``: spectral instead of weight normalisation."""

    def __init__(self, use_spectral_norm: bool = False):
        super().__init__()
        norm = spectral_norm if use_spectral_norm else weight_norm
        self.convs = nn.ModuleList(
            norm(nn.Conv1d(c_in, c_out, k, s, groups=g, padding=(k - 1) // 2)) for c_in, c_out, k, s, g in _SCALE_LAYERS
        )
        self.conv_post = norm(nn.Conv1d(1024, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return _run_stack(self.convs, self.conv_post, x, 0.1)


class MultiScaleDiscriminator(nn.Module):
    """HiFi-GAN multi-scale discriminator ("msd"): scale 0 sees the raw waveform (spectral
    norm), each further scale the previous one average-pooled (``pool_kernel_size``,
    ``pool_stride``)."""

    def __init__(self, num_scales: int = 3, pool_kernel_size: int = 4, pool_stride: int = 2):
        super().__init__()
        self.discriminators = nn.ModuleList(ScaleDiscriminator(use_spectral_norm=i == 0) for i in range(num_scales))
        self.pool = nn.AvgPool1d(pool_kernel_size, pool_stride, padding=pool_kernel_size // 2)

    def forward(self, x: torch.Tensor) -> tuple[Logits, FeatureMaps]:
        x, outs = x.reshape(x.shape[0], 1, x.shape[-1]), []
        for i, disc in enumerate(self.discriminators):
            x = self.pool(x) if i else x
            outs.append(disc(x))
        return _unzip(outs)


def _same_padding(kernel_size: tuple[int, int], dilation: tuple[int, int] = (1, 1)) -> tuple[int, int]:
    return (kernel_size[0] - 1) * dilation[0] // 2, (kernel_size[1] - 1) * dilation[1] // 2


class STFTDiscriminator(nn.Module):
    """2-D conv discriminator on the real/imaginary parts of one un-centred STFT, divided
    by the window's L2 norm when ``normalized`` (torchaudio's convention, as EnCodec).

    Args:
        filters: base channel count, growing by ``filters_scale`` per layer up to ``max_filters``.
        kernel_size: (time, freq); ``dilations``: in time, of the convs strided by ``stride``.

    Shapes: (B, in_channels, T) -> logits (B, N) and 5 feature maps (B, C, frames, F_i).
    """

    def __init__(self, filters: int, in_channels: int = 1, out_channels: int = 1, n_fft: int = 1024,
                 hop_length: int = 256, win_length: int = 1024, max_filters: int = 1024, filters_scale: int = 1,
                 kernel_size: tuple[int, int] = (3, 9), dilations: Sequence[int] = (1, 2, 4),
                 stride: tuple[int, int] = (1, 2), normalized: bool = True):  # fmt: skip
        super().__init__()
        self.n_fft, self.hop_length, self.win_length, self.normalized = n_fft, hop_length, win_length, normalized
        self.register_buffer("window", torch.hann_window(win_length), persistent=False)
        kernel_size = tuple(kernel_size)
        square = (kernel_size[0], kernel_size[0])
        # EnCodec leaves the very first conv un-normalised.
        convs = [nn.Conv2d(2 * in_channels, filters, kernel_size, padding=_same_padding(kernel_size))]
        in_chs = min(filters_scale * filters, max_filters)
        for i, dilation in enumerate(dilations):
            out_chs = min(filters_scale ** (i + 1) * filters, max_filters)
            padding = _same_padding(kernel_size, (dilation, 1))
            convs.append(weight_norm(nn.Conv2d(in_chs, out_chs, kernel_size, tuple(stride), padding, (dilation, 1))))
            in_chs = out_chs
        out_chs = min(filters_scale ** (len(dilations) + 1) * filters, max_filters)
        convs.append(weight_norm(nn.Conv2d(in_chs, out_chs, square, padding=_same_padding(square))))
        self.convs = nn.ModuleList(convs)
        self.conv_post = weight_norm(nn.Conv2d(out_chs, out_channels, square, padding=_same_padding(square)))

    def spectrogram(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T) -> (B, 2C, frames, n_fft // 2 + 1), real parts then imaginary parts."""
        b, c, t = x.shape
        spec = torch.stft(x.reshape(b * c, t).float(), self.n_fft, self.hop_length, self.win_length, self.window,
                          center=False, return_complex=True)  # fmt: skip
        if self.normalized:
            spec = spec / self.window.pow(2).sum().sqrt()
        spec = spec.reshape(b, c, *spec.shape[-2:])
        return torch.cat([spec.real, spec.imag], dim=1).transpose(2, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return _run_stack(self.convs, self.conv_post, self.spectrogram(x), 0.2)


class MultiScaleSTFTDiscriminator(nn.Module):
    """EnCodec multi-scale STFT discriminator ("msstftd"): one :class:`STFTDiscriminator`
    per (``n_ffts``, ``hop_lengths``, ``win_lengths``) triple, ``kwargs`` passed on.
    Input (B, 1, T) (or (B, T)), T >= max(win_lengths)."""

    def __init__(self, filters: int = 32, in_channels: int = 1, out_channels: int = 1,
                 n_ffts: Sequence[int] = (1024, 2048, 512), hop_lengths: Sequence[int] = (256, 512, 128),
                 win_lengths: Sequence[int] = (1024, 2048, 512), **kwargs):  # fmt: skip
        super().__init__()
        if not len(n_ffts) == len(hop_lengths) == len(win_lengths):
            raise ValueError("n_ffts, hop_lengths and win_lengths must have the same length")
        self.discriminators = nn.ModuleList(
            STFTDiscriminator(filters, in_channels, out_channels, n_fft=n, hop_length=h, win_length=w, **kwargs)
            for n, h, w in zip(n_ffts, hop_lengths, win_lengths)
        )

    def forward(self, x: torch.Tensor) -> tuple[Logits, FeatureMaps]:
        x = x.unsqueeze(1) if x.dim() == 2 else x
        return _unzip([d(x) for d in self.discriminators])


DISCRIMINATORS = {"mfd": MultiFrequencyDiscriminator, "mpd": MultiPeriodDiscriminator, "msd": MultiScaleDiscriminator,
                  "msstftd": MultiScaleSTFTDiscriminator}  # fmt: skip


def build_discriminators(d_list: Sequence[str], configs: Mapping[str, Mapping[str, Any]] | None = None):
    """``nn.ModuleDict`` of the discriminators named in ``d_list`` (e.g. ``["mfd"]``, the released recipe), in order.

    Args:
        configs: ``configs[name]``: constructor kwargs (the YAML ``config:`` sub-dict); missing: the recipe defaults.
    Raises ValueError on an unknown name.
    """
    configs = configs or {}
    unknown = [name for name in d_list if name not in DISCRIMINATORS]
    if unknown:
        raise ValueError(f"unknown discriminator(s) {unknown}; valid names are {sorted(DISCRIMINATORS)}")
    return nn.ModuleDict({name: DISCRIMINATORS[name](**dict(configs.get(name) or {})) for name in d_list})


class DiscriminatorBank(nn.Module):
    """The discriminators of ``d_list`` (name -> discriminator) behind one forward (one DDP
    wrapper, one call per step): (B, 1, T) -> ``{name: (logits, fmaps)}``."""

    def __init__(self, discriminators: nn.ModuleDict):
        super().__init__()
        self.discs = discriminators

    def forward(self, x: torch.Tensor) -> dict[str, tuple[Logits, FeatureMaps]]:
        return {name: disc(x) for name, disc in self.discs.items()}
