"""The encode/decode pipeline over :class:`XCodec` that inference.py, evaluate.py and ``encode_many``/``decode_many``
share: gain, long-file windows, grouping, padding, trimming.

Long files: the teacher's attention is quadratic in length (and global, as is its first GroupNorm), so they are
encoded in windows with context on both sides, each window's centre codes stitched at frame boundaries; window starts
are whole frames and every chunk keeps the file's length modulo the hop, so each chunk frame is exactly the file frame
it stands for. Decoding is local (``DECODER_CONTEXT``): windows with that context equal one pass up to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .engine import batched
from .vocoder import Vocoder, merge_low_band

DECODER_CONTEXT = 16  # frames: above the decoder's receptive field (~11 frames each side)


def window_frames(model, window: float, context: float) -> tuple[int, int]:
    """``window`` and ``context`` seconds in whole frames."""
    if window <= 0 or context < 0:
        raise ValueError("window must be > 0 and context >= 0 seconds")
    return max(1, round(window * model.frame_rate)), max(0, round(context * model.frame_rate))


@torch.inference_mode()
def encode_long(model, wav: torch.Tensor, bandwidth: float | None = None, window: float = 30.0, context: float = 5.0,
                precision: str = "fp32", global_norm: bool = True) -> torch.Tensor:  # fmt: skip
    """Encode one clip, (T,) or (1, 1, T), in windows of ``window`` s with ``context`` s on each side (peak memory
    depends on the window, not the file) into (1, n_q, F) codes, F = ``model.num_frames(T)`` as a single pass;
    a clip of at most ``window + 2 * context`` is one pass. ``global_norm``: the teacher's GroupNorm uses the
    whole file's statistics (computed first in chunks), as in a single pass."""
    wav = wav.reshape(1, 1, -1)  # stays where it is (a long file on CPU); each window goes to the model's device
    hop, total = model.hop_length, wav.shape[-1]
    n_frames = int(model.num_frames(total))
    win, ctx = window_frames(model, window, context)
    if n_frames <= win + 2 * ctx:
        return model.encode(wav, bandwidth, precision=precision)
    stats = model.norm_stats(wav) if global_norm else None
    pieces = []
    for f0 in range(0, n_frames, win):
        f1 = min(n_frames, f0 + win)
        first = max(0, f0 - ctx)  # first frame of the chunk
        a, b = first * hop, min(total, (f1 + ctx) * hop + total % hop)  # keeps (b - a) % hop == total % hop
        codes = model.encode(wav[..., a:b], bandwidth, precision=precision, norm_stats=stats)
        if codes.shape[-1] < f1 - first:
            raise RuntimeError(f"window [{a}, {b}) gave {codes.shape[-1]} frames, needed {f1 - first}")
        pieces.append(codes[..., f0 - first : f1 - first])
    return torch.cat(pieces, dim=-1)


@torch.inference_mode()
def decode_long(model, codes: torch.Tensor, window: int = 1500, context: int = DECODER_CONTEXT,
                precision: str = "fp32") -> torch.Tensor:  # fmt: skip
    """Decode (1, n_q, F) codes ``window`` frames at a time with ``context`` frames each side into (1, 1, F * hop)
    audio; with ``context >= DECODER_CONTEXT`` it equals a single pass up to float rounding."""
    if codes.dim() != 3 or codes.shape[0] != 1:
        raise ValueError("decode_long takes one item, codes of shape (1, n_q, F)")
    if window < 1 or context < 0:
        raise ValueError("window must be >= 1 and context >= 0 frames")
    hop, n = model.hop_length, codes.shape[-1]
    out = []
    for f0 in range(0, n, window):
        f1 = min(n, f0 + window)
        a = max(0, f0 - context)
        audio = model.decode(codes[..., a : min(n, f1 + context)], precision=precision)
        out.append(audio[..., (f0 - a) * hop : (f1 - a) * hop])
    return torch.cat(out, dim=-1)


class Pipeline:
    """Lists of clips to codes and codes to audio, each output trimmed to its source's length.

    Args:
        bandwidth: kbps (default: the model's largest); a bandwidth the model lacks raises ``ValueError``.
        precision: ``"fp32"`` (exact codes) or ``"bf16"``.
        window, context: seconds; a clip of more than ``window + 2 * context`` seconds of frames is encoded and
            decoded in windows (``window=0``: never).
        vocoder: decode to its rate with it (YuE's 44.1 kHz vocoders); ``low_freq_merge``: YuE's merge of the
            codec's own audio below 5.5 kHz.
        gain: applied to audio before encoding (default: the model's ``audio_norm_scale``).
    """

    def __init__(self, model, bandwidth: float | None = None, precision: str = "fp32", window: float = 30.0,
                 context: float = 5.0, vocoder: Vocoder | None = None, low_freq_merge: bool = False,
                 gain: float | None = None):  # fmt: skip
        self.model, self.bandwidth, self.precision = model, bandwidth, precision
        self.n_q = model.quantizer.n_q_for_bandwidth(bandwidth)
        self.window, self.context, self.vocoder, self.low_freq_merge = window, context, vocoder, low_freq_merge
        self.win, ctx = window_frames(model, window, context) if window > 0 else (0, 0)
        self.limit = self.win + 2 * ctx if window > 0 else None
        self.gain = model.audio_norm_scale if gain is None else gain
        self.min_length = model.min_length()

    @property
    def out_rate(self) -> int:
        """The decoded audio's rate: the vocoder's, else the model's."""
        return self.vocoder.sample_rate if self.vocoder is not None else self.model.sample_rate

    def too_short(self, samples: int) -> str | None:
        """Why a clip of ``samples`` cannot be encoded, or ``None``."""
        why = f"audio too short ({samples} samples at {self.model.sample_rate} Hz; at least {self.min_length} needed)"
        return why if samples < self.min_length else None

    def is_long(self, frames: int, decoding: bool = False) -> bool:
        """The one long/short decision, for encoding and decoding alike (a decoder that attends to the whole clip,
        ``windowed_decode`` False, always decodes in one pass)."""
        return self.limit is not None and frames > self.limit and (not decoding or self.model.windowed_decode)

    def encode(self, wavs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Clips, (T_i,) each at the model's rate, to (n_q, F_i) codes: F_i = ``num_frames(T_i)``."""
        model = self.model
        wavs = [w.reshape(1, -1) * self.gain for w in wavs]
        frames = model.num_frames(torch.tensor([w.shape[-1] for w in wavs], dtype=torch.long)).tolist()
        long = [self.is_long(f) for f in frames]
        short = [w for w, is_long in zip(wavs, long) if not is_long]
        rows = iter(batched(short, lambda x, n: model.encode(x, self.bandwidth, n, self.precision), model.device,
                            self.precision))  # fmt: skip
        return [encode_long(model, w, self.bandwidth, self.window, self.context, self.precision)[0] if is_long
                else next(rows)[:, :f] for w, f, is_long in zip(wavs, frames, long)]  # fmt: skip

    def decode(self, codes: Sequence[torch.Tensor], source_lengths: Sequence[int | None] | None = None) -> list:
        """(n_q, F_i) codes (one n_q) to (T_i,) audio at :attr:`out_rate`: T_i is the source's
        ``source_lengths[i]`` samples (at the model's rate) at the output rate, else F_i frames."""
        model, rate, vocoder = self.model, self.model.sample_rate, self.vocoder
        sources = source_lengths or [None] * len(codes)
        targets = [round((n or c.shape[-1] * model.hop_length) * self.out_rate / rate) for c, n in zip(codes, sources)]
        if vocoder is None or self.low_freq_merge:  # the codec's own decoding, F_i * hop samples each
            long = [self.is_long(c.shape[-1], decoding=True) for c in codes]
            short = [c for c, is_long in zip(codes, long) if not is_long]
            rows = iter(batched(short, lambda x, n: model.decode(x, n, self.precision)[:, 0], model.device,
                                self.precision))  # fmt: skip
            audio = [decode_long(model, c[None], self.win, precision=self.precision)[0, 0] if is_long
                     else next(rows)[: c.shape[-1] * model.hop_length] for c, is_long in zip(codes, long)]  # fmt: skip
        if vocoder is not None:  # low_freq_merge: YuE's post-processing, the codec's own audio below 5.5 kHz
            vocoded = [vocoder.vocode(model, c[None]) for c in codes]
            if self.low_freq_merge:
                vocoded = [merge_low_band(a[None, None], v, rate, vocoder.sample_rate) for a, v in zip(audio, vocoded)]
            audio = [v[0, 0] for v in vocoded]
        return [F.pad(a, (0, n - a.shape[-1])) for a, n in zip(audio, targets)]  # cut or zero-padded

    def encode_decode(self, wavs: Sequence[torch.Tensor], decode: bool = True) -> tuple[list, list | None]:
        """Codes of ``wavs`` and, with ``decode``, their reconstructions of the sources' lengths."""
        codes = self.encode(wavs)
        return codes, self.decode(codes, [w.numel() for w in wavs]) if decode else None
