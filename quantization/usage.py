"""Codebook usage, perplexity and entropy of the residual VQ stages: training logs and evaluation reports."""

from __future__ import annotations

import math

import torch

from utils.distributed import all_reduce


class CodebookUsage:
    """Counts of every code of every quantizer stage, with the statistics built on them.

    Training accumulates between two log points and logs :meth:`compute` (all ranks);
    evaluation accumulates over a corpus and reports :meth:`summary` (with the bitrate).

    Args:
        n_q: stages of the quantizer.
        bins: entries per codebook.
        device: where the counts live (the codes' device, to avoid a copy per step).
    """

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
        """``{"usage_q{i}": ..., "perplexity_q{i}": ...}`` over every rank (``sync``; a collective).

        Usage: the fraction of entries chosen at least once; perplexity: ``exp(entropy)`` of
        the code distribution (``bins`` when uniform, 1 when one entry takes everything).
        Stages that saw no frames are left out."""
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
        """``{"codebooks": [{"index", "used", "usage", "entropy_bits"}], "frames", "seconds",
        "bitrate_kbps", "entropy_bitrate_kbps"}`` of this process's counts.

        ``usage``: fraction of entries chosen at least once; ``entropy_bits``: entropy of the
        code distribution (log2(bins) when uniform). ``bitrate_kbps``: bits of the codes
        (n_q * log2(bins) per frame) per second of audio; ``entropy_bitrate_kbps``: the same
        with each codebook's entropy, the rate an ideal entropy coder would reach.
        """
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
