"""Codebook usage and perplexity of the residual VQ stages, for training logs."""

from __future__ import annotations

import torch

from utils.distributed import all_reduce


def codebook_stats(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Usage and perplexity from code counts.

    Args:
        counts: (n_q, bins) how often each entry was chosen.

    Returns:
        ``(usage (n_q,), perplexity (n_q,))``: the fraction of entries chosen at least
        once, and ``exp(entropy)`` of the code distribution (``bins`` when uniform, 1
        when one entry takes everything; 0 for a stage that saw no frames).
    """
    counts = counts.double()
    total = counts.sum(dim=1, keepdim=True)
    p = counts / total.clamp(min=1)
    entropy = -(p * p.clamp(min=1e-30).log()).sum(dim=1)
    seen = total[:, 0] > 0
    usage = (counts > 0).double().mean(dim=1)
    perplexity = torch.where(seen, entropy.exp(), torch.zeros_like(entropy))
    return usage.float(), perplexity.float()


class CodebookUsage:
    """Accumulates code counts per quantizer stage between two log points.

    Args:
        n_q: stages of the quantizer.
        bins: entries per codebook.
        device: where the counts live (the codes' device, to avoid a copy per step).
    """

    def __init__(self, n_q: int, bins: int, device: torch.device | str = "cpu"):
        self.n_q, self.bins = n_q, bins
        self.counts = torch.zeros(n_q, bins, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, codes: torch.Tensor) -> None:
        """Count ``codes`` (B, n_used, F); stages past n_used are not touched."""
        for i in range(codes.shape[1]):
            self.counts[i] += torch.bincount(codes[:, i].reshape(-1), minlength=self.bins).to(self.counts)

    def compute(self, reset: bool = True, sync: bool = True) -> dict[str, float]:
        """``{"usage_q{i}": ..., "perplexity_q{i}": ...}`` over every rank (``sync``; a collective)."""
        counts = self.counts.clone()
        if sync:
            all_reduce(counts)
        usage, perplexity = codebook_stats(counts)
        if reset:
            self.counts.zero_()
        out = {}
        for i in range(self.n_q):
            if counts[i].sum() > 0:
                out[f"usage_q{i}"] = float(usage[i])
                out[f"perplexity_q{i}"] = float(perplexity[i])
        return out
