"""Codebooks for a codec that was never trained: matched to the latents of real audio.

Random weights with random codebooks use a handful of codes; benchmarks and tests need
codebooks that spread real audio over most entries, as a trained model's do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .xcodec import XCodec


@torch.no_grad()
def init_codebooks(model: XCodec, clips: Sequence[torch.Tensor], method: str = "kmeans") -> XCodec:
    """Set every quantizer stage's codebook from the latents of ``clips``; returns ``model``.

    Args:
        model: the codec (its mode is kept).
        clips: (T,) audio tensors at the model's rate, already scaled by ``audio_norm_scale``,
            on any device (moved to the model's). K-means needs many more frames than
            ``bins`` (10x or more), or the later stages' residuals collapse onto a few codes.
        method: ``"kmeans"``: the quantizer's own k-means initialisation (one training
            forward over the latents: realistic, seconds on a full-size model);
            ``"gaussian"``: each stage's entries drawn from a Gaussian matched to its
            residual (fast, most codes used; draws from torch's global generator).
    """
    device = model.device
    by_length: dict[int, list[torch.Tensor]] = {}
    for c in clips:  # clips of one length go through in batches (about 10x faster than one by one)
        by_length.setdefault(c.numel(), []).append(c.reshape(1, -1))
    parts = []
    for same in by_length.values():
        for i in range(0, len(same), 8):
            e = model.latents(torch.stack(same[i : i + 8]).to(device), None)[0]  # (b, D, F)
            parts.append(e.transpose(0, 1).reshape(e.shape[1], -1))
    latents = torch.cat(parts, dim=-1)[None].clone()
    quantizer, was_training = model.quantizer, model.quantizer.training
    if method == "kmeans":
        quantizer.train()
        quantizer(latents, None)
    elif method == "gaussian":
        residual = latents
        for layer in quantizer.vq.layers:
            flat = residual.transpose(1, 2).reshape(-1, residual.shape[1])
            layer.set_codebook(flat.mean(0) + torch.randn(layer.codebook.shape, device=device) * flat.std(0))
            residual = residual - layer.decode(layer.encode(residual))
    else:
        raise ValueError(f"method must be 'kmeans' or 'gaussian', got {method!r}")
    quantizer.train(was_training)
    return model
