"""Finite scalar quantization (Mentzer et al. 2023) as X-Codec 2 uses it: one codebook of prod(levels) codes
(levels [4] * 8: 65,536), a projection to len(levels) bounded scalars, each rounded to its level grid."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class FSQ(nn.Module):
    """(B, F, dim) latents <-> (B, F) integer codes in [0, prod(levels)).

    Args:
        dim: latent channels (2048 in X-Codec 2).
        levels: grid points per scalar ([4] * 8).
        frame_rate: frames per second, for the bit rate.
    """

    def __init__(self, dim: int, levels: Sequence[int], frame_rate: float):
        super().__init__()
        self.project_in = nn.Linear(dim, len(levels))
        self.project_out = nn.Linear(len(levels), dim)
        self.register_buffer("levels", torch.tensor(list(levels), dtype=torch.int32), persistent=False)
        basis = torch.cumprod(torch.tensor([1, *levels[:-1]]), dim=0, dtype=torch.int32)
        self.register_buffer("basis", basis, persistent=False)
        self.n_q, self.bins, self.frame_rate = 1, math.prod(levels), frame_rate
        self.target_bandwidths = [math.log2(self.bins) * frame_rate / 1000]

    def n_q_for_bandwidth(self, bandwidth: float | None) -> int:
        """One codebook: ``bandwidth`` must be ``None`` or the model's one bit rate (kbps)."""
        if bandwidth is not None and not math.isclose(bandwidth, self.target_bandwidths[0]):
            raise ValueError(f"bandwidth {bandwidth} kbps: this model has one codebook at {self.target_bandwidths[0]} kbps")
        return 1

    def bound(self, z: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
        """Each scalar squashed into its level range (even level counts offset by half a step)."""
        half_range = (self.levels - 1) * (1 + eps) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        return (z + (offset / half_range).atanh()).tanh() * half_range - offset

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, F, dim) -> (B, F) int64 codes, in float32 whatever the caller's autocast."""
        with torch.autocast(z.device.type, enabled=False):
            # Bounded twice, as the released model computes it (its wrapper bounds before the FSQ does).
            scalars = self.bound(self.bound(self.project_in(z.float())))
            digits = scalars.round() + (self.levels // 2)  # each in [0, level)
            return (digits * self.basis).sum(dim=-1).long()

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, F) integer codes -> (B, F, dim) latents."""
        digits = (codes[..., None] // self.basis) % self.levels
        half = self.levels // 2
        return self.project_out((digits - half) / half)
