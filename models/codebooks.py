"""Codebooks for a codec that was never trained, matched to the latents of real audio: random codebooks
use a handful of codes, and benchmarks and tests need most entries used, as a trained model's are."""

from collections.abc import Sequence

import torch

from .xcodec import XCodec


@torch.no_grad()
def init_codebooks(model: XCodec, clips: Sequence[torch.Tensor], method: str = "kmeans") -> XCodec:
    """Set every quantizer stage's codebook from the latents of ``clips``; returns ``model`` (its mode kept).

    Args:
        clips: (T,) audio tensors at the model's rate, scaled by ``audio_norm_scale`` (k-means needs 10x more
            frames than ``bins``, or later stages collapse onto a few codes).
        method: ``"kmeans"`` (the quantizer's own initialisation: realistic, seconds on a full-size model) or
            ``"gaussian"`` (each stage drawn from a Gaussian matched to its residual: fast, global generator).
    """
    device = model.device
    parts = []
    for n in dict.fromkeys(c.numel() for c in clips):  # clips of one length in batches (10x faster than one by one)
        same = [c.reshape(1, -1) for c in clips if c.numel() == n]
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
