"""DistributedDataParallel for the codec (frozen teacher left out) and the discriminators."""

from __future__ import annotations

import inspect
from typing import Any

from torch.nn.parallel import DistributedDataParallel as DDP

from utils import distributed as du

from .state import LossPlan

# Buffers are synced once at start-up, not before every forward: the EMA codebooks keep
# themselves in sync (all-reduced statistics, broadcast re-inits), every other buffer is a constant.
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}  # torch >= 2.12
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    else {"broadcast_buffers": False}
)


def wrap_ddp(state: Any, first: LossPlan) -> None:
    """Wrap the ``State``'s codec and discriminators in DDP (no-op without a process group).

    ``first``: the plan of the run's first step, its sparsest (terms only switch on later):
    when it leaves codec parameters without a gradient, DDP has to look for unused ones.
    The frozen teacher is in ``_ddp_params_and_buffers_to_ignore``: never broadcast nor all-reduced.
    """
    if not du.is_distributed():
        return
    codec = state.codec
    teacher = [*codec.semantic_model.named_parameters(), *codec.semantic_model.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(codec, [f"semantic_model.{n}" for n, _ in teacher])
    ids = [state.device.index] if state.device.type == "cuda" else None
    unused = not first.every_parameter
    state.codec_ddp = DDP(codec, device_ids=ids, find_unused_parameters=unused, **_NO_BUFFER_SYNC)
    state.disc_ddp = DDP(state.disc_ddp, device_ids=ids, **_NO_BUFFER_SYNC)


def unwrap_ddp(state: Any) -> None:
    """Point the ``State``'s ``codec_ddp`` / ``disc_ddp`` back at the plain modules, dropping the
    DDP wrappers: their reducers hold the process group, which can then be destroyed cleanly."""
    if isinstance(state.codec_ddp, DDP):
        state.codec_ddp = state.codec_ddp.module
    if isinstance(state.disc_ddp, DDP):
        state.disc_ddp = state.disc_ddp.module
