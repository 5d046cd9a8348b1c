"""Residual vector quantizer with bandwidth arithmetic (EnCodec ``quantization/vq.py`` style)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from utils.distributed import broadcast_object

from .core_vq import ResidualVectorQuantization


@dataclass
class QuantizedResult:
    """Output of :class:`ResidualVectorQuantizer`.

    Attributes:
        quantized: (B, D, T) quantized latents (straight-through in training).
        codes: (B, n_q, T) integer codes.
        commit_loss: () mean commitment loss over the stages used (0 in eval).
        n_q: number of quantizer stages used.
        bandwidth: kbps that ``n_q`` stages represent.
    """

    quantized: torch.Tensor
    codes: torch.Tensor
    commit_loss: torch.Tensor
    n_q: int
    bandwidth: float


class ResidualVectorQuantizer(nn.Module):
    """Residual VQ whose depth is chosen by a target bandwidth.

    Args:
        dimension: latent size D.
        n_q: maximum number of stages.
        bins: codebook size.
        frame_rate: latent frames per second (for kbps <-> n_q).
        target_bandwidths: the bandwidths (kbps) the codec was trained for.
        decay, kmeans_init, kmeans_iters, threshold_ema_dead_code: codebook training options.
    """

    def __init__(
        self,
        dimension: int,
        n_q: int,
        bins: int,
        frame_rate: float,
        target_bandwidths: Sequence[float],
        decay: float = 0.99,
        kmeans_init: bool = True,
        kmeans_iters: int = 50,
        threshold_ema_dead_code: float = 2.0,
    ):
        super().__init__()
        self.dimension = dimension
        self.n_q = n_q
        self.bins = bins
        self.frame_rate = frame_rate
        self.target_bandwidths = [float(b) for b in target_bandwidths]
        self.vq = ResidualVectorQuantization(
            n_q,
            dimension,
            bins,
            decay=decay,
            kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters,
            threshold_ema_dead_code=threshold_ema_dead_code,
        )

    @classmethod
    def for_bandwidths(cls, dimension: int, bins: int, frame_rate: float, target_bandwidths: Sequence[float], **kwargs) -> ResidualVectorQuantizer:
        """As many stages as the largest target bandwidth needs (the original's arithmetic:
        ``1000 * max_bw // (frame_rate * log2(bins))``)."""
        n_q = int(1000 * target_bandwidths[-1] // (frame_rate * math.log2(bins)))
        return cls(dimension, n_q, bins, frame_rate, target_bandwidths, **kwargs)

    @property
    def bandwidth_per_quantizer(self) -> float:
        """kbps carried by one stage: log2(bins) bits per frame."""
        return math.log2(self.bins) * self.frame_rate / 1000

    def n_q_for_bandwidth(self, bandwidth: float | None) -> int:
        """Stages used for ``bandwidth`` kbps; ``None`` means the largest target bandwidth."""
        if bandwidth is None:
            return self.n_q
        if float(bandwidth) not in self.target_bandwidths:
            raise ValueError(
                f"unsupported bandwidth {bandwidth} kbps; this model supports {self.target_bandwidths}"
            )
        return min(self.n_q, max(1, math.floor(float(bandwidth) / self.bandwidth_per_quantizer)))

    def save_state(self) -> list[torch.Tensor]:
        """Copies of the codebooks' buffers (EMA statistics, ``inited``), for :meth:`restore_state`."""
        return [b.detach().clone() for b in self.buffers()]

    @torch.no_grad()
    def restore_state(self, saved: list[torch.Tensor]) -> None:
        """Put back what :meth:`save_state` returned (a training step skipped for a NaN)."""
        for buf, value in zip(self.buffers(), saved):
            buf.copy_(value)
        for layer in self.vq.layers:
            layer.state_restored()

    def sample_bandwidth(self, rng: random.Random | None = None, sync: bool = True) -> float:
        """A random target bandwidth, the same on every rank: chosen on rank 0 and shared
        (``sync``), or drawn from ``rng`` when every rank holds the same ``rng`` state (no
        collective: training seeds and restores it alike everywhere)."""
        choice = (rng or random).choice(self.target_bandwidths)
        return broadcast_object(choice) if sync else choice

    def forward(self, x: torch.Tensor, bandwidth: float | None = None) -> QuantizedResult:
        """Quantize (B, D, T) latents with the stages that ``bandwidth`` allows.

        Always in float32, also inside a bf16 autocast region: nearest-neighbour distances
        in bf16 pick wrong codes.
        """
        n_q = self.n_q_for_bandwidth(bandwidth)
        with torch.autocast(x.device.type, enabled=False):
            quantized, codes, losses = self.vq(x.float(), n_q)
        return QuantizedResult(quantized, codes.transpose(0, 1), losses.mean(), n_q, n_q * self.bandwidth_per_quantizer)

    def encode(self, x: torch.Tensor, bandwidth: float | None = None) -> torch.Tensor:
        """(B, D, T) latents -> (B, n_q, T) codes."""
        return self.vq.encode(x, self.n_q_for_bandwidth(bandwidth)).transpose(0, 1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, n_q, T) codes -> (B, D, T) latents. Codes must already be range-checked."""
        if codes.shape[1] > self.n_q:
            raise ValueError(f"codes have {codes.shape[1]} quantizers; this model has at most {self.n_q}")
        return self.vq.decode(codes.transpose(0, 1))
