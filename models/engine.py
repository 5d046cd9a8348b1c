"""How XCodec's passes run: which items of a batch run together, and which kernels run them."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .precision import DTYPES, autocast


def fast_cpu(device: torch.device) -> bool:
    """Inference on CPU without autograd: the cache-blocked runner (modules/tiled.py) applies."""
    return device.type == "cpu" and not torch.is_grad_enabled()


def item_groups(sizes: torch.Tensor, device: torch.device, precision: str) -> list[list[int]] | None:
    """How items of ``sizes`` run: ``None``, as one padded (masked) pass, or in groups that each
    run unpadded. On CPU each item runs alone: a padded batch is slower per sample there
    (FLOP-bound work; 8x larger activations thrash caches). In exact mode elsewhere, items of
    equal size run together: the masks and the kernels cuDNN and SDPA pick for other shapes
    could change an item's last bits, and a code.
    """
    if fast_cpu(device):
        return [[i] for i in range(len(sizes))]
    if precision == "fp32" and bool((sizes != sizes[0]).any()):
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(sizes.tolist()):
            groups.setdefault(n, []).append(i)
        return list(groups.values())
    return None


def run_grouped(fn: Callable, x: torch.Tensor, sizes: torch.Tensor, precision: str) -> torch.Tensor:
    """``fn(x, sizes or None)`` over a zero-padded (B, C, N) batch whose items have ``sizes``
    valid steps, run as :func:`item_groups` says; results zero-padded into one batch."""
    groups = item_groups(sizes, x.device, precision) if x.shape[0] > 1 else None
    if groups is None:
        return fn(x, None if bool((sizes == x.shape[-1]).all()) else sizes)
    parts = [(idx, fn(x[idx, :, : int(sizes[idx[0]])], None)) for idx in groups]
    out = parts[0][1].new_zeros(x.shape[0], parts[0][1].shape[1], max(p.shape[-1] for _, p in parts))
    for idx, part in parts:
        out[idx, :, : part.shape[-1]] = part
    return out


def run_acoustic(model: nn.Module, which: str, x: torch.Tensor, lengths: torch.Tensor | None, precision: str | None):
    """The acoustic ``"encoder"`` or ``"decoder"`` of ``model``: cache-blocked channels-last on CPU
    without autograd (fp32 or bf16), else the eager module under autocast (``None``: the caller's)."""
    module = model.encoder if which == "encoder" else model.decoder_2
    if fast_cpu(x.device) and precision is not None:
        return model._tiled.run(module.block if which == "encoder" else module.model, x, lengths, DTYPES[precision])
    with autocast(x.device, precision):
        return module(x, lengths).float()
