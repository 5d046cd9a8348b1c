"""EMA residual VQ (EnCodec style, every rank in sync, EnCodec's bandwidth arithmetic) and codebook statistics.
State layout: the released ``quantizer.vq.layers.{i}._codebook.{inited,cluster_size,embed,embed_avg}``."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from utils.distributed import all_gather_rows, all_reduce, broadcast_object, broadcast_tensors, is_distributed


def _sample_rows(samples: torch.Tensor, num: int) -> torch.Tensor:
    n = samples.shape[0]
    if n >= num:
        return samples[torch.randperm(n, device=samples.device)[:num]]
    return samples[torch.randint(0, n, (num,), device=samples.device)]


def kmeans(samples: torch.Tensor, num_clusters: int, num_iters: int = 10, max_samples: int = 10_000):
    """Lloyd's k-means on at most ``max_samples`` of (N, D) samples -> ``(means (K, D), counts (K,))``; at least 10
    samples per cluster: with about one, every later stage's residual collapses onto a few codes."""
    samples = samples.contiguous()  # cdist on a strided view is ~40x slower
    max_samples = max(max_samples, 10 * num_clusters)
    if samples.shape[0] > max_samples:
        samples = _sample_rows(samples, max_samples)
    means = _sample_rows(samples, num_clusters)
    counts = torch.zeros(num_clusters, device=samples.device)
    for _ in range(num_iters):
        assign = torch.cdist(samples, means).argmin(dim=-1)
        counts = torch.bincount(assign, minlength=num_clusters).to(samples.dtype)
        sums = torch.zeros_like(means).index_add_(0, assign, samples)
        means = torch.where(counts[:, None] == 0, means, sums / counts.clamp(min=1)[:, None])
    return means, counts


class EuclideanCodebook(nn.Module):
    """One codebook with nearest-neighbour (Euclidean) lookup and EMA updates.

    Args:
        dim: vector dimension D.
        codebook_size: number of entries K.
        kmeans_init: initialise from ``kmeans_iters`` of k-means on the first training batch (all ranks').
        decay, epsilon: EMA decay of cluster sizes and sums, Laplace smoothing of cluster sizes.
        threshold_ema_dead_code: entries whose EMA size falls below this are replaced by
            random vectors of the current batch (rank 0's, broadcast).
    """

    def __init__(self, dim: int, codebook_size: int, kmeans_init: bool = True, kmeans_iters: int = 50,
                 decay: float = 0.99, epsilon: float = 1e-5, threshold_ema_dead_code: float = 2.0):  # fmt: skip
        super().__init__()
        self.codebook_size, self.kmeans_iters, self.decay, self.epsilon = codebook_size, kmeans_iters, decay, epsilon
        self.threshold_ema_dead_code = threshold_ema_dead_code
        embed = torch.zeros(codebook_size, dim)
        embed = embed if kmeans_init else nn.init.kaiming_uniform_(embed)
        self.register_buffer("inited", torch.tensor([float(not kmeans_init)]))
        self.register_buffer("cluster_size", torch.zeros(codebook_size))
        self.register_buffer("embed", embed)
        self.register_buffer("embed_avg", embed.clone())
        self._known_inited = False  # a Python copy of ``inited`` once it is 1: no host sync per forward

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._known_inited = False  # the loaded ``inited`` decides
        super()._load_from_state_dict(*args, **kwargs)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (...) nearest-entry indices.

        The distance keeps the original's exact expression (including the row-constant
        ``|x|^2`` term) so that float rounding, and thus tie-breaking, matches it.
        """
        flat, embed = x.reshape(-1, x.shape[-1]), self.embed.t()
        dist = -(flat.pow(2).sum(1, keepdim=True) - 2 * flat @ embed + embed.pow(2).sum(0, keepdim=True))
        return dist.max(dim=-1).indices.view(*x.shape[:-1])

    @torch.no_grad()
    def set(self, embed: torch.Tensor, counts: torch.Tensor | float) -> None:
        """Use ``embed`` (K, D) as the codebook with cluster sizes ``counts``, marked initialised."""
        self.embed.copy_(embed)
        self.embed_avg.copy_(embed)
        self.cluster_size.copy_(torch.as_tensor(counts))
        self.inited.fill_(1.0)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, codes: torch.Tensor) -> None:
        # index_add_, not one_hot/bincount: those check the index range on the host (a sync).
        counts = flat.new_zeros(self.codebook_size).index_add_(0, codes, flat.new_ones(codes.shape[0]))
        if flat.is_cuda and torch.are_deterministic_algorithms_enabled():
            sums = F.one_hot(codes, self.codebook_size).to(flat.dtype).t() @ flat  # index_add_ is atomic on CUDA
        else:
            sums = flat.new_zeros(self.codebook_size, flat.shape[1]).index_add_(0, codes, flat)
        all_reduce(counts)
        all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.epsilon) / (n + self.codebook_size * self.epsilon) * n
        self.embed.copy_(self.embed_avg / smoothed.unsqueeze(1))
        # Dead codes: cluster_size is the same on every rank (all-reduced), so all take the same
        # branch; replacements come from this rank's batch and rank 0's win (as EnCodec does).
        if self.threshold_ema_dead_code <= 0:
            return
        dead = self.cluster_size < self.threshold_ema_dead_code
        if bool(dead.any()):
            self.embed.copy_(torch.where(dead[:, None], _sample_rows(flat, self.codebook_size), self.embed))
            if is_distributed():
                broadcast_tensors([self.embed])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, D) -> quantized (B, T, D), codes (B, T). Updates the EMA state in training."""
        flat = x.reshape(-1, x.shape[-1])
        if self.training and not self._known_inited:
            self._known_inited = bool(self.inited.item())
            if not self._known_inited:
                self.set(*kmeans(all_gather_rows(flat.detach().float()), self.codebook_size, self.kmeans_iters))
                broadcast_tensors(self.buffers())  # k-means sampled at random on each rank: rank 0's result wins
                self._known_inited = True
        codes = self.quantize(flat)
        quantized = F.embedding(codes, self.embed).view_as(x)
        if self.training:
            self._ema_update(flat.detach().float(), codes)
        return quantized, codes.view(*x.shape[:-1])


class VectorQuantization(nn.Module):
    """One VQ stage on channel-first tensors (B, D, T), with straight-through gradients."""

    def __init__(self, dim: int, codebook_size: int, **codebook_kwargs):
        super().__init__()
        self._codebook = EuclideanCodebook(dim, codebook_size, **codebook_kwargs)

    @property
    def codebook(self) -> torch.Tensor:
        return self._codebook.embed

    def set_codebook(self, embed: torch.Tensor) -> None:
        """Use ``embed`` (bins, D) as the codebook, marked initialised (EMA statistics restart from it)."""
        self._codebook.set(embed, 1.0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, T) -> (B, T)."""
        return self._codebook.quantize(x.transpose(1, 2))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, D, T)."""
        return F.embedding(codes, self.codebook).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, D, T) -> quantized (B, D, T), codes (B, T), commitment loss ()."""
        xt = x.transpose(1, 2)
        quantized, codes = self._codebook(xt)
        commit = x.new_zeros(())
        if self.training:
            commit = F.mse_loss(quantized.detach(), xt)
            quantized = xt + (quantized - xt).detach()
        return quantized.transpose(1, 2), codes, commit


@dataclass
class QuantizedResult:
    """Output of :class:`ResidualVectorQuantizer`."""

    quantized: torch.Tensor  # (B, D, T) quantized latents (straight-through in training)
    codes: torch.Tensor  # (B, n_q, T) integer codes
    commit_loss: torch.Tensor  # () mean commitment loss over the stages used (0 in eval)
    n_q: int  # quantizer stages used
    bandwidth: float  # kbps that n_q stages represent


class ResidualVectorQuantizer(nn.Module):
    """Residual VQ (each stage quantizes the previous ones' residual), its depth chosen by a target bandwidth.

    Args:
        dimension: latent size D.
        n_q: maximum number of stages.
        bins: codebook size.
        frame_rate: latent frames per second (for kbps <-> n_q).
        target_bandwidths: the bandwidths (kbps) the codec was trained for.
        codebook_kwargs: :class:`EuclideanCodebook` training options (decay, kmeans_init, ...).
    """

    def __init__(self, dimension: int, n_q: int, bins: int, frame_rate: float, target_bandwidths: Sequence[float],
                 **codebook_kwargs):  # fmt: skip
        super().__init__()
        self.dimension, self.n_q, self.bins, self.frame_rate = dimension, n_q, bins, frame_rate
        self.target_bandwidths = [float(b) for b in target_bandwidths]
        # ``vq.layers.{i}``: the released checkpoints' layout.
        layers = nn.ModuleList(VectorQuantization(dimension, bins, **codebook_kwargs) for _ in range(n_q))
        self.vq = nn.ModuleDict({"layers": layers})

    @classmethod
    def for_bandwidths(cls, dimension: int, bins: int, frame_rate: float, target_bandwidths: Sequence[float],
                       **kwargs) -> ResidualVectorQuantizer:  # fmt: skip
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
            raise ValueError(f"unsupported bandwidth {bandwidth} kbps; this model supports {self.target_bandwidths}")
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
            layer._codebook._known_inited = False  # ``inited`` may have been rolled back: read it again

    def sample_bandwidth(self, rng: random.Random | None = None, sync: bool = True) -> float:
        """A random target bandwidth, the same on every rank: chosen on rank 0 and shared
        (``sync``), or drawn from ``rng`` when every rank holds the same ``rng`` state (no
        collective: training seeds and restores it alike everywhere)."""
        choice = (rng or random).choice(self.target_bandwidths)
        return broadcast_object(choice) if sync else choice

    def forward(self, x: torch.Tensor, bandwidth: float | None = None) -> QuantizedResult:
        """Quantize (B, D, T) latents with the stages ``bandwidth`` allows; in float32 also under bf16 autocast
        (nearest-neighbour distances in bf16 pick wrong codes)."""
        n_q = self.n_q_for_bandwidth(bandwidth)
        with torch.autocast(x.device.type, enabled=False):
            residual = x.float()
            quantized_out = torch.zeros_like(residual)
            codes, losses = [], []
            for layer in self.vq.layers[:n_q]:
                quantized, idx, loss = layer(residual)
                residual = residual - quantized
                quantized_out = quantized_out + quantized
                codes.append(idx)
                losses.append(loss)
        bandwidth = n_q * self.bandwidth_per_quantizer
        return QuantizedResult(quantized_out, torch.stack(codes, 1), torch.stack(losses).mean(), n_q, bandwidth)

    def encode(self, x: torch.Tensor, bandwidth: float | None = None) -> torch.Tensor:
        """(B, D, T) latents -> (B, n_q, T) codes."""
        residual, codes = x, []
        for layer in self.vq.layers[: self.n_q_for_bandwidth(bandwidth)]:
            codes.append(layer.encode(residual))
            residual = residual - layer.decode(codes[-1])
        return torch.stack(codes, 1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, n_q, T) codes -> (B, D, T) latents. Codes must already be range-checked."""
        if codes.shape[1] > self.n_q:
            raise ValueError(f"codes have {codes.shape[1]} quantizers; this model has at most {self.n_q}")
        out = self.vq.layers[0].decode(codes[:, 0])
        for i in range(1, codes.shape[1]):
            out = out + self.vq.layers[i].decode(codes[:, i])
        return out


class CodebookUsage:
    """Counts of every code of every stage (``n_q`` x ``bins``, on the codes' ``device``: no copy per step):
    training logs :meth:`compute` (all ranks), evaluation reports :meth:`summary` (with the bitrate)."""

    def __init__(self, n_q: int, bins: int, device: torch.device | str = "cpu"):
        self.n_q, self.bins, self.frames, self.seconds = n_q, bins, 0, 0.0
        self.counts = torch.zeros(n_q, bins, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, codes: torch.Tensor, seconds: float = 0.0) -> None:
        """Count ``codes`` (B, n_used, F) or (n_used, F) of clips lasting ``seconds`` in all;
        stages past n_used are not touched."""
        codes = torch.as_tensor(codes)
        if codes.dim() == 2:
            codes = codes[None]
        n_used = codes.shape[1]
        # One index_add_ over (stage, code) pairs: bincount would sync with the host per stage.
        offsets = self.bins * torch.arange(n_used, device=self.counts.device)[:, None]
        flat = (codes.to(self.counts.device).transpose(0, 1).reshape(n_used, -1) + offsets).reshape(-1)
        self.counts.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=self.counts.dtype))
        self.frames += codes.shape[0] * codes.shape[-1]
        self.seconds += seconds

    def compute(self, reset: bool = True, sync: bool = True) -> dict[str, float]:
        """``{"usage_q{i}", "perplexity_q{i}"}`` over every rank (``sync``: a collective), stages with frames only.
        Usage: fraction of entries chosen at least once; perplexity: ``exp(entropy)`` (``bins`` when uniform)."""
        counts = self.counts.clone()
        if sync:
            all_reduce(counts)
        if reset:
            self.counts.zero_()
            self.frames, self.seconds = 0, 0.0
        counts = counts.double()
        p = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
        perplexity = (-(p * p.clamp(min=1e-30).log()).sum(dim=1)).exp().float()
        usage = (counts > 0).double().mean(dim=1).float()
        out = {}
        for i in range(self.n_q):
            if counts[i].sum() > 0:
                out |= {f"usage_q{i}": float(usage[i]), f"perplexity_q{i}": float(perplexity[i])}
        return out

    def summary(self) -> dict:
        """``{"codebooks": [{"index", "used", "usage", "entropy_bits"}], "frames", "seconds", "bitrate_kbps",
        "entropy_bitrate_kbps"}`` of this process's counts; the entropy rate is what an ideal entropy coder reaches."""
        books = []
        for i, counts in enumerate(self.counts.double().cpu()):
            p = counts[counts > 0] / counts.sum().clamp(min=1)
            h = float(-(p * p.log2()).sum()) + 0.0 if p.numel() else 0.0  # + 0.0: no -0.0
            used = counts > 0
            books.append({"index": i, "used": int(used.sum()), "usage": float(used.double().mean()), "entropy_bits": h})
        seconds = self.seconds or math.nan
        bits = self.n_q * math.log2(self.bins) * self.frames
        entropy_bits = sum(b["entropy_bits"] for b in books) * self.frames
        rates = {"bitrate_kbps": bits / seconds / 1000, "entropy_bitrate_kbps": entropy_bits / seconds / 1000}
        return {"codebooks": books, "frames": self.frames, "seconds": self.seconds, **rates}
