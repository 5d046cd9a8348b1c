"""Whole audio files for inference, decoded and resampled in DataLoader workers while the model encodes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import soundfile as sf
import torch
from torch.utils.data import DataLoader, Dataset

from utils.audio import AudioError, DatasetAudio, load_audio


def duration_order(paths: Sequence[str | Path | DatasetAudio], durations: Sequence[float | None] | None = None,
                   ) -> list[int]:  # fmt: skip
    """Indices of ``paths``, longest file first (``durations`` where known, else the headers;
    an unreadable header or a dataset row without a duration sorts last)."""

    def frames(path) -> float:
        if isinstance(path, DatasetAudio) or not Path(path).is_file():  # a FIFO or a device would block the header read
            return -1.0
        try:
            info = sf.info(str(path))
            return info.frames / max(info.samplerate, 1)
        except Exception:  # libsndfile raises several types; the read reports the reason
            return -1.0

    known = durations or [None] * len(paths)
    seconds = [d if d is not None else frames(p) for p, d in zip(paths, known)]
    return sorted(range(len(paths)), key=lambda i: -seconds[i])


class AudioFiles(Dataset):
    """Whole files resampled to ``sample_rate``: items ``(index, wav (T,) float32 or None, error or None)``."""

    def __init__(self, paths: Sequence[str | Path], sample_rate: int):
        self.paths = list(paths)
        self.sample_rate = sample_rate

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            wav, _ = load_audio(self.paths[index], self.sample_rate)
        except AudioError as exc:
            return index, None, str(exc)
        return index, torch.from_numpy(wav), None


def file_loader(dataset: AudioFiles, order: Sequence[int], workers: int, pin_memory: bool,
                ahead: int = 8) -> DataLoader:  # fmt: skip
    """The files of ``dataset`` in ``order`` (items uncollated), read by ``workers`` processes (0: in this one)
    at least ``ahead`` files ahead of the consumer (two batches keep the GPU fed)."""
    prefetch = max(2, -(-ahead // workers)) if workers > 0 else None
    return DataLoader(dataset, batch_size=None, sampler=list(order), num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=prefetch, persistent_workers=False)  # fmt: skip
