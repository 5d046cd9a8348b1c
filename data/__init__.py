"""Training data: audio file lists, fixed-length crops, resumable distributed sampling."""

from .dataset import (
    AudioSegmentDataset,
    DataError,
    ResumableSampler,
    batches_per_epoch,
    build_loader,
    collate,
    list_audio_files,
)

__all__ = [
    "AudioSegmentDataset",
    "DataError",
    "ResumableSampler",
    "batches_per_epoch",
    "build_loader",
    "collate",
    "list_audio_files",
]
