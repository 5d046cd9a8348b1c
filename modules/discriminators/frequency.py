"""Multi-frequency discriminator (the discriminator of the released X-Codec recipe)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm
from transformers.audio_utils import mel_filter_bank

Logits = list[torch.Tensor]
FeatureMaps = list[list[torch.Tensor]]


def _square_mel_filterbank(n_freqs: int, sample_rate: int) -> torch.Tensor:
    """HTK, un-normalised, ``n_freqs`` x ``n_freqs`` mel matrix with weights clamped to [1e-6, 1].

    The 1e-6 floor reproduces the original: with as many mel bands as FFT bins
    many low bands fall between bins, and the floor keeps them non-zero so the
    log-magnitude stays finite and differentiable.
    """
    with warnings.catch_warnings():
        # The "all zero values" warning is expected here; the clamp handles it.
        warnings.simplefilter("ignore")
        fb = mel_filter_bank(
            num_frequency_bins=n_freqs,
            num_mel_filters=n_freqs,
            min_frequency=0.0,
            max_frequency=float(sample_rate // 2),
            sampling_rate=sample_rate,
            norm=None,
            mel_scale="htk",
        )
    return torch.from_numpy(fb).float().clamp(1e-6, 1.0)


class SpectrogramFeatures(nn.Module):
    """Magnitude STFT front-end of :class:`MultiFrequencyDiscriminator`.

    Uses a centred, reflect-padded, ``normalized=True`` (x n_fft^-0.5) STFT, as the original.

    Args:
        n_fft: FFT size (= window length).
        hop_length: STFT hop.
        domain: "linear" (magnitude), "log" (dB mapped to [0, 1]) or "double" (both, as 2 channels).
        mel_scale: warp the frequency axis with a square HTK mel matrix.
        sample_rate: sampling rate of the input, for the mel matrix.
        ref_level_db: dB reference subtracted before normalisation.
        min_level_db: dB floor mapped to 0.

    Shapes:
        (B, T) -> (B, C, n_fft // 2 + 1, T // hop_length + 1), C = 2 for "double" else 1.
    """

    def __init__(
        self,
        n_fft: int,
        hop_length: int,
        domain: str = "double",
        mel_scale: bool = True,
        sample_rate: int = 16000,
        ref_level_db: float = 20.0,
        min_level_db: float = -100.0,
    ):
        super().__init__()
        if domain not in ("linear", "log", "double"):
            raise ValueError(
                f"domain must be 'linear', 'log' or 'double', got {domain!r}"
            )
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.domain = domain
        self.ref_level_db = ref_level_db
        self.min_level_db = min_level_db
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        n_freqs = n_fft // 2 + 1
        fb = _square_mel_filterbank(n_freqs, sample_rate) if mel_scale else None
        self.register_buffer("mel_fb", fb, persistent=False)

    @property
    def channels(self) -> int:
        return 2 if self.domain == "double" else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(
            x.float(),
            self.n_fft,
            self.hop_length,
            self.n_fft,
            self.window,
            center=True,
            pad_mode="reflect",
            normalized=True,
            return_complex=True,
        )
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
    """2-D conv stack over one spectrogram resolution.

    Seven 3x3 reflect-padded weight-normalised convs; channel widths grow from
    ``hidden_channels // 32`` to ``hidden_channels``, frequency and time are halved
    three times.

    Args:
        in_channels: spectrogram channels (2 for the "double" domain).
        hidden_channels: width of the last hidden layer (must be divisible by 32).

    Shapes:
        (B, in_channels, F, N) -> logits (B, 1, F', N') and 6 feature maps (B, C_i, F_i, N_i).
    """

    def __init__(self, in_channels: int, hidden_channels: int = 512):
        super().__init__()
        widths = (
            [in_channels] + [hidden_channels // d for d in (32, 16, 8, 4, 2, 1)] + [1]
        )
        strides = [1, 2, 1, 2, 1, 2, 1]
        self.convs = nn.ModuleList(
            weight_norm(nn.Conv2d(c_in, c_out, kernel_size=3, stride=s))
            for c_in, c_out, s in zip(widths[:-1], widths[1:], strides)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        fmaps = []
        for i, conv in enumerate(self.convs):
            if i > 0:
                # The original's in-place LeakyReLU also rewrote the stored
                # feature maps, so the effective features are post-activation.
                x = F.leaky_relu(x, 0.2)
                fmaps.append(x)
            x = conv(F.pad(x, (1, 1, 1, 1), mode="reflect"))
        return x, fmaps


class MultiFrequencyDiscriminator(nn.Module):
    """Multi-resolution spectrogram discriminator ("mfd") of the X-Codec recipe.

    Resolution i uses an STFT with hop ``hop_lengths[i]`` and FFT/window size
    ``4 * hop_lengths[i]``.

    Args:
        hop_lengths: STFT hops, one sub-discriminator each.
        hidden_channels: last hidden width of each sub-discriminator.
        domain: spectrogram domain, "linear", "log" or "double".
        mel_scale: mel-warp the frequency axis.
        sample_rate: input sampling rate in Hz.

    Forward:
        x: waveform (B, 1, T) (or (B, T)); T must exceed ``2 * max(hop_lengths)``
        for the reflect-padded STFT.
        Returns ``(logits, fmaps)``: ``logits[i]`` is (B, N_i) and ``fmaps[i]`` a
        list of 6 feature maps (B, C, F, N) of sub-discriminator i.
    """

    def __init__(
        self,
        hop_lengths: Sequence[int] = (32, 64, 128, 256, 512, 1024),
        hidden_channels: Sequence[int] = (64, 128, 256, 512, 512, 512),
        domain: str = "double",
        mel_scale: bool = True,
        sample_rate: int = 16000,
    ):
        super().__init__()
        if len(hop_lengths) != len(hidden_channels):
            raise ValueError(
                "hop_lengths and hidden_channels must have the same length"
            )
        self.spectrograms = nn.ModuleList(
            SpectrogramFeatures(
                4 * h, h, domain=domain, mel_scale=mel_scale, sample_rate=sample_rate
            )
            for h in hop_lengths
        )
        self.discriminators = nn.ModuleList(
            FrequencyDiscriminator(s.channels, c)
            for s, c in zip(self.spectrograms, hidden_channels)
        )

    def forward(self, x: torch.Tensor) -> tuple[Logits, FeatureMaps]:
        x = x.reshape(-1, x.shape[-1])
        logits, fmaps = [], []
        for spectrogram, disc in zip(self.spectrograms, self.discriminators):
            out, feats = disc(spectrogram(x))
            logits.append(out.flatten(1))
            fmaps.append(feats)
        return logits, fmaps
