"""Streaming decode and batches of clips on top of :class:`XCodec` (long files: models/pipeline.py)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from modules.tiled import ConvSpec, Residual, plan_segments

from .pipeline import DECODER_CONTEXT, Pipeline, decode_long, encode_long
from .precision import check_precision
from .xcodec import XCodec

__all__ = ["DECODER_CONTEXT", "StreamingDecoder", "chunk_codes", "decode_long", "decode_many", "encode_long",
           "encode_many", "receptive_frames"]  # fmt: skip


class StreamingDecoder:
    """Decode codes chunk by chunk: the audio of every frame that has ``lookahead`` frames of future codes, decoded
    with ``context`` frames of past codes (the decoder is not causal). ``lookahead=0``: the newest frames of each
    chunk decoded without their future (lowest latency, some error at chunk edges).

    Args:
        context: frames of past codes decoded again with each chunk (look-back).
        lookahead: frames held back until that many future frames have arrived (their audio is then final).
            ``lookahead >= DECODER_CONTEXT`` and ``context >= DECODER_CONTEXT`` reproduce whole-sequence decoding.

    ``push(codes)`` takes (1, n_q, n) or (n_q, n) codes and returns the (T,) audio that became final (possibly
    empty); ``flush()`` returns the rest at the end of the stream.
    """

    def __init__(self, model: XCodec, context: int = DECODER_CONTEXT, lookahead: int = 0, precision: str = "fp32"):
        if context < 0 or lookahead < 0:
            raise ValueError("context and lookahead must be >= 0 frames")
        if not model.windowed_decode:
            raise ValueError(f"{type(model).__name__}'s decoder attends to the whole clip: it cannot decode a stream")
        self.model, self.context, self.lookahead, self.precision = model, context, lookahead, check_precision(precision)
        self._codes: torch.Tensor | None = None  # kept frames: context + not yet emitted
        self._offset = 0  # stream frame index of self._codes[..., 0]
        self._emitted = 0  # frames whose audio has been returned

    def push(self, codes: torch.Tensor) -> torch.Tensor:
        codes = codes[None] if codes.dim() == 2 else codes
        self.model.check_codes(codes)
        if codes.shape[0] != 1:
            raise ValueError("StreamingDecoder takes one stream: codes of shape (1, n_q, n)")
        if self._codes is not None and codes.shape[1] != self._codes.shape[1]:
            raise ValueError(f"chunk has {codes.shape[1]} quantizers, the stream {self._codes.shape[1]}")
        self._codes = codes if self._codes is None else torch.cat([self._codes, codes], dim=-1)
        return self._emit(self._offset + self._codes.shape[-1] - self.lookahead)

    def flush(self) -> torch.Tensor:
        return self._emit(self._offset + (0 if self._codes is None else self._codes.shape[-1]))

    @torch.inference_mode()
    def _emit(self, upto: int) -> torch.Tensor:
        hop = self.model.hop_length
        if upto <= self._emitted:
            return torch.zeros(0, device=self.model.device)  # on the device of the audio pieces: they concatenate
        audio = self.model.decode(self._codes, precision=self.precision)[0, 0]
        out = audio[(self._emitted - self._offset) * hop : (upto - self._offset) * hop].clone()
        self._emitted = upto
        # Keep `context` frames before the next frame to emit (and everything after it).
        keep_from = max(0, self._emitted - self.context - self._offset)
        self._codes = self._codes[..., keep_from:]
        self._offset += keep_from
        return out


def _in_batches(run: Callable, items: Sequence[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """``run`` on lists of ``batch_size`` items of similar length (longest first: little padding)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    order = sorted(range(len(items)), key=lambda i: -items[i].shape[-1])
    out = {}
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        out.update(zip(idx, run([items[i] for i in idx])))
    return [out[i] for i in range(len(items))]


@torch.inference_mode()
def encode_many(model: XCodec, clips: Sequence[torch.Tensor], bandwidth: float | None = None, batch_size: int = 8,
                precision: str = "fp32") -> list[torch.Tensor]:  # fmt: skip
    """Encode clips of any lengths (no gain applied), ``batch_size`` at a time (grouped by length): one (n_q, F_i)
    code tensor per clip, identical to encoding it alone."""
    pipe = Pipeline(model, bandwidth, precision, window=0, gain=1.0)
    return _in_batches(pipe.encode, [c.reshape(-1) for c in clips], batch_size)


@torch.inference_mode()
def decode_many(model: XCodec, codes: Sequence[torch.Tensor], batch_size: int = 8,
                precision: str = "fp32") -> list[torch.Tensor]:  # fmt: skip
    """Decode (n_q, F_i) code tensors ``batch_size`` at a time; returns (F_i * hop,) audio each."""
    return _in_batches(Pipeline(model, None, precision, window=0).decode, codes, batch_size)


def chunk_codes(codes: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Split (1, n_q, F) codes into chunks of ``size`` frames (the last may be shorter)."""
    return [codes[..., i : i + size] for i in range(0, codes.shape[-1], size)]


def receptive_frames(model: XCodec) -> int:
    """An upper bound on the decoder's receptive field, in frames on each side."""
    reach, rate = 0.0, 1.0  # frames each side; the current rate relative to the frame rate
    for op in (op for seg in plan_segments(model.decoder_2.model) for op in seg.ops):
        conv = op.conv1 if isinstance(op, Residual) else op  # a residual unit's second conv is 1 wide
        if isinstance(conv, ConvSpec) and conv.transposed:
            reach += math.ceil(conv.k / conv.s) / rate
            rate *= conv.s
        elif isinstance(conv, ConvSpec):
            reach += conv.d * (conv.k - 1) / 2 / rate
    return math.ceil(reach)
