"""Audio segments for codec training: file lists, crops, bad-file reporting, resumable sampling."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from corpus.inputs import read_file_list, scan_directory
from utils.audio import audio_extensions, load_audio

# Items stacked into {"wav": (B, 1, T), "index": (B,), "ok": (B,) bool, "path": [str], "error": [str]}.
collate = default_collate


class DataError(RuntimeError):
    """Training data that cannot be used (an empty list, or batches that are mostly unreadable)."""


def list_audio_files(source: str | Path) -> list[str]:
    """Audio paths, in a deterministic order, from a text file with one path per line or a directory scanned
    recursively for what libsndfile reads; readability is checked when a clip is loaded."""
    source = Path(source)
    if source.is_dir():
        exts = audio_extensions()
        files = [str(p) for p in scan_directory(source, exts)]
        empty = f"no audio files found (looked for {', '.join(sorted(exts))})"
    elif source.is_file():
        files, empty = [str(p) for p in read_file_list(source)], "the file list is empty"
    else:
        files, empty = [], "no such file list or directory"
    if not files:
        raise DataError(f"{source}: {empty}")
    return files


class AudioSegmentDataset(Dataset):
    """``segment_size``-sample mono crops of audio files at ``sample_rate``, times ``audio_norm_scale`` (short
    clips zero-padded); random crops are seeded by ``(seed, epoch, index)`` (a resumed run sees the same ones), fixed
    ones centred. ``key``: an index or ``(index, epoch)``; items ``{"wav": (1, segment_size) float32, "index": int,
    "ok": bool, "path": str, "error": str}``: a clip that cannot be used never raises."""

    def __init__(self, files: list[str], segment_size: int, sample_rate: int, audio_norm_scale: float = 1.0,
                 random_crop: bool = True, seed: int = 0):  # fmt: skip
        self.files = list(files)
        self.segment_size, self.sample_rate, self.seed = int(segment_size), int(sample_rate), int(seed)
        self.audio_norm_scale = float(audio_norm_scale)
        self.random_crop = random_crop

    def __len__(self) -> int:
        return len(self.files)

    def crop_start(self, length: int, index: int, epoch: int) -> int:
        """First sample of the crop for a clip of ``length`` samples."""
        room = length - self.segment_size
        if room <= 0 or not self.random_crop:
            return max(room, 0) // 2
        return int(np.random.default_rng([self.seed, epoch, index]).integers(0, room + 1))

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, epoch = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), 0)
        path = self.files[index]
        out = np.zeros(self.segment_size, dtype=np.float32)
        try:
            wav, _ = load_audio(path, self.sample_rate)
            start = self.crop_start(wav.shape[0], index, epoch)
            seg = wav[start : start + self.segment_size] * self.audio_norm_scale
            out[: seg.shape[0]] = seg
            ok, error = True, ""
        except Exception as exc:  # any failure is one bad clip, never a crashed run
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            ok, error = False, (reason if path in reason else f"{path}: {reason}")[:300]
        return {"wav": torch.from_numpy(out)[None], "index": index, "ok": ok, "path": path, "error": error}


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` yielding ``(index, epoch)`` (crops are seeded by the epoch) that can start ``skip``
    samples into an epoch (``set_position``, resume) with the shard and order of an uninterrupted run."""

    skip = 0

    def set_position(self, epoch: int, skip: int = 0) -> None:
        self.set_epoch(epoch)
        self.skip = max(0, int(skip))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(i, self.epoch) for i in list(super().__iter__())[self.skip :]])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip)


def _worker_init(worker_id: int) -> None:
    # A SIGTERM or Ctrl-C reaches the whole process group: the main process finishes its step and saves.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Crops carry their own seeds; this only keeps numpy in workers distinct for anything else.
    np.random.seed(torch.utils.data.get_worker_info().seed % 2**32)


def build_loader(dataset: AudioSegmentDataset, batch_size: int, num_workers: int, rank: int, world_size: int,
                 shuffle: bool, seed: int, drop_last: bool, pin_memory: bool = False,
                 ) -> tuple[DataLoader, ResumableSampler]:  # fmt: skip
    """A DataLoader over this rank's shard: ``drop_last=True`` for training (DDP needs as many batches on
    every rank), ``False`` for validation (the last shard padded by repeating clips, as ``DistributedSampler`` does)."""
    if drop_last and len(dataset) < world_size:
        raise DataError(f"{len(dataset)} training clip(s) cannot be split over {world_size} processes")
    sampler = ResumableSampler(dataset, world_size, rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
    loader = DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate,
        pin_memory=pin_memory, worker_init_fn=_worker_init if num_workers > 0 else None,
        persistent_workers=False,  # fresh workers per epoch: a resumed epoch must not reuse a prefetching iterator
        # Its own generator: an epoch's iterator drawing from the global RNG would shift a resumed run's stream.
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    return loader, sampler

