"""DistributedDataParallel for the codec (frozen teacher left out) and the discriminators."""

from __future__ import annotations

import inspect
from typing import Any

from torch.nn.parallel import DistributedDataParallel as DDP

from utils import distributed as du


def _no_buffer_sync() -> dict:
    """DDP kwargs that sync buffers once at start-up but not before every forward."""
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:  # torch >= 2.12
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def wrap_ddp(state: Any) -> None:
    """Wrap the ``State``'s codec and discriminators in DDP (no-op without a process group).

    The frozen teacher is listed in ``_ddp_params_and_buffers_to_ignore``: DDP neither
    broadcasts nor all-reduces it. Buffers are not re-broadcast every forward: the EMA
    codebooks keep themselves in sync (all-reduced statistics, broadcast re-inits) and
    every other buffer is a constant.
    """
    if not du.is_distributed():
        return
    codec = state.codec
    ignore = [f"semantic_model.{n}" for n, _ in codec.semantic_model.named_parameters()]
    ignore += [f"semantic_model.{n}" for n, _ in codec.semantic_model.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(codec, ignore)
    ids = [state.device.index] if state.device.type == "cuda" else None
    # A zero semantic weight leaves the semantic decoder out of the graph. The acoustic
    # decoder gets a gradient at every step only from a spectral term: the adversarial
    # terms alone start at discriminator_iter_start, and the steps before leave it out.
    w = state.weights
    spectral = any(w[k] > 0 for k in ("full_stft", "sub_stft", "mel"))
    adversarial = any(w[k] > 0 for k in ("adversarial", "feature_matching"))
    decoder_every_step = spectral or (adversarial and state.cfg.discriminator_iter_start == 0)
    unused = w["semantic"] == 0 or not decoder_every_step
    state.codec_ddp = DDP(codec, device_ids=ids, find_unused_parameters=unused, **_no_buffer_sync())
    state.disc_ddp = DDP(state.disc_ddp, device_ids=ids, **_no_buffer_sync())


def unwrap_ddp(state: Any) -> None:
    """Point the ``State``'s ``codec_ddp`` / ``disc_ddp`` back at the plain modules, dropping the
    DDP wrappers: their reducers hold the process group, which can then be destroyed cleanly."""
    if isinstance(state.codec_ddp, DDP):
        state.codec_ddp = state.codec_ddp.module
    if isinstance(state.disc_ddp, DDP):
        state.disc_ddp = state.disc_ddp.module
