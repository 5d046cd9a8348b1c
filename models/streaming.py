"""Long files, batches of clips and streaming decode on top of :class:`XCodec`.

Long files: the teacher's attention is quadratic in length (and global, as is the
GroupNorm of its first conv), so a 30-minute file cannot be encoded in one pass. It is
encoded in windows of ``window`` seconds, each with ``context`` seconds of audio on
both sides, and the codes of each window's centre are stitched at frame boundaries.
Window starts are whole frames and every chunk keeps the file's length modulo the hop,
so each chunk frame is exactly the file frame it stands for (the acoustic encoder's
half-hop padding decision included). Away from the window edges the codes are those of
a single pass; the context makes the edges agree too, in practice.

Decoding is local (the decoder is a conv stack whose receptive field is about
``DECODER_CONTEXT`` frames each side), so chunked decoding with at least that much
context on both sides equals whole-sequence decoding up to float rounding.

Streaming decode: :class:`StreamingDecoder` takes codes chunk by chunk and returns the
audio of every frame that has ``lookahead`` frames of future codes, decoding each time
with ``context`` frames of past codes (the decoder is not causal). With ``lookahead=0``
the newest frames of each chunk are decoded without their future: lowest latency,
some error at chunk edges.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import torch

from modules.tiled import ConvSpec, Residual, plan_segments

from .precision import check_precision
from .xcodec import XCodec

DECODER_CONTEXT = 16  # frames: above the decoder's receptive field (~11 frames each side)


def _as_batch1(wav: torch.Tensor) -> torch.Tensor:
    if wav.dim() == 1:
        wav = wav[None, None]
    elif wav.dim() == 2:
        wav = wav[None]
    if wav.dim() != 3 or wav.shape[:2] != (1, 1):
        raise ValueError(f"expected one mono clip, (T,), (1, T) or (1, 1, T); got {tuple(wav.shape)}")
    return wav


@torch.inference_mode()
def encode_long(
    model: XCodec,
    wav: torch.Tensor,
    bandwidth: float | None = None,
    window: float = 30.0,
    context: float = 5.0,
    precision: str = "fp32",
    global_norm: bool = True,
) -> torch.Tensor:
    """Encode one long clip in windows of ``window`` s with ``context`` s on each side.

    Returns (1, n_q, F) codes with F = ``model.num_frames(T)``, as a single pass would.
    Clips no longer than ``window + 2 * context`` are encoded in one pass. Peak memory
    depends on the window, not on the file length. ``global_norm``: the teacher's
    GroupNorm (over the whole clip in a single pass) uses the statistics of the whole
    file, computed first in chunks, instead of each window's own.
    """
    check_precision(precision)
    wav = _as_batch1(wav)  # stays where it is (a long file on CPU); each window goes to the model's device
    hop = model.hop_length
    total = wav.shape[-1]
    n_frames = int(model.num_frames(total))
    win = max(1, int(round(window * model.frame_rate)))
    ctx = max(0, int(round(context * model.frame_rate)))
    if window <= 0 or context < 0:
        raise ValueError("window must be > 0 and context >= 0 seconds")
    if n_frames <= win + 2 * ctx:
        return model.encode(wav, bandwidth, precision=precision)
    rem = total % hop
    stats = model.semantic_model.norm_stats(wav) if global_norm else None  # chunks go to the model
    return _encode_windows(model, wav, bandwidth, win, ctx, rem, n_frames, precision, stats)


def _encode_windows(model, wav, bandwidth, win: int, ctx: int, rem: int, n_frames: int, precision: str, stats) -> torch.Tensor:
    hop, total = model.hop_length, wav.shape[-1]
    pieces = []
    for f0 in range(0, n_frames, win):
        f1 = min(n_frames, f0 + win)
        first = max(0, f0 - ctx)  # first frame of the chunk
        a = first * hop
        b = min(total, (f1 + ctx) * hop + rem)  # keeps (b - a) % hop == total % hop
        codes = model.encode(wav[..., a:b], bandwidth, precision=precision, norm_stats=stats)
        if codes.shape[-1] < f1 - first:
            raise RuntimeError(f"window [{a}, {b}) gave {codes.shape[-1]} frames, needed {f1 - first}")
        pieces.append(codes[..., f0 - first : f1 - first])
    return torch.cat(pieces, dim=-1)


@torch.inference_mode()
def decode_long(
    model: XCodec, codes: torch.Tensor, window: int = 1500, context: int = DECODER_CONTEXT, precision: str = "fp32"
) -> torch.Tensor:
    """Decode (1, n_q, F) codes ``window`` frames at a time with ``context`` frames each side.

    Returns (1, 1, F * hop) audio; with ``context >= DECODER_CONTEXT`` it equals a single
    pass up to float rounding.
    """
    model.check_codes(codes)
    if codes.shape[0] != 1:
        raise ValueError("decode_long takes one item, codes of shape (1, n_q, F)")
    if window < 1 or context < 0:
        raise ValueError("window must be >= 1 and context >= 0 frames")
    hop = model.hop_length
    n = codes.shape[-1]
    if n <= window + 2 * context:
        return model.decode(codes, precision=precision)
    out = []
    for f0 in range(0, n, window):
        f1 = min(n, f0 + window)
        a, b = max(0, f0 - context), min(n, f1 + context)
        audio = model.decode(codes[..., a:b], precision=precision)
        out.append(audio[..., (f0 - a) * hop : (f1 - a) * hop])
    return torch.cat(out, dim=-1)


class StreamingDecoder:
    """Decode codes chunk by chunk.

    Args:
        model: the codec.
        context: frames of past codes decoded again with each chunk (look-back).
        lookahead: frames held back until that many future frames have arrived; audio
            of frames with full lookahead is final. ``lookahead >= DECODER_CONTEXT`` and
            ``context >= DECODER_CONTEXT`` reproduce whole-sequence decoding.
        precision: ``"fp32"`` or ``"bf16"``.

    ``push(codes)`` takes (1, n_q, n) or (n_q, n) codes and returns the (T,) audio that
    became final (possibly empty); ``flush()`` returns the rest at the end of the stream.
    """

    def __init__(self, model: XCodec, context: int = DECODER_CONTEXT, lookahead: int = 0, precision: str = "fp32"):
        if context < 0 or lookahead < 0:
            raise ValueError("context and lookahead must be >= 0 frames")
        self.model = model
        self.context = context
        self.lookahead = lookahead
        self.precision = check_precision(precision)
        self.reset()

    def reset(self) -> None:
        self._codes: torch.Tensor | None = None  # kept frames: context + not yet emitted
        self._offset = 0  # stream frame index of self._codes[..., 0]
        self._emitted = 0  # frames whose audio has been returned

    @property
    def frames_emitted(self) -> int:
        return self._emitted

    def push(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.dim() == 2:
            codes = codes[None]
        self.model.check_codes(codes)
        if codes.shape[0] != 1:
            raise ValueError("StreamingDecoder takes one stream: codes of shape (1, n_q, n)")
        if self._codes is not None and codes.shape[1] != self._codes.shape[1]:
            raise ValueError(f"chunk has {codes.shape[1]} quantizers, the stream {self._codes.shape[1]}")
        self._codes = codes if self._codes is None else torch.cat([self._codes, codes], dim=-1)
        received = self._offset + self._codes.shape[-1]
        return self._emit(received - self.lookahead)

    def flush(self) -> torch.Tensor:
        if self._codes is None:
            return torch.zeros(0, device=self.model.device)
        return self._emit(self._offset + self._codes.shape[-1])

    @torch.inference_mode()
    def _emit(self, upto: int) -> torch.Tensor:
        hop = self.model.hop_length
        if upto <= self._emitted:
            return torch.zeros(0, device=self.model.device)  # on the device of the audio pieces: they concatenate
        audio = self.model.decode(self._codes, precision=self.precision)[0, 0]
        start = self._emitted - self._offset
        out = audio[start * hop : (upto - self._offset) * hop].clone()
        self._emitted = upto
        # Keep `context` frames before the next frame to emit (and everything after it).
        keep_from = max(0, self._emitted - self.context - self._offset)
        self._codes = self._codes[..., keep_from:]
        self._offset += keep_from
        return out


def stream_decode(model: XCodec, chunks: Iterable[torch.Tensor], **kwargs) -> Iterator[torch.Tensor]:
    """Yield audio for each chunk of codes, then the tail (see :class:`StreamingDecoder`)."""
    dec = StreamingDecoder(model, **kwargs)
    for chunk in chunks:
        yield dec.push(chunk)
    yield dec.flush()


# ---------------------------------------------------------------------------- batches
def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), to waste little padding."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: -int(lengths[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def encode_many(
    model: XCodec,
    clips: Sequence[torch.Tensor],
    bandwidth: float | None = None,
    batch_size: int = 8,
    precision: str = "fp32",
) -> list[torch.Tensor]:
    """Encode clips of any lengths, ``batch_size`` at a time (grouped by length).

    Returns one (n_q, F_i) code tensor per clip, identical to encoding it alone.
    """
    wavs = [c.reshape(-1) for c in clips]
    out: list[torch.Tensor | None] = [None] * len(wavs)
    for idx in length_batches([len(w) for w in wavs], batch_size):
        lengths = torch.tensor([len(wavs[i]) for i in idx])
        batch = wavs[idx[0]].new_zeros(len(idx), 1, int(lengths.max()))  # encode moves it to the model's device
        for j, i in enumerate(idx):
            batch[j, 0, : len(wavs[i])] = wavs[i]
        codes = model.encode(batch, bandwidth, lengths=None if len(idx) == 1 else lengths, precision=precision)
        frames = model.num_frames(lengths)
        for j, i in enumerate(idx):
            out[i] = codes[j, :, : int(frames[j])].clone()
    return out  # type: ignore[return-value]


@torch.inference_mode()
def decode_many(model: XCodec, codes: Sequence[torch.Tensor], batch_size: int = 8, precision: str = "fp32") -> list[torch.Tensor]:
    """Decode (n_q, F_i) code tensors ``batch_size`` at a time; returns (F_i * hop,) audio each."""
    out: list[torch.Tensor | None] = [None] * len(codes)
    hop = model.hop_length
    for idx in length_batches([c.shape[-1] for c in codes], batch_size):
        frames = torch.tensor([codes[i].shape[-1] for i in idx])
        batch = codes[idx[0]].new_zeros(len(idx), codes[idx[0]].shape[0], int(frames.max()), dtype=torch.long)
        for j, i in enumerate(idx):
            batch[j, :, : codes[i].shape[-1]] = codes[i]
        audio = model.decode(batch, frames=None if len(idx) == 1 else frames, precision=precision)
        for j, i in enumerate(idx):
            out[i] = audio[j, 0, : int(frames[j]) * hop].clone()
    return out  # type: ignore[return-value]


def chunk_codes(codes: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Split (1, n_q, F) codes into chunks of ``size`` frames (the last may be shorter)."""
    return [codes[..., i : i + size] for i in range(0, codes.shape[-1], size)]


def receptive_frames(model: XCodec) -> int:
    """An upper bound on the decoder's receptive field, in frames on each side."""
    reach = 0.0  # in samples at the current rate, converted as rates change
    rate = 1.0  # current rate relative to the frame rate
    for seg in plan_segments(model.decoder_2.model):
        for op in seg.ops:
            if isinstance(op, Residual):
                reach += op.conv1.d * (op.conv1.k - 1) / 2 / rate
            elif isinstance(op, ConvSpec):
                if op.transposed:
                    reach += math.ceil(op.k / op.s) / rate
                    rate *= op.s
                else:
                    reach += op.d * (op.k - 1) / 2 / rate
    return math.ceil(reach)
