"""What every codec here shares (:class:`models.xcodec.XCodec`, :class:`models.xcodec2.XCodec2`): validated encode
and decode over zero-padded batches, each item run as :mod:`models.engine` groups it, through a subclass's
``_encode_pass(wav (B, 1, T), bandwidth, lengths, precision, norm_stats) -> (B, n_q, F)`` and
``_decode_pass(codes (B, n_q, F), frames, precision) -> (B, 1, F * hop)``."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .engine import batched, pad_rows
from .precision import check_precision, ieee_fp32


class CodesError(ValueError):
    """Codes that this model cannot decode (shape, dtype or range)."""


class Codec(nn.Module):
    """Attributes a subclass sets: ``sample_rate``, ``hop_length``, ``frame_rate``, ``n_q``, ``bins``,
    ``target_bandwidths``, ``audio_norm_scale`` (the pipelines' input gain), ``quantizer`` (with
    ``n_q_for_bandwidth``), ``checkpoint_id``; and ``num_frames(lengths)``, ``norm_stats(wav)``."""

    windowed_decode = True  # a local decoder: long codes decode in windows with context (models.pipeline)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_frames(self, lengths: torch.Tensor | int) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def _sizes(given, batch: int, total: int, what: str) -> torch.Tensor:
        """(B,) valid samples or frames per item of a padded batch, checked; ``None``: all ``total``."""
        if given is None:
            return torch.full((batch,), total, dtype=torch.long)
        given = torch.as_tensor(given).cpu()
        sizes = given.long()  # 16000.5 samples is refused below, not truncated
        if given.shape != (batch,) or bool((given != sizes).any() | (sizes > total).any() | (sizes < 1).any()):
            raise ValueError(f"{what} must be {batch} whole numbers in [1, {total}], got {given.tolist()}")
        return sizes

    def min_length(self) -> int:
        """Shortest input (samples) that yields one frame."""
        return next(n for n in itertools.count(1) if int(self.num_frames(n)) >= 1)

    @torch.inference_mode()
    def encode(self, wav: torch.Tensor, bandwidth: float | None = None,
               lengths: torch.Tensor | Sequence[int] | None = None, precision: str = "fp32",
               norm_stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
        """Encode audio to codes.

        Args:
            wav: (B, 1, T) float audio at ``sample_rate``, not rescaled here (see ``audio_norm_scale``).
            bandwidth: one of ``target_bandwidths`` (default: the largest).
            lengths: (B,) valid samples per item of a zero-padded batch: each item gets exactly the codes it gets
                alone, ``num_frames(lengths[i])`` frames; frames after those are padding.
            precision: ``"fp32"`` (exact: the codes of the eager float32 model) or ``"bf16"`` (fast mode:
                the encoders in bfloat16; codes agree with fp32 for most frames).
            norm_stats: a whole file's normalisation statistics (:meth:`norm_stats`), for its windows.

        Returns:
            (B, n_q, F) int64 codes, n_q = bandwidth / (log2(bins) * frame_rate / 1000).
        """
        if not isinstance(wav, torch.Tensor) or not wav.is_floating_point():
            raise ValueError("audio must be a floating-point tensor of shape (B, 1, T)")
        if wav.dim() != 3 or wav.shape[1] != 1:
            raise ValueError(f"audio must have shape (B, 1, T), got {tuple(wav.shape)}")
        if not bool(torch.isfinite(wav).all()):
            raise ValueError("audio contains NaN or Inf samples")
        wav = wav.to(self.device, torch.float32)  # float64/float16 input: computed in float32 like any other
        check_precision(precision, wav.device)
        self.quantizer.n_q_for_bandwidth(bandwidth)  # validates before any compute
        lengths = self._sizes(lengths, wav.shape[0], wav.shape[-1], "lengths")
        items = [wav[i, :, :n] for i, n in enumerate(lengths.tolist())]
        with ieee_fp32(precision == "fp32", wav.device):
            rows = batched(items, lambda x, n: self._encode_pass(x, bandwidth, n, precision, norm_stats), wav.device, precision)
        return pad_rows(rows)

    def check_codes(self, codes: torch.Tensor) -> None:
        """Raise :class:`CodesError` unless ``codes`` is an integer (B, n_q, F) tensor in range."""
        if not isinstance(codes, torch.Tensor):
            raise CodesError(f"codes must be a tensor, got {type(codes).__name__}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise CodesError(f"codes must be integers, got {codes.dtype}")
        if codes.dim() != 3:
            raise CodesError(f"codes must have shape (B, n_q, frames), got {tuple(codes.shape)}")
        if not 1 <= codes.shape[1] <= self.n_q:
            raise CodesError(f"codes have {codes.shape[1]} quantizers; this model has 1 to {self.n_q}")
        if codes.shape[-1] < 1:
            raise CodesError("codes have 0 frames")
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= self.bins:
            raise CodesError(f"codes must lie in [0, {self.bins}) for this model, found values in [{lo}, {hi}]")

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor, frames: torch.Tensor | Sequence[int] | None = None, precision: str = "fp32",
               length: int | Sequence[int] | None = None) -> torch.Tensor:  # fmt: skip
        """Decode codes to audio.

        Args:
            codes: (B, n_q, F) integers in [0, bins), any n_q up to ``self.n_q`` (else :class:`CodesError`).
            frames: (B,) valid frames per item of a padded batch (``num_frames``): each decodes exactly as alone.
            precision: ``"fp32"`` (within ~1e-6 of the eager model) or ``"bf16"``.
            length: the source's samples, one for all or (B,): the audio is cut (or zero-padded) to it.

        Returns:
            (B, 1, T) float32 audio: T = max(``length``), else F * hop (whole frames).
        """
        self.check_codes(codes)
        codes = codes.to(device=self.device, dtype=torch.long)
        check_precision(precision, codes.device)
        count = codes.shape[-1]
        sizes = self._sizes(frames, codes.shape[0], count, "frames")
        items = [codes[i, :, :f] for i, f in enumerate(sizes.tolist())]
        with ieee_fp32(precision == "fp32", codes.device):
            audio = pad_rows(batched(items, lambda z, n: self._decode_pass(z, n, precision), codes.device, precision))
        target = torch.as_tensor(count * self.hop_length if length is None else length).expand(codes.shape[0])
        audio = F.pad(audio, (0, int(target.max()) - audio.shape[-1]))
        if bool((target != audio.shape[-1]).any()):  # each item to its own length
            audio = audio * (torch.arange(audio.shape[-1]) < target[:, None]).to(audio)[:, None]
        return audio

