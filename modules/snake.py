"""The Snake activation's kernel without autograd, ``x + sin^2(alpha x) / alpha``: for the
eager :class:`modules.acoustic.Snake1d` (no grad) and the cache-blocked runner (:mod:`modules.tiled`)."""

from __future__ import annotations

import torch


def snake_reference(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``x + sin^2(alpha x) / alpha`` as DAC / transformers write it."""
    return x + (alpha + 1e-9).reciprocal() * torch.sin(alpha * x).pow(2)


def _snake_tile(x: torch.Tensor, alpha: torch.Tensor, recip: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    # The reference's ops in its order (mul and add commute bitwise), in place in ``out``.
    torch.mul(x, alpha, out=out)
    out.sin_()
    out.pow_(2)
    out.mul_(recip)
    out.add_(x)
    return out


def snake(x: torch.Tensor, alpha: torch.Tensor, out: torch.Tensor | None = None, tile: int = 1 << 18) -> torch.Tensor:
    """Snake without autograd, bitwise :func:`snake_reference` for float32, on (B, C, T) or channels-last
    (B, C, 1, T) ``x`` (``alpha``: (1, C, 1)) a cache-sized time slice at a time; lower precisions in float32,
    rounded once. ``out`` may be ``x``."""
    if x.dim() == 4:
        alpha = alpha.reshape(1, -1, 1, 1)
    alpha = alpha.to(device=x.device)
    if out is None:
        out = torch.empty_like(x)
    if x.device.type != "cpu":
        return out.copy_(snake_reference(x.float(), alpha.float()))
    alpha = alpha.float()
    recip = (alpha + 1e-9).reciprocal()
    step = max(256, tile // max(1, x.numel() // max(1, x.shape[-1])))  # ``tile`` elements per slice
    exact, buf = x.dtype == torch.float32, None
    for start in range(0, x.shape[-1], step):
        xs, os = x[..., start : start + step], out[..., start : start + step]
        if exact and os.data_ptr() != xs.data_ptr():
            _snake_tile(xs, alpha, recip, os)
            continue
        # In place (x is read after the output is written) or below float32: through a buffer.
        xs = xs.float()
        buf = torch.empty_like(xs) if buf is None or buf.shape != xs.shape else buf
        os.copy_(_snake_tile(xs, alpha, recip, buf))
    return out
