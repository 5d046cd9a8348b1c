"""EMA vector quantization (VQ-VAE-2 / EnCodec style) that keeps every rank in sync.

State layout matches the released X-Codec checkpoints:
``vq.layers.{i}._codebook.{inited,cluster_size,embed,embed_avg}``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from utils.distributed import all_gather_rows, all_reduce, broadcast_tensors, is_distributed


def _sample_rows(samples: torch.Tensor, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
    n = samples.shape[0]
    if n >= num:
        idx = torch.randperm(n, device=samples.device, generator=generator)[:num]
    else:
        idx = torch.randint(0, n, (num,), device=samples.device, generator=generator)
    return samples[idx]


def kmeans(samples: torch.Tensor, num_clusters: int, num_iters: int = 10, max_samples: int = 10_000):
    """Lloyd's k-means on (N, D) samples, at most ``max_samples`` of them (never fewer than
    10 per cluster: with about one sample per cluster the residual of every later stage
    collapses onto a few codes). Returns ``(means (K, D), counts (K,))``."""
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
        new_means = sums / counts.clamp(min=1)[:, None]
        means = torch.where(counts[:, None] == 0, means, new_means)
    return means, counts


class EuclideanCodebook(nn.Module):
    """One codebook with nearest-neighbour (Euclidean) lookup and EMA updates.

    Args:
        dim: vector dimension D.
        codebook_size: number of entries K.
        kmeans_init: initialise from k-means on the first training batch (gathered across ranks).
        kmeans_iters: k-means iterations.
        decay: EMA decay of cluster sizes and sums.
        epsilon: Laplace smoothing of cluster sizes.
        threshold_ema_dead_code: entries whose EMA size falls below this are replaced by
            random vectors of the current batch (gathered across ranks, then broadcast).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        kmeans_init: bool = True,
        kmeans_iters: int = 50,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        threshold_ema_dead_code: float = 2.0,
    ):
        super().__init__()
        self.codebook_size = codebook_size
        self.kmeans_iters = kmeans_iters
        self.decay = decay
        self.epsilon = epsilon
        self.threshold_ema_dead_code = threshold_ema_dead_code
        if kmeans_init:
            embed = torch.zeros(codebook_size, dim)
        else:
            embed = nn.init.kaiming_uniform_(torch.empty(codebook_size, dim))
        self.register_buffer("inited", torch.tensor([float(not kmeans_init)]))
        self.register_buffer("cluster_size", torch.zeros(codebook_size))
        self.register_buffer("embed", embed)
        self.register_buffer("embed_avg", embed.clone())
        self._known_inited = False  # a Python copy of ``inited`` once it is 1: no host sync per forward

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._known_inited = False  # the loaded ``inited`` decides
        super()._load_from_state_dict(*args, **kwargs)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N,) nearest-entry indices.

        The distance keeps the original's exact expression (including the row-constant
        ``|x|^2`` term) so that float rounding, and thus tie-breaking, matches it.
        """
        embed = self.embed.t()
        dist = -(x.pow(2).sum(1, keepdim=True) - 2 * x @ embed + embed.pow(2).sum(0, keepdim=True))
        return dist.max(dim=-1).indices

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (...) indices."""
        return self.quantize(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1])

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(...) indices -> (..., D) vectors."""
        return F.embedding(codes, self.embed)

    @torch.no_grad()
    def _init_from(self, flat: torch.Tensor) -> None:
        samples = all_gather_rows(flat)
        embed, counts = kmeans(samples, self.codebook_size, self.kmeans_iters)
        self.embed.copy_(embed)
        self.embed_avg.copy_(embed)
        self.cluster_size.copy_(counts)
        self.inited.fill_(1.0)
        # k-means sampled at random on each rank: rank 0's result wins everywhere.
        broadcast_tensors(self.buffers())

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
        self._expire_codes(flat)

    @torch.no_grad()
    def _expire_codes(self, flat: torch.Tensor) -> None:
        if self.threshold_ema_dead_code <= 0:
            return
        # cluster_size is identical on all ranks (all-reduced), so all take the same branch.
        dead = self.cluster_size < self.threshold_ema_dead_code
        if not bool(dead.any()):
            return
        # Replacements are drawn from this rank's batch and rank 0's win everywhere (as
        # EnCodec does): no rank gathers every rank's residuals.
        replacement = _sample_rows(flat, self.codebook_size)
        self.embed.copy_(torch.where(dead[:, None], replacement, self.embed))
        if is_distributed():
            broadcast_tensors([self.embed])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, D) -> quantized (B, T, D), codes (B, T). Updates the EMA state in training."""
        flat = x.reshape(-1, x.shape[-1])
        if self.training and not self._known_inited:
            self._known_inited = bool(self.inited.item())
            if not self._known_inited:
                self._init_from(flat.detach().float())
                self._known_inited = True
        codes = self.quantize(flat)
        quantized = self.decode(codes).view_as(x)
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

    def state_restored(self) -> None:
        """The buffers were overwritten (e.g. rolled back to before k-means): read ``inited`` again."""
        self._codebook._known_inited = False

    @torch.no_grad()
    def set_codebook(self, embed: torch.Tensor) -> None:
        """Use ``embed`` (bins, D) as the codebook, marked initialised (EMA statistics restart from it)."""
        book = self._codebook
        book.embed.copy_(embed)
        book.embed_avg.copy_(embed)
        book.cluster_size.fill_(1.0)
        book.inited.fill_(1.0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, T) -> (B, T)."""
        return self._codebook.encode(x.transpose(1, 2))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, D, T)."""
        return self._codebook.decode(codes).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, D, T) -> quantized (B, D, T), codes (B, T), commitment loss ()."""
        xt = x.transpose(1, 2)
        quantized, codes = self._codebook(xt)
        if self.training:
            commit = F.mse_loss(quantized.detach(), xt)
            quantized = xt + (quantized - xt).detach()
        else:
            commit = x.new_zeros(())
        return quantized.transpose(1, 2), codes, commit


class ResidualVectorQuantization(nn.Module):
    """A stack of VQ stages, each quantizing the residual of the previous ones."""

    def __init__(self, num_quantizers: int, dim: int, codebook_size: int, **codebook_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(
            [VectorQuantization(dim, codebook_size, **codebook_kwargs) for _ in range(num_quantizers)]
        )

    def forward(self, x: torch.Tensor, n_q: int):
        """(B, D, T) -> quantized (B, D, T), codes (n_q, B, T), commit losses (n_q,)."""
        quantized_out = torch.zeros_like(x)
        residual = x
        codes, losses = [], []
        for layer in self.layers[:n_q]:
            quantized, idx, loss = layer(residual)
            residual = residual - quantized
            quantized_out = quantized_out + quantized
            codes.append(idx)
            losses.append(loss)
        return quantized_out, torch.stack(codes), torch.stack(losses)

    def encode(self, x: torch.Tensor, n_q: int) -> torch.Tensor:
        """(B, D, T) -> (n_q, B, T)."""
        residual = x
        codes = []
        for layer in self.layers[:n_q]:
            idx = layer.encode(residual)
            residual = residual - layer.decode(idx)
            codes.append(idx)
        return torch.stack(codes)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(n_q, B, T) -> (B, D, T)."""
        out = self.layers[0].decode(codes[0])
        for layer, idx in zip(self.layers[1:], codes[1:]):
            out = out + layer.decode(idx)
        return out
