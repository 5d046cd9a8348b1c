"""Audio data: training crops with resumable distributed sampling, whole files for inference."""

from .dataset import AudioSegmentDataset, DataError, ResumableSampler, build_loader, collate, list_audio_files
from .files import AudioFiles, duration_order, file_loader

__all__ = ["AudioFiles", "AudioSegmentDataset", "DataError", "ResumableSampler", "build_loader", "collate",
           "duration_order", "file_loader", "list_audio_files"]  # fmt: skip
