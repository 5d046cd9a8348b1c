"""Signal metrics for codec evaluation (PESQ-WB, STOI, mel and STFT distances, SI-SDR) and optional
model-based ones (``ModelMetrics``); the estimate is scored against the whole reference (docs/evaluation.md).
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import multiprocessing
import os
import re
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import torch
from transformers import AutoFeatureExtractor, AutoModelForAudioXVector, pipeline

from utils.audio import fit_length, resample

from .spectral import MultiResolutionSTFTLoss, mel_spectrogram


def _optional(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# An extra (`pip install -e .[eval]`): pesq ships no wheel and needs a C compiler; `pip install -e .` must work
EVAL_PACKAGES = {name: _optional(name) for name in ("pesq", "pystoi", "jiwer")}
SIGNAL_METRICS = ("pesq_wb", "stoi", "mel_distance", "stft_distance", "si_sdr")


def missing_packages() -> str | None:
    """The one-line error naming the evaluation packages that cannot be imported here, if any."""
    missing = [name for name, module in EVAL_PACKAGES.items() if module is None]
    verb = "is" if len(missing) == 1 else "are"
    return f"{' and '.join(missing)} {verb} not installed: pip install -e .[eval]" if missing else None


def align(reference: np.ndarray, estimate: np.ndarray, max_lag: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Both signals shifted by the lag in ``[-max_lag, max_lag]`` (positive: the estimate is late) that maximises
    the magnitude of the cross-correlation (a codec may flip the polarity), trimmed to the shorter; and the lag."""
    max_lag = min(max_lag, len(reference) - 1, len(estimate) - 1)  # longer lags would wrap around
    lag = 0
    if max_lag > 0:
        n = 1 << (len(reference) + len(estimate)).bit_length()
        corr = np.fft.irfft(np.fft.rfft(estimate, n) * np.conj(np.fft.rfft(reference, n)), n)
        lags = np.concatenate([np.arange(0, max_lag + 1), np.arange(-max_lag, 0)])
        lag = int(lags[int(np.argmax(np.abs(np.concatenate([corr[: max_lag + 1], corr[n - max_lag :]]))))])
    reference, estimate = reference[max(0, -lag) :], estimate[max(0, lag) :]
    n = min(len(reference), len(estimate))
    return reference[:n], estimate[:n], lag


def si_sdr(reference: np.ndarray, estimate: np.ndarray, eps: float = 1e-8) -> float:
    """Scale-invariant signal-to-distortion ratio in dB (Le Roux et al. 2019), zero-mean."""
    ref, est = (x.astype(np.float64) - x.mean() for x in (reference, estimate))
    target = np.dot(est, ref) / (np.dot(ref, ref) + eps) * ref
    return float(10 * np.log10((np.dot(target, target) + eps) / (np.dot(est - target, est - target) + eps)))


def mel_distance(reference: np.ndarray, estimate: np.ndarray, sample_rate: int = 16000) -> float:
    """Mean absolute difference of the natural-log mel spectrograms (window and hop scaled from 16 kHz)."""
    win, hop = int(round(800 * sample_rate / 16000)), int(round(160 * sample_rate / 16000))
    params = {"sampling_rate": sample_rate, "n_fft": 1 << (win - 1).bit_length(), "hop_size": hop, "win_size": win}
    ref, est = (mel_spectrogram(_tensor(x), **params) for x in (reference, estimate))
    return float((ref - est).abs().mean())


def _tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]


@functools.cache
def _stft_loss() -> MultiResolutionSTFTLoss:
    return MultiResolutionSTFTLoss()


PESQ_CRASH_HOOK = "XCODEC_TEST_PESQ_CRASH"  # test hook: the worker dies as the pesq library does when it segfaults
_PESQ_POOL: ProcessPoolExecutor | None = None


def _pesq_in_worker(reference: np.ndarray, estimate: np.ndarray, crash: bool) -> float:
    if crash:
        os.kill(os.getpid(), signal.SIGSEGV)
    return float(EVAL_PACKAGES["pesq"].pesq(16000, reference, estimate, "wb"))


def pesq_wb(reference: np.ndarray, estimate: np.ndarray, sample_rate: int = 16000) -> float:
    """Wideband PESQ at 16 kHz. The ``pesq`` C library segfaults on some inputs (a 2-minute tone), so it runs in
    a spawned worker process: a crash raises ``RuntimeError`` and a fresh worker serves the next call."""
    global _PESQ_POOL
    reference, estimate = resample(reference, sample_rate, 16000), resample(estimate, sample_rate, 16000)
    if _PESQ_POOL is None:
        _PESQ_POOL = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    try:
        return _PESQ_POOL.submit(_pesq_in_worker, reference, estimate, bool(os.environ.get(PESQ_CRASH_HOOK))).result()
    except BrokenProcessPool:
        _PESQ_POOL.shutdown(wait=False)
        _PESQ_POOL = None
        raise RuntimeError("the pesq library crashed on this input (its worker process died)") from None


def signal_metrics(reference: np.ndarray, estimate: np.ndarray, sample_rate: int) -> tuple[dict[str, float], list[str]]:
    """Every signal metric of ``estimate`` against the whole ``reference`` (the estimate cut or padded with
    silence to its length). Returns ``(metrics, notes)``: a metric that cannot be computed is NaN, with a note."""
    reference = np.asarray(reference)
    estimate = fit_length(np.asarray(estimate), len(reference))
    functions = {
        "pesq_wb": lambda: pesq_wb(reference, estimate, sample_rate),
        "stoi": lambda: float(EVAL_PACKAGES["pystoi"].stoi(reference, estimate, sample_rate, extended=False)),
        "mel_distance": lambda: mel_distance(reference, estimate, sample_rate),
        "stft_distance": lambda: float(_stft_loss()(_tensor(estimate), _tensor(reference))),
        "si_sdr": lambda: si_sdr(reference, estimate),
    }
    out, notes = {}, []
    for name, fn in functions.items():
        try:
            with torch.no_grad():
                out[name] = fn()
        except Exception as exc:  # pesq raises its own error types (no utterances, too short)
            out[name] = math.nan
            notes.append(f"{name}: not computed ({_reason(exc, 120)})")
    return out, notes


def _reason(exc: Exception, width: int) -> str:
    """``Type: first line`` of an exception, cut to ``width``."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__}: {reason[:width]}"


def mean_metrics(rows: list[dict], keys: list[str]) -> dict[str, float | None]:
    """Mean of each key over the rows where it is a finite number (``None`` when none is)."""
    finite = {k: [r[k] for r in rows if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])] for k in keys}
    return {k: float(np.mean(values)) if values else None for k, values in finite.items()}


# ---------------------------------------------------------------------------- model-based
class TranscriptError(ValueError):
    """A transcripts file that cannot be used; the message names it."""


def read_transcripts(path: Path | None) -> dict[str, str]:
    """Reference transcripts for WER: a JSON object ``{path: text}`` or TSV lines ``path<TAB>text``; a file that is
    unreadable, not UTF-8 or malformed raises :class:`TranscriptError` (one line)."""
    if path is None:
        return {}
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TranscriptError(f"{path}: transcripts are not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise TranscriptError(f"{path}: cannot read transcripts ({exc.strerror})") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TranscriptError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise TranscriptError(f"{path}: expected a JSON object {{path: text}}")
        return {str(k): str(v) for k, v in data.items()}
    pairs = (line.split("\t", 1) for line in text.splitlines() if "\t" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word error rate (jiwer) of the hypothesis, both lower-cased words without punctuation."""
    ref, hyp = (re.sub(r"[^\w\s']", " ", text.lower()).split() for text in (reference, hypothesis))
    if not ref:  # jiwer refuses an empty reference
        return 0.0 if not hyp else 1.0
    return float(EVAL_PACKAGES["jiwer"].wer(" ".join(ref), " ".join(hyp)))


class ModelMetrics:
    """Optional metrics computed with models the user has locally (nothing is downloaded), at 16 kHz; a model that
    cannot be loaded is skipped and :attr:`notes` says why (one line each).

    Args:
        speaker_model: a transformers x-vector directory (e.g. ``microsoft/wavlm-base-plus-sv``):
            ``speaker_similarity``, cosine of the two embeddings.
        asr_model: a transformers ASR directory (Whisper, wav2vec 2.0 CTC): ``wer`` of the estimate's
            transcript against ``transcripts[path]`` (``{relative path: text}``), else the reference's transcript.
        utmos: a local clone of tarepan/SpeechMOS (``utmos22_strong`` weights in the torch hub cache).
    """

    def __init__(self, speaker_model: str | Path | None = None, asr_model: str | Path | None = None,
                 utmos: str | Path | None = None, transcripts: dict[str, str] | None = None, device: str = "cpu"):  # fmt: skip
        self.device, self.notes, self.transcripts = device, [], transcripts or {}
        self._speaker = self._load("speaker_similarity", speaker_model, lambda path: (
            AutoFeatureExtractor.from_pretrained(path, local_files_only=True),
            AutoModelForAudioXVector.from_pretrained(path, local_files_only=True).eval().to(device)))  # fmt: skip
        self._asr = self._load("wer", asr_model, lambda path: pipeline(
            "automatic-speech-recognition", model=path, device=torch.device(device)))  # fmt: skip
        self._utmos = self._load("utmos", utmos, lambda path: torch.hub.load(
            path, "utmos22_strong", source="local", trust_repo=True).eval().to(device))  # fmt: skip
        self._ref_text: dict[str, str] = {}
        loaded = (("speaker_similarity", self._speaker), ("wer", self._asr), ("utmos", self._utmos))
        self.names = [name for name, model in loaded if model is not None]  # the metrics that will be computed

    def _load(self, name: str, path, loader):
        if path is not None and not Path(path).exists():
            self.notes.append(f"{name}: skipped: {path} does not exist (the model must be available locally)")
        elif path is not None:
            try:
                return loader(str(path))
            except Exception as exc:
                self.notes.append(f"{name}: skipped: could not load {path} ({_reason(exc, 160)})")
        return None

    def _embed(self, wav: np.ndarray) -> torch.Tensor:
        extractor, model = self._speaker
        inputs = extractor(wav, sampling_rate=16000, return_tensors="pt").to(self.device)
        return torch.nn.functional.normalize(model(**inputs).embeddings, dim=-1)[0]

    def _transcribe(self, wav: np.ndarray) -> str:
        return self._asr({"raw": wav.astype(np.float32), "sampling_rate": 16000})["text"]

    @torch.no_grad()
    def __call__(self, key: str, reference: np.ndarray, estimate: np.ndarray, sample_rate: int) -> dict[str, float]:
        """Metrics of ``estimate`` against ``reference``; ``key`` names the file (transcripts, cached texts)."""
        if not self.names:
            return {}
        ref, est = (resample(np.asarray(x, dtype=np.float32), sample_rate, 16000) for x in (reference, estimate))
        out = {}
        if self._speaker is not None:
            out["speaker_similarity"] = float(self._embed(ref) @ self._embed(est))
        if self._asr is not None:
            if key not in self._ref_text:
                self._ref_text[key] = self.transcripts.get(key) or self._transcribe(ref)
            out["wer"] = word_error_rate(self._ref_text[key], self._transcribe(est))
        if self._utmos is not None:
            out["utmos"] = float(self._utmos(torch.from_numpy(est)[None].to(self.device), 16000).reshape(-1)[0])
        return out


def measure(reference: np.ndarray, estimate: np.ndarray, rate: int, extra: ModelMetrics, key: str,
            max_delay_ms: float = 0.0) -> tuple[dict, list[str]]:  # fmt: skip
    """Signal and ``extra``'s model metrics of one estimate (``key``: its name), after aligning a delay of up to
    ``max_delay_ms`` (reported as ``delay_ms``). Returns ``(metrics, notes)`` as :func:`signal_metrics`."""
    delay = {}
    if max_delay_ms > 0:
        reference, estimate, lag = align(reference, estimate, int(round(max_delay_ms * rate / 1000)))
        delay = {"delay_ms": 1000 * lag / rate}
    metrics, notes = signal_metrics(reference, estimate, rate)
    return {**metrics, **extra(key, reference, estimate, rate), **delay}, notes
