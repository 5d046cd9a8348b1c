"""How XCodec's passes run: which items of a batch run together, and which kernels run them."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from .precision import DTYPES, autocast


def fast_cpu(device: torch.device) -> bool:
    """Inference on CPU without autograd: the cache-blocked runner (modules/tiled.py) applies."""
    return device.type == "cpu" and not torch.is_grad_enabled()


def item_groups(sizes: torch.Tensor, device: torch.device, precision: str) -> list[list[int]] | None:
    """How items of ``sizes`` run: ``None``, as one padded (masked) pass, or in groups that each run unpadded. On CPU
    each item runs alone: a padded batch is slower per sample there (FLOP-bound; larger activations thrash caches).
    In exact mode elsewhere, items of equal size run together: the masks and the kernels cuDNN and SDPA pick for
    other shapes could change an item's last bits, and a code."""
    if fast_cpu(device):
        return [[i] for i in range(len(sizes))]
    if precision == "fp32" and bool((sizes != sizes[0]).any()):
        return [torch.nonzero(sizes == n).flatten().tolist() for n in dict.fromkeys(sizes.tolist())]
    return None


def pad_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """(C, N_i) tensors zero-padded at the end into one (B, C, max N_i) batch."""
    return pad_sequence([r.T for r in rows], batch_first=True).transpose(1, 2)


def batched(items: list[torch.Tensor], run: Callable, device: torch.device, precision: str) -> list[torch.Tensor]:
    """``run(batch, sizes or None)`` on zero-padded (B, C, N) batches of (C, N_i) ``items``, grouped as
    :func:`item_groups` says; one row of the results per item, in order (padding frames included)."""
    out = {}
    sizes = [x.shape[-1] for x in items]
    groups = item_groups(torch.tensor(sizes), device, precision) if items else []
    for idx in [list(range(len(items)))] if groups is None else groups:
        part = [sizes[i] for i in idx]
        out.update(zip(idx, run(pad_rows([items[i] for i in idx]), torch.tensor(part) if len(set(part)) > 1 else None)))
    return [out[i] for i in range(len(items))]


def run_acoustic(model: nn.Module, which: str, x: torch.Tensor, lengths: torch.Tensor | None, precision: str | None):
    """The acoustic ``"encoder"`` or ``"decoder"`` of ``model``: cache-blocked channels-last on CPU
    without autograd (fp32 or bf16), else the eager module under autocast (``None``: the caller's)."""
    module = model.encoder if which == "encoder" else model.decoder_2
    if fast_cpu(x.device) and precision is not None:
        return model._tiled.run(module.block if which == "encoder" else module.model, x, lengths, DTYPES[precision])
    with autocast(x.device, precision):
        return module(x, lengths).float()
