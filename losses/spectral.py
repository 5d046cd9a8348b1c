"""Spectral reconstruction losses: multi-resolution STFT, sub-band STFT and log-mel L1."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.audio_utils import mel_filter_bank

from modules.pqmf import PQMF


def _as_batch(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, T) / (B, C, T) / (B, T) / (T,) -> (N, T) float32 rows."""
    return x.reshape(-1, x.shape[-1]).float()


def stft_magnitude(
    x: torch.Tensor, fft_size: int, hop_size: int, win_size: int, window: torch.Tensor
) -> torch.Tensor:
    """Centred (reflect-padded) STFT magnitude, floored at sqrt(1e-7) so its log is finite.

    Args:
        x: waveforms (N, T).
        fft_size, hop_size, win_size: STFT parameters.
        window: (win_size,) analysis window.

    Returns:
        Magnitudes (N, fft_size // 2 + 1, frames).
    """
    spec = torch.stft(
        x,
        fft_size,
        hop_size,
        win_size,
        window,
        center=True,
        pad_mode="reflect",
        return_complex=True,
    )
    return torch.view_as_real(spec).pow(2).sum(-1).clamp(min=1e-7).sqrt()


class MultiResolutionSTFTLoss(nn.Module):
    """Spectral convergence + log-magnitude L1, averaged over STFT resolutions (Parallel WaveGAN).

    Per resolution: ``sc = ||S_t - S_e||_F / ||S_t||_F`` over the whole batch and
    ``mag = mean |log S_e - log S_t|``. ``forward`` returns ``mean(sc) + mean(mag)``,
    the quantity the original adds to the generator loss; :meth:`components`
    returns the two terms separately for logging.

    Args:
        fft_sizes: FFT size per resolution.
        hop_sizes: hop per resolution.
        win_sizes: Hann window length per resolution.

    Forward:
        estimate: generated waveform (B, 1, T) (any shape whose last dim is time).
        target: reference waveform, same shape.
        Returns a scalar tensor.
    """

    def __init__(
        self,
        fft_sizes: Sequence[int] = (512, 1024, 2048),
        hop_sizes: Sequence[int] = (120, 240, 300),
        win_sizes: Sequence[int] = (480, 960, 1200),
    ):
        super().__init__()
        if not len(fft_sizes) == len(hop_sizes) == len(win_sizes):
            raise ValueError(
                "fft_sizes, hop_sizes and win_sizes must have the same length"
            )
        self.resolutions = list(zip(fft_sizes, hop_sizes, win_sizes))
        for i, (_, _, win) in enumerate(self.resolutions):
            self.register_buffer(
                f"window_{i}", torch.hann_window(win), persistent=False
            )

    def components(
        self, estimate: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (spectral convergence, log-magnitude L1), each averaged over resolutions."""
        estimate, target = _as_batch(estimate), _as_batch(target)
        sc_total, mag_total = 0.0, 0.0
        for i, (fft, hop, win) in enumerate(self.resolutions):
            window = getattr(self, f"window_{i}")
            est_mag = stft_magnitude(estimate, fft, hop, win, window)
            tgt_mag = stft_magnitude(target, fft, hop, win, window)
            sc_total = sc_total + torch.linalg.norm(
                tgt_mag - est_mag
            ) / torch.linalg.norm(tgt_mag)
            mag_total = mag_total + F.l1_loss(est_mag.log(), tgt_mag.log())
        n = len(self.resolutions)
        return sc_total / n, mag_total / n

    def forward(self, estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        sc, mag = self.components(estimate, target)
        return sc + mag


class SubbandMultiResolutionSTFTLoss(nn.Module):
    """Multi-resolution STFT loss on PQMF sub-bands (the original's "sub stft" loss).

    Both signals are split into ``num_bands`` critically sampled bands and every
    band is treated as a separate signal of length T // num_bands.

    Args:
        num_bands: PQMF band count.
        fft_sizes: FFT size per resolution (in sub-band samples).
        hop_sizes: hop per resolution.
        win_sizes: window length per resolution.

    Forward:
        estimate: generated waveform (B, 1, T).
        target: reference waveform (B, 1, T).
        Returns the scalar ``mean(sc) + mean(mag)`` over resolutions.
    """

    def __init__(
        self,
        num_bands: int = 6,
        fft_sizes: Sequence[int] = (128, 256, 256),
        hop_sizes: Sequence[int] = (20, 40, 50),
        win_sizes: Sequence[int] = (80, 120, 200),
    ):
        super().__init__()
        self.pqmf = PQMF(num_bands)
        self.stft_loss = MultiResolutionSTFTLoss(fft_sizes, hop_sizes, win_sizes)

    def _bands(self, x: torch.Tensor) -> torch.Tensor:
        return self.pqmf.analysis(x.reshape(-1, 1, x.shape[-1]).float())

    def components(
        self, estimate: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the sub-band (spectral convergence, log-magnitude L1)."""
        return self.stft_loss.components(self._bands(estimate), self._bands(target))

    def forward(self, estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        sc, mag = self.components(estimate, target)
        return sc + mag


@lru_cache(maxsize=16)
def _slaney_mel_basis(
    sampling_rate: int, n_fft: int, num_mels: int, fmin: float, fmax: float | None
) -> np.ndarray:
    """(num_mels, n_fft // 2 + 1) Slaney-scale, Slaney-normalised filters (librosa's defaults)."""
    fb = mel_filter_bank(
        num_frequency_bins=n_fft // 2 + 1,
        num_mel_filters=num_mels,
        min_frequency=float(fmin),
        max_frequency=float(sampling_rate / 2 if fmax is None else fmax),
        sampling_rate=sampling_rate,
        norm="slaney",
        mel_scale="slaney",
    )
    return np.ascontiguousarray(fb.T, dtype=np.float32)


def _log_mel(
    wav: torch.Tensor,
    basis: torch.Tensor,
    n_fft: int,
    hop_size: int,
    win_size: int,
    window: torch.Tensor,
    center: bool,
) -> torch.Tensor:
    x = _as_batch(wav)
    if not center:
        # HiFi-GAN pads (n_fft - hop) / 2 per side so that frames = T // hop.
        pad = (n_fft - hop_size) // 2
        x = F.pad(x.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    spec = torch.stft(
        x,
        n_fft,
        hop_size,
        win_size,
        window,
        center=center,
        pad_mode="reflect",
        return_complex=True,
    )
    mag = (torch.view_as_real(spec).pow(2).sum(-1) + 1e-9).sqrt()
    mel = torch.matmul(basis, mag)
    return mel.clamp(min=1e-5).log()


def mel_spectrogram(
    wav: torch.Tensor,
    sampling_rate: int = 16000,
    n_fft: int = 1024,
    num_mels: int = 80,
    hop_size: int = 160,
    win_size: int = 800,
    fmin: float = 0.0,
    fmax: float | None = None,
    center: bool = False,
) -> torch.Tensor:
    """HiFi-GAN log-mel spectrogram: ``log(clamp(mel @ |STFT|, 1e-5))``.

    Args:
        wav: waveform (B, 1, T), (B, T) or (T,), nominally in [-1, 1].
        sampling_rate: sampling rate in Hz.
        n_fft: FFT size.
        num_mels: mel bands (Slaney scale and normalisation, like librosa).
        hop_size: hop in samples.
        win_size: Hann window length.
        fmin: lowest mel frequency in Hz.
        fmax: highest mel frequency in Hz (``None`` = Nyquist).
        center: centre frames with torch.stft instead of HiFi-GAN's (n_fft - hop) / 2 reflect pad.

    Returns:
        Natural-log mel spectrogram (N, num_mels, frames), N = number of waveforms
        (frames = T // hop_size when ``center`` is False).
    """
    basis = torch.from_numpy(
        _slaney_mel_basis(sampling_rate, n_fft, num_mels, fmin, fmax)
    ).to(wav.device)
    window = torch.hann_window(win_size, device=wav.device)
    return _log_mel(wav, basis, n_fft, hop_size, win_size, window, center)


class MelSpectrogramLoss(nn.Module):
    """L1 distance between HiFi-GAN log-mel spectrograms (see :func:`mel_spectrogram`).

    Args:
        sampling_rate, n_fft, num_mels, hop_size, win_size, fmin, fmax, center:
            as in :func:`mel_spectrogram`.

    Forward:
        estimate: generated waveform (B, 1, T).
        target: reference waveform (B, 1, T); not differentiated through.
        Returns a scalar tensor.
    """

    def __init__(
        self,
        sampling_rate: int = 16000,
        n_fft: int = 1024,
        num_mels: int = 80,
        hop_size: int = 160,
        win_size: int = 800,
        fmin: float = 0.0,
        fmax: float | None = None,
        center: bool = False,
    ):
        super().__init__()
        self.n_fft, self.hop_size, self.win_size, self.center = (
            n_fft,
            hop_size,
            win_size,
            center,
        )
        # Clone: the cached array must not alias a buffer that .to()/in-place ops could touch.
        basis = torch.from_numpy(
            _slaney_mel_basis(sampling_rate, n_fft, num_mels, fmin, fmax)
        ).clone()
        self.register_buffer("mel_basis", basis, persistent=False)
        self.register_buffer("window", torch.hann_window(win_size), persistent=False)

    def log_mel(self, wav: torch.Tensor) -> torch.Tensor:
        """(B, 1, T) -> (B, num_mels, T // hop_size) log-mel spectrogram."""
        return _log_mel(
            wav,
            self.mel_basis,
            self.n_fft,
            self.hop_size,
            self.win_size,
            self.window,
            self.center,
        )

    def forward(self, estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(self.log_mel(estimate), self.log_mel(target).detach())
