"""Process-group helpers that fall back to a single process.

Every function here works with or without ``torch.distributed`` initialised, so the
same training and quantizer code runs under ``python`` and under ``torchrun``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    return rank() == 0


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op)
    return tensor


def broadcast_tensors(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Broadcast floating-point tensors in place from ``src`` to every rank."""
    if not is_distributed():
        return
    for tensor in tensors:
        if tensor.is_floating_point() or tensor.is_complex():
            dist.broadcast(tensor.data, src=src)


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (N_r, D) from every rank along dim 0; N_r may differ per rank."""
    if not is_distributed():
        return x
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes_int = [int(s.item()) for s in sizes]
    max_n = max(sizes_int)
    padded = torch.zeros(max_n, *x.shape[1:], device=x.device, dtype=x.dtype)
    padded[: x.shape[0]] = x
    gathered = [torch.zeros_like(padded) for _ in range(world_size())]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:s] for g, s in zip(gathered, sizes_int)], dim=0)


def broadcast_object(obj, src: int = 0):
    """Return rank ``src``'s ``obj`` on every rank (identity without a process group)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
