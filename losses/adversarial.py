"""Least-squares GAN and feature-matching losses."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

LogitsLike = torch.Tensor | Sequence[torch.Tensor]


def _as_list(logits: LogitsLike) -> list[torch.Tensor]:
    return [logits] if isinstance(logits, torch.Tensor) else list(logits)


def _mse_to(x: torch.Tensor, target: float) -> torch.Tensor:
    return F.mse_loss(x.float(), torch.full_like(x, target, dtype=torch.float32))


class GANLoss(nn.Module):
    """Least-squares (LSGAN) loss, real 1 and fake 0, averaged over sub-discriminators (the original's MSEGLoss and
    MSEDiscriminatorLoss); logits: a (B, ...) tensor or one per sub-discriminator. ``forward``: :meth:`generator`."""

    def generator(self, fake_logits: LogitsLike) -> torch.Tensor:
        """``mean_i mean((1 - D_i(fake))^2)``; gradients flow into the generator through the logits."""
        fakes = _as_list(fake_logits)
        return sum(_mse_to(f, 1.0) for f in fakes) / len(fakes)

    def discriminator(self, real_logits: LogitsLike, fake_logits: LogitsLike) -> torch.Tensor:
        """``mean_i [mean((1 - D_i(real))^2) + mean(D_i(fake)^2)]``; the caller detaches the fake audio."""
        reals, fakes = _as_list(real_logits), _as_list(fake_logits)
        return sum(_mse_to(r, 1.0) + _mse_to(f, 0.0) for r, f in zip(reals, fakes, strict=True)) / len(reals)

    def forward(self, fake_logits: LogitsLike) -> torch.Tensor:
        return self.generator(fake_logits)


def _flatten(fmaps: Sequence) -> list[torch.Tensor]:
    return [t for f in fmaps for t in ([f] if isinstance(f, torch.Tensor) else _flatten(f))]


class FeatureMatchingLoss(nn.Module):
    """Mean over (sub-discriminator, layer) pairs of the L1 between real (detached) and fake feature maps;
    ``forward(real_fmaps, fake_fmaps)``: nested lists ``[[(B, C, ...), ...], ...]`` (or flat), same structure."""

    def forward(self, real_fmaps: Sequence, fake_fmaps: Sequence) -> torch.Tensor:
        pairs = list(zip(_flatten(real_fmaps), _flatten(fake_fmaps), strict=True))
        return sum(F.l1_loss(fake.float(), real.float().detach()) for real, fake in pairs) / len(pairs)
