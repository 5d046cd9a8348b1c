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


def stft_magnitude(x: torch.Tensor, fft_size: int, hop_size: int, win_size: int, window: torch.Tensor) -> torch.Tensor:
    """(N, T) -> (N, fft_size // 2 + 1, frames) centred STFT magnitude, floored at sqrt(1e-7): a finite log."""
    spec = torch.stft(x, fft_size, hop_size, win_size, window, center=True, pad_mode="reflect", return_complex=True)
    return torch.view_as_real(spec).pow(2).sum(-1).clamp(min=1e-7).sqrt()


class MultiResolutionSTFTLoss(nn.Module):
    """Spectral convergence ``||S_t - S_e||_F / ||S_t||_F`` (over the batch) + log-magnitude L1, each averaged
    over STFT resolutions (Parallel WaveGAN; Hann windows). ``forward(estimate, target)``: (B, 1, T) or any shape
    whose last dim is time -> a scalar; :meth:`components`: both terms."""

    def __init__(self, fft_sizes: Sequence[int] = (512, 1024, 2048), hop_sizes: Sequence[int] = (120, 240, 300),
                 win_sizes: Sequence[int] = (480, 960, 1200)):  # fmt: skip
        super().__init__()
        self.resolutions = list(zip(fft_sizes, hop_sizes, win_sizes))
        for i, (_, _, win) in enumerate(self.resolutions):
            self.register_buffer(f"window_{i}", torch.hann_window(win), persistent=False)

    def components(self, estimate: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(spectral convergence, log-magnitude L1), each averaged over resolutions."""
        estimate, target = (x.reshape(-1, x.shape[-1]).float() for x in (estimate, target))
        sc_total, mag_total = 0.0, 0.0
        for i, (fft, hop, win) in enumerate(self.resolutions):
            window = getattr(self, f"window_{i}")
            est_mag = stft_magnitude(estimate, fft, hop, win, window)
            tgt_mag = stft_magnitude(target, fft, hop, win, window)
            sc_total = sc_total + torch.linalg.norm(tgt_mag - est_mag) / torch.linalg.norm(tgt_mag)
            mag_total = mag_total + F.l1_loss(est_mag.log(), tgt_mag.log())
        n = len(self.resolutions)
        return sc_total / n, mag_total / n

    def forward(self, estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        sc, mag = self.components(estimate, target)
        return sc + mag


class SubbandMultiResolutionSTFTLoss(MultiResolutionSTFTLoss):
    """The multi-resolution STFT loss on ``num_bands`` PQMF sub-bands of (B, 1, T) inputs (sizes in band samples)."""

    def __init__(self, num_bands: int = 6, fft_sizes: Sequence[int] = (128, 256, 256),
                 hop_sizes: Sequence[int] = (20, 40, 50), win_sizes: Sequence[int] = (80, 120, 200)):  # fmt: skip
        super().__init__(fft_sizes, hop_sizes, win_sizes)
        self.pqmf = PQMF(num_bands)

    def components(self, estimate: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sub-band (spectral convergence, log-magnitude L1)."""
        bands = [self.pqmf.analysis(x.reshape(-1, 1, x.shape[-1]).float()) for x in (estimate, target)]
        return super().components(*bands)


@lru_cache(maxsize=16)
def _slaney_mel_basis(sampling_rate: int, n_fft: int, num_mels: int, fmin: float, fmax: float | None) -> np.ndarray:
    """(num_mels, n_fft // 2 + 1) Slaney-scale, Slaney-normalised filters (librosa's defaults)."""
    fb = mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=num_mels, min_frequency=float(fmin),
                         max_frequency=float(sampling_rate / 2 if fmax is None else fmax), sampling_rate=sampling_rate,
                         norm="slaney", mel_scale="slaney")  # fmt: skip
    return np.ascontiguousarray(fb.T, dtype=np.float32)


class MelSpectrogramLoss(nn.Module):
    """L1 distance between HiFi-GAN log-mel spectrograms ``log(clamp(mel @ |STFT|, 1e-5))`` of (B, 1, T) estimate
    and target (not differentiated through); a scalar. Sizes in samples (Hann window), Slaney mel bands like
    librosa's, ``fmin``/``fmax`` in Hz (``fmax=None``: Nyquist)."""

    def __init__(self, sampling_rate: int = 16000, n_fft: int = 1024, num_mels: int = 80, hop_size: int = 160,
                 win_size: int = 800, fmin: float = 0.0, fmax: float | None = None):  # fmt: skip
        super().__init__()
        self.n_fft, self.hop_size, self.win_size = n_fft, hop_size, win_size
        # Clone: the cached array must not alias a buffer that .to()/in-place ops could touch.
        basis = torch.from_numpy(_slaney_mel_basis(sampling_rate, n_fft, num_mels, fmin, fmax)).clone()
        self.register_buffer("mel_basis", basis, persistent=False)
        self.register_buffer("window", torch.hann_window(win_size), persistent=False)

    def log_mel(self, wav: torch.Tensor) -> torch.Tensor:
        """(B, 1, T), (B, T) or (T,) -> (N, num_mels, T // hop_size) natural-log mel spectrogram."""
        # HiFi-GAN pads (n_fft - hop) / 2 per side (not torch.stft's centring) so that frames = T // hop.
        pad = (self.n_fft - self.hop_size) // 2
        x = F.pad(wav.reshape(-1, 1, wav.shape[-1]).float(), (pad, pad), mode="reflect").squeeze(1)
        spec = torch.stft(x, self.n_fft, self.hop_size, self.win_size, self.window, center=False, return_complex=True)
        mag = (torch.view_as_real(spec).pow(2).sum(-1) + 1e-9).sqrt()
        return torch.matmul(self.mel_basis, mag).clamp(min=1e-5).log()

    def forward(self, estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(self.log_mel(estimate), self.log_mel(target).detach())


def mel_spectrogram(wav: torch.Tensor, **params) -> torch.Tensor:
    """HiFi-GAN log-mel spectrogram of (B, 1, T), (B, T) or (T,) audio nominally in [-1, 1]:
    (N, num_mels, frames). ``params``: :class:`MelSpectrogramLoss`'s arguments."""
    return MelSpectrogramLoss(**params).to(wav.device).log_mel(wav)
