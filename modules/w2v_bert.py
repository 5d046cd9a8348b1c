"""X-Codec 2's semantic branch: w2v-BERT 2.0 on Kaldi fbank features, as X-Codec 2 computes them
(transformers' ``SeamlessM4TFeatureExtractor``, numpy: no torchaudio), and its convolutional adapter."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from transformers import SeamlessM4TFeatureExtractor

MEL_BINS, STRIDE = 80, 2  # facebook/w2v-bert-2.0's preprocessor_config.json


def _stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 80) frames -> per-bin mean and unbiased variance, (1, 80) each (the extractor's normalisation)."""
    return x.mean(0, keepdims=True), x.var(0, ddof=1, keepdims=True)


class Fbank:
    """Per-clip features: 80 log-mel bins every 10 ms, normalised per bin over the clip (or over a whole file's
    ``norm_stats`` for its windows), two frames stacked: (F, 160) for a clip of 2F fbank frames."""

    def __init__(self, sample_rate: int = 16000):
        self.sample_rate = sample_rate
        self.extractor = SeamlessM4TFeatureExtractor(feature_size=MEL_BINS, num_mel_bins=MEL_BINS, stride=STRIDE,
                                                     sampling_rate=sample_rate, padding_value=1.0)  # fmt: skip

    def raw(self, wav: torch.Tensor) -> np.ndarray:
        """(T,) audio -> (N, 80) log-mel frames (float64), not normalised: the extractor's own fbank, which its
        ``__call__`` normalises in float64 before casting (its public output is normalised or float32 already)."""
        return self.extractor._extract_fbank_features(wav.detach().float().cpu().numpy())

    def norm_stats(self, wav: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Per-bin mean and unbiased variance over (T,) audio's frames."""
        return _stats(self.raw(wav))

    def __call__(self, wav: torch.Tensor, norm_stats: tuple[np.ndarray, np.ndarray] | None = None) -> torch.Tensor:
        """(T,) audio -> (F, 160) features (the extractor's normalisation, in its float32 expression)."""
        x = self.raw(wav)
        mean, var = norm_stats if norm_stats is not None else _stats(x)
        x = ((x - mean) / np.sqrt(var + 1e-7)).astype(np.float32)
        n = x.shape[0] // STRIDE
        return torch.from_numpy(np.ascontiguousarray(x[: n * STRIDE].reshape(n, STRIDE * MEL_BINS)))


class SemanticAdapter(nn.Module):
    """conv -> ReLU -> (conv -> ReLU -> conv) + skip -> conv, all k3 "same". (B, C, F) -> (B, C, F)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv1d(dim, dim, 3, padding=1, bias=False)
        self.conv2 = nn.Conv1d(dim, dim, 3, padding=1)
        self.conv3 = nn.Conv1d(dim, dim, 3, padding=1)
        self.conv4 = nn.Conv1d(dim, dim, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        return self.conv4(x + self.conv3(torch.relu(self.conv2(x))))
