"""Training and validation batches: the loaders, and screening out unusable clips on every rank alike."""

from __future__ import annotations

from typing import Any

import torch

from data import AudioSegmentDataset, DataError, build_loader, list_audio_files
from utils import distributed as du

from .config import TrainConfig


def screen_batch(state: Any, batch: dict, logger: Any) -> torch.Tensor | None:
    """Drop unusable clips from a batch of the script's ``State``; returns the (B', 1, T) good audio or None to skip.

    Each bad file is logged once and counted. When more than ``max_bad_fraction`` of the
    batch (over all ranks) is bad, the run stops naming the files: that is a broken
    data list, not a few corrupt clips. Decisions are identical on every rank.
    """
    ok = batch["ok"]
    n_bad, n = int((~ok).sum()), ok.numel()
    counts = torch.tensor([n_bad, n, int(n_bad == n)], dtype=torch.float64, device=state.device)
    du.all_reduce(counts)
    bad_total, total, empty_ranks = (int(x) for x in counts.tolist())
    if bad_total:
        local = [(p, e) for p, e, good in zip(batch["path"], batch["error"], ok.tolist()) if not good]
        reports = [item for rank_items in du.gather_objects(local) for item in rank_items]
        for path, error in reports:
            if path not in state.bad_files:
                state.bad_files[path] = error
                logger.warn(f"skipping unusable clip: {error}")
        if bad_total / total > state.cfg.max_bad_fraction:
            listed = "\n  ".join(e for _, e in reports[:20])
            raise DataError(
                f"{bad_total} of {total} clips in the batch at step {state.step + 1} cannot be used "
                f"(more than max_bad_fraction={state.cfg.max_bad_fraction}); check the data list:\n  {listed}"
            )
    if empty_ranks:
        state.skipped_batches += 1
        return None
    wav = batch["wav"][ok] if n_bad else batch["wav"]
    return wav.to(state.device, non_blocking=True)


def make_loaders(cfg: TrainConfig, sample_rate: int, device: torch.device):
    train_files = list_audio_files(cfg.training_file)
    train_ds = AudioSegmentDataset(train_files, cfg.segment_size, sample_rate, cfg.audio_norm_scale, random_crop=True, seed=cfg.seed)
    pin = device.type == "cuda"
    train_loader, train_sampler = build_loader(
        train_ds, cfg.batch_size, cfg.num_workers, du.rank(), du.world_size(), shuffle=True, seed=cfg.seed, drop_last=True, pin_memory=pin
    )
    valid = None
    if cfg.validation_file:
        files = list_audio_files(cfg.validation_file)
        if cfg.validation_max_clips:
            files = files[: cfg.validation_max_clips]
        valid_ds = AudioSegmentDataset(files, cfg.segment_size, sample_rate, cfg.audio_norm_scale, random_crop=False, seed=cfg.seed)
        valid = build_loader(valid_ds, cfg.batch_size, min(cfg.num_workers, 2), du.rank(), du.world_size(), shuffle=False, seed=cfg.seed, drop_last=False, pin_memory=pin)[0]
    return train_loader, train_sampler, valid
