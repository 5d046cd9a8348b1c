"""Validation: mel and STFT distances and the semantic loss on fixed crops, audio and spectrograms to tensorboard."""

from __future__ import annotations

from typing import Any

import torch

from utils import distributed as du


@torch.no_grad()
def validate(state: Any, loader, logger: Any, log_originals: bool) -> dict[str, float]:
    """Mel and STFT distances (and the semantic loss) on fixed validation crops at the top bandwidth.

    Every rank evaluates its shard; sums are all-reduced. Rank 0 logs audio and mel
    images of its first ``num_plots`` clips. With no usable clip there are no distances: only
    ``valid/clips`` (0) is returned, never a distance of 0 that reads as a perfect model.
    """
    cfg, codec = state.cfg, state.codec
    codec.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=state.device)
    plotted = 0
    rate = codec.sample_rate
    try:
        for batch in loader:
            ok = batch["ok"]
            if not bool(ok.any()):
                continue
            wav = batch["wav"][ok].to(state.device)
            with state.autocast():
                out = codec(wav, codec.target_bandwidths[-1])
            n = min(wav.shape[-1], out.audio.shape[-1])
            real, fake = wav[..., :n], out.audio[..., :n].float()
            b = real.shape[0]
            for i in range(b):
                sums[0] += float(state.losses.mel(fake[i : i + 1], real[i : i + 1]))
                sums[1] += float(state.losses.full_stft(fake[i : i + 1], real[i : i + 1]))
            sums[2] += float(out.semantic_loss) * b
            sums[3] += b
            if logger.writer is not None:
                for i in range(min(b, cfg.num_plots - plotted)):
                    if log_originals:
                        logger.clip(f"valid/clip{plotted}", "original", real[i, 0].cpu().numpy(), state.step, rate)
                    logger.clip(f"valid/clip{plotted}", "reconstruction", fake[i, 0].cpu().numpy(), state.step, rate)
                    plotted += 1
    finally:
        codec.train()
    du.all_reduce(sums)
    count = float(sums[3])
    if count == 0:
        return {"valid/clips": 0.0}
    return {
        "valid/mel_distance": float(sums[0]) / count,
        "valid/stft_distance": float(sums[1]) / count,
        "valid/semantic_loss": float(sums[2]) / count,
        "valid/clips": float(sums[3]),
    }
