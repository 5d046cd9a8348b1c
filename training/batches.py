"""Training and validation batches: the loaders, screening out unusable clips on every rank alike, validation."""

from __future__ import annotations

from typing import Any

import torch

from data import AudioSegmentDataset, DataError, build_loader, list_audio_files
from utils import distributed as du

from .config import TrainConfig


def make_loaders(cfg: TrainConfig, sample_rate: int, device: torch.device):
    """``(train_loader, train_sampler, valid_loader or None)`` over this rank's shards."""
    pin, rank, world = device.type == "cuda", du.rank(), du.world_size()
    crops = (cfg.segment_size, sample_rate, cfg.audio_norm_scale)
    train = AudioSegmentDataset(list_audio_files(cfg.training_file), *crops, random_crop=True, seed=cfg.seed)
    train_loader, train_sampler = build_loader(train, cfg.batch_size, cfg.num_workers, rank, world, shuffle=True,
                                               seed=cfg.seed, drop_last=True, pin_memory=pin)  # fmt: skip
    if not cfg.validation_file:
        return train_loader, train_sampler, None
    files = list_audio_files(cfg.validation_file)[: cfg.validation_max_clips or None]
    valid = AudioSegmentDataset(files, *crops, random_crop=False, seed=cfg.seed)
    valid_loader, _ = build_loader(valid, cfg.batch_size, min(cfg.num_workers, 2), rank, world, shuffle=False,
                                   seed=cfg.seed, drop_last=False, pin_memory=pin)  # fmt: skip
    return train_loader, train_sampler, valid_loader


def screen_batch(state: Any, batch: dict, logger: Any) -> torch.Tensor | None:
    """Drop unusable clips from a batch; returns the (B', 1, T) good audio or None to skip it. Each bad file
    is logged once and counted; more than ``max_bad_fraction`` bad over all ranks stops the run naming the files
    (a broken data list, not a few corrupt clips). Decisions are identical on every rank."""
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
            raise DataError(f"{bad_total} of {total} clips in the batch at step {state.step + 1} cannot be used (more "
                            f"than max_bad_fraction={state.cfg.max_bad_fraction}); check the data list:\n  {listed}")
    if empty_ranks:
        state.skipped_batches += 1
        return None
    wav = batch["wav"][ok] if n_bad else batch["wav"]
    return wav.to(state.device, non_blocking=True)


@torch.no_grad()
def validate(state: Any, loader, logger: Any) -> None:
    """Logs mel and STFT distances and the semantic loss on fixed validation crops at the top bandwidth, over
    every rank's shard, and audio and mel images of rank 0's first ``num_plots`` clips. With no usable clip,
    only ``valid/clips`` (0): never a distance of 0 that reads as a perfect model."""
    cfg, codec = state.cfg, state.codec
    codec.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=state.device)
    plotted = 0
    try:
        for batch in loader:
            ok = batch["ok"]
            if not bool(ok.any()):
                continue
            wav = batch["wav"][ok].to(state.device)
            with state.autocast():
                out = codec(wav, codec.target_bandwidths[-1])
            real, fake = wav, out.audio.float()  # forward returns the input's length
            b = real.shape[0]
            for i in range(b):
                sums[0] += float(state.losses.mel(fake[i : i + 1], real[i : i + 1]))
                sums[1] += float(state.losses.full_stft(fake[i : i + 1], real[i : i + 1]))
            sums[2:] += torch.tensor([float(out.semantic_loss) * b, b], dtype=torch.float64, device=sums.device)
            shown = {"reconstruction": fake} if state.originals_logged else {"original": real, "reconstruction": fake}
            for i in range(min(b, cfg.num_plots - plotted) if logger.writer is not None else 0):
                for name, audio in shown.items():
                    logger.clip(f"valid/clip{plotted}", name, audio[i, 0].cpu().numpy(), state.step, codec.sample_rate)
                plotted += 1
    finally:
        codec.train()
    state.originals_logged = True
    du.all_reduce(sums)
    mel, stft, semantic, count = sums.tolist()
    result = {"valid/clips": count}
    if count:
        result = {"valid/mel_distance": mel / count, "valid/stft_distance": stft / count,
                  "valid/semantic_loss": semantic / count, **result}  # fmt: skip
    logger.scalars(result, state.step)
    measured = ", ".join(f"{k.split('/')[1]} {v:.4g}" for k, v in result.items()) if count else "no usable clips"
    logger.info(f"validation at step {state.step}: {measured}")
