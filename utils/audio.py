"""Audio I/O with soundfile and resampling with soxr (no torchaudio)."""

import errno
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from utils.budget import MAX_ELEMENTS
from utils.files import missing


class AudioError(ValueError):
    """An audio file that cannot be used: unreadable, empty or non-finite."""


def audio_extensions() -> set[str]:
    """Lower-case file extensions (with dot) that libsndfile can read."""
    return {"." + ext.lower() for ext in sf.available_formats()} | {".oga", ".opus", ".aif", ".aiff"}


@dataclass(frozen=True)
class DatasetAudio:
    """Row ``row`` of the ``audio`` column of a ``save_to_disk`` directory or parquet file; ``name`` for messages."""

    dataset: str
    row: int
    name: str

    def __str__(self) -> str:
        return f"{self.dataset}#{self.name}"


_DATASETS: dict[str, object] = {}  # opened once per process (memory-mapped Arrow)


def open_audio_dataset(path: str | Path):
    """The dataset at ``path`` with its ``audio`` column undecoded (``{"bytes", "path"}``), opened once per process."""
    try:
        import datasets  # optional heavy dependency: only for dataset inputs
    except ImportError:
        needs = "the datasets package (pip install datasets)"
        raise AudioError(f"{path}: reading a Hugging Face dataset needs {needs}") from None

    key = str(path)
    if key not in _DATASETS:
        local = Path(path).is_dir()  # a save_to_disk directory, else a parquet file
        ds = datasets.load_from_disk(key) if local else datasets.load_dataset("parquet", data_files=key, split="train")
        if "audio" not in ds.column_names:
            raise AudioError(f"{path}: no 'audio' column (columns: {', '.join(ds.column_names)})")
        if isinstance(ds.features["audio"], datasets.Audio):  # else a plain {array, sampling_rate} struct
            ds = ds.cast_column("audio", datasets.Audio(decode=False))
        _DATASETS[key] = ds
    return _DATASETS[key]


def _read_dataset_row(ref: DatasetAudio) -> tuple[np.ndarray, int]:
    cell = open_audio_dataset(ref.dataset)[ref.row]["audio"]
    if not isinstance(cell, dict):
        raise AudioError(f"{ref}: the audio cell is not a mapping")
    if cell.get("array") is not None and cell.get("sampling_rate"):  # decoded samples: (T,) or (T, C)
        rate = cell["sampling_rate"]  # checked in load_audio: a negative rate is this file's failure, not the run's
        wav = np.asarray(cell["array"], dtype=np.float32)
        return wav.reshape(len(wav), -1), int(rate) if isinstance(rate, float) and rate.is_integer() else rate
    if cell.get("bytes") or (cell.get("path") and Path(cell["path"]).is_file()):
        data = io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"]
        return sf.read(data, dtype="float32", always_2d=True)
    raise AudioError(f"{ref}: the audio cell holds neither bytes nor a local file")


def load_audio(path: str | Path | DatasetAudio, sample_rate: int | None = None) -> tuple[np.ndarray, int]:
    """``(wav (T,) mono float32, rate)`` of a file or dataset row, resampled to ``sample_rate`` if given;
    AudioError in one line for missing, unreadable, empty or non-finite audio."""
    if not isinstance(path, DatasetAudio):
        path = Path(path)
        if not path.exists():
            raise AudioError(missing(path))
        if path.is_dir():
            raise AudioError(f"{path}: is a directory, not an audio file")
        if not path.is_file():  # a FIFO or a device: opening it could block forever
            raise AudioError(f"{path}: not a regular file (a FIFO, socket or device); skipped")
    try:
        if isinstance(path, DatasetAudio):
            wav, rate = _read_dataset_row(path)
        else:
            wav, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except AudioError:
        raise
    except Exception as exc:  # libsndfile raises several types; all mean "unreadable"
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise AudioError(f"{path}: cannot read audio ({reason})") from None
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise AudioError(f"{path}: sample rate must be a positive integer, got {rate!r}")
    if wav.shape[0] == 0:
        raise AudioError(f"{path}: empty audio (0 samples)")
    wav = wav.mean(axis=1) if wav.shape[1] > 1 else wav[:, 0]
    if not np.isfinite(wav).all():
        raise AudioError(f"{path}: audio contains NaN or Inf samples")
    if sample_rate is not None and rate != sample_rate:
        try:
            wav = resample(wav, rate, sample_rate)
        except AudioError as exc:
            raise AudioError(f"{path}: {exc}") from None
        rate = sample_rate
    return np.ascontiguousarray(wav, dtype=np.float32), rate


def resample(wav: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """(T,) audio resampled by soxr's HQ filter; AudioError over the size bound (a header declaring 1 Hz)."""
    if orig_rate == new_rate:
        return wav
    samples = len(wav) * new_rate / orig_rate  # before soxr allocates it
    if not samples <= MAX_ELEMENTS:  # NaN too
        raise AudioError(f"{len(wav)} samples at {orig_rate} Hz resample to {samples:.3g} samples at {new_rate} Hz, "
                         f"over the bound of {MAX_ELEMENTS:.3g} (is the sample rate right?)")  # fmt: skip
    return soxr.resample(wav.astype(np.float32, copy=False), orig_rate, new_rate, quality="HQ").astype(np.float32)


def sinc_resample_kernel(orig: int, new: int, lowpass_filter_width: int = 6, rolloff: float = 0.99) -> tuple:
    """torchaudio ``Resample``'s ``sinc_interp_hann`` kernel for gcd-reduced rates ``orig -> new``, from its documented
    algorithm: ``(kernel (new, 2 * width + orig) float64, row j the taps of output phase j; width, context a side)``."""
    base = min(orig, new) * rolloff  # the lowpass cutoff, below both Nyquists (anti-aliasing)
    width = math.ceil(lowpass_filter_width * orig / base)
    t = (np.arange(0, -new, -1)[:, None] / new + np.arange(-width, width + orig)[None] / orig) * base
    t = np.clip(t, -lowpass_filter_width, lowpass_filter_width)
    window = np.cos(t * np.pi / lowpass_filter_width / 2) ** 2  # Hann, evaluated where the taps fall
    return np.sinc(t) * window * (base / orig), width  # np.sinc(t): sin(pi t) / (pi t), 1 at 0


def sinc_resample(wav: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """(T,) audio -> (ceil(T * new_rate / orig_rate),) float64, as ``torchaudio.transforms.Resample`` does: YuE's
    post-processing resamples so, and soxr's filter differs from it by ~10% above 6 kHz."""
    gcd = math.gcd(int(orig_rate), int(new_rate))
    orig, new = int(orig_rate) // gcd, int(new_rate) // gcd
    wav = np.asarray(wav, dtype=np.float64)
    if orig == new:
        return wav.copy()
    kernel, width = sinc_resample_kernel(orig, new)
    # conv1d with stride orig: frame n holds the `new` outputs whose taps start at input n * orig - width
    frames = np.lib.stride_tricks.sliding_window_view(np.pad(wav, (width, width + orig)), kernel.shape[1])[::orig]
    chunk = 1 << 13  # frames at a time: a long song never holds all (frames, taps) copies at once
    out = np.concatenate([frames[i : i + chunk] @ kernel.T for i in range(0, len(frames), chunk)]).reshape(-1)
    return out[: math.ceil(new * len(wav) / orig)]


def prepare_output(wav: np.ndarray, rescale: bool = False, limit: float = 0.99) -> np.ndarray:
    """Clamp to +-``limit`` or, with ``rescale``, scale the peak down to ``limit`` (as the original)."""
    wav = np.nan_to_num(wav.astype(np.float32, copy=False))
    if rescale:
        peak = float(np.abs(wav).max()) if wav.size else 0.0
        return wav * min(limit / peak, 1.0) if peak > 0 else wav
    return np.clip(wav, -limit, limit)


def fit_length(wav: np.ndarray, samples: int) -> np.ndarray:
    """(T,) audio cut or zero-padded at the end to ``samples`` (the decoder emits whole frames)."""
    return wav[:samples] if len(wav) >= samples else np.pad(wav, (0, samples - len(wav)))


OUTPUT_FORMATS = {".wav": "WAV", ".flac": "FLAC"}  # what the tools write, by the output's extension


def save_audio(path: str | Path, wav: np.ndarray, sample_rate: int, rescale: bool = False, format: str = "WAV") -> None:
    """Write (T,) audio as 16-bit PCM ``format`` (``WAV``, ``FLAC``), clamped or rescaled like the original;
    OSError for any failure (libsndfile's too: one error type for every write)."""
    try:
        sf.write(str(path), prepare_output(wav, rescale), sample_rate, subtype="PCM_16", format=format)
    except sf.SoundFileError as exc:
        raise OSError(errno.EIO, f"libsndfile: {exc}", str(path)) from None
