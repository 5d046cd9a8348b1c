"""Cache-blocked CPU inference for the acoustic encoder and decoder (and the teacher's first convs): each stage
tile by tile along time with each conv's halo, in channels-last (B, C, 1, T) for oneDNN; docs/performance.md."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .acoustic import Block, ResidualUnit, Snake1d, conv_out_length
from .snake import snake

# Largest intermediate tile (channels x samples) and smallest output tile (samples, so
# that halos cost a few % at most); measured best on a 2-core AVX-512 CPU.
TILE_ELEMENTS = 1 << 20
MIN_TILE_OUT = 4096
# oneDNN has bf16 convolutions only with AVX512BW/VL/DQ, AVX-NE-CONVERT or AMX (and refuses bf16 input
# elsewhere, e.g. AMD Zen 3): without them bf16 convs go to torch's own kernel (slow; precision warns).
BF16_ONEDNN = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@dataclass
class ConvSpec:
    """A Conv1d / ConvTranspose1d seen as a map between sequence positions."""

    module: nn.Module
    transposed: bool
    k: int
    s: int
    p: int
    d: int
    op: int = 0  # output padding (transposed only)

    @classmethod
    def of(cls, m: nn.Module) -> ConvSpec:
        t = isinstance(m, nn.ConvTranspose1d)
        return cls(m, t, m.kernel_size[0], m.stride[0], m.padding[0], m.dilation[0], m.output_padding[0] if t else 0)

    def out_len(self, n):
        return conv_out_length(n, self.module)

    def in_range(self, o0: int, o1: int) -> tuple[int, int]:
        """Input positions (unclamped) that outputs [o0, o1) depend on."""
        if self.transposed:
            lo = -((-(o0 + self.p - self.d * (self.k - 1))) // self.s)  # ceil
            hi = (o1 - 1 + self.p) // self.s + 1
            return lo, hi
        return o0 * self.s - self.p, (o1 - 1) * self.s - self.p + self.d * (self.k - 1) + 1


@dataclass
class Residual:
    """A ResidualUnit (Snake1d, conv k, Snake1d, conv 1) computed as one op."""

    unit: nn.Module
    conv1: ConvSpec
    conv2: ConvSpec

    def in_range(self, o0: int, o1: int) -> tuple[int, int]:
        return self.conv1.in_range(o0, o1)


@dataclass
class Segment:
    """Ops computed together tile by tile; only the last one's output is materialised. Ops: ConvSpec, Snake1d,
    Residual, or any elementwise map of a (B, C, 1, T) tile returning a new tensor (the teacher's GroupNorm, GELU)."""

    ops: list = field(default_factory=list)


class TiledRunner:
    """Runs :class:`Segment` lists over channels-last (B, C, 1, T) input in ``dtype`` (float32 or bfloat16);
    ``tile``: largest intermediate tile in elements, ``min_tile``: smallest output tile in samples."""

    def __init__(self, dtype: torch.dtype = torch.float32, tile: int = TILE_ELEMENTS, min_tile: int = MIN_TILE_OUT):
        self.dtype, self.tile, self.min_tile = dtype, tile, min_tile
        self._run_weights: dict = {}
        self._workers: tuple[int, ThreadPoolExecutor] | None = None

    def _weights(self, spec: ConvSpec):
        m = spec.module
        found = self._run_weights.get(id(m))
        if found is None:
            # Plain convs keep their channels-last copy across runs until the weight changes;
            # weight-normed ones (training layout) are evaluated once per run.
            key = None
            if not parametrize.is_parametrized(m):
                key = (self.dtype, m.weight.device, m.weight.data_ptr(), m.weight._version)
            cache = m.__dict__.get("_cl_cache")
            if key is None or cache is None or cache[0] != key:
                w = m.weight.detach().to(self.dtype)[:, :, None, :].contiguous(memory_format=torch.channels_last)
                cache = (key, w, None if m.bias is None else m.bias.detach().to(self.dtype))
                if key is not None:
                    m.__dict__["_cl_cache"] = cache
            found = self._run_weights[id(m)] = cache[1:]
        return found

    def _conv(self, spec: ConvSpec, x: torch.Tensor) -> torch.Tensor:
        """Conv with no padding (halos and zeros are already in ``x``)."""
        w, b = self._weights(spec)
        if spec.transposed:
            return F.conv_transpose2d(x, w, b, stride=(1, spec.s), dilation=(1, spec.d))
        if x.device.type == "cpu" and torch.backends.mkldnn.is_available() and (x.dtype == torch.float32 or BF16_ONEDNN):
            # oneDNN's channels-last kernels for every conv (eager would send 1x1
            # convs to its native kernel on one thread, converting layouts).
            return torch.ops.aten.mkldnn_convolution(x, w, b, [0, 0], [1, spec.s], [1, spec.d], 1)
        return F.conv2d(x, w, b, stride=(1, spec.s), dilation=(1, spec.d))

    @staticmethod
    def _padded_snake(x: torch.Tensor, alpha: torch.Tensor, left: int, right: int) -> torch.Tensor:
        """Snake of ``x`` written between ``left`` and ``right`` zeros: a conv's input
        with its padding, without padding (copying) the Snake's output afterwards."""
        if left == 0 and right == 0:
            return snake(x, alpha)
        b, c, h, n = x.shape
        buf = x.new_empty((b, c, h, left + n + right)).contiguous(memory_format=torch.channels_last)
        buf[..., :left].zero_()
        buf[..., left + n :].zero_()
        snake(x, alpha, out=buf[..., left : left + n])  # a time slice of channels-last is dense
        return buf

    @staticmethod
    def _mask_(x: torch.Tensor, lengths: torch.Tensor | None, start: int) -> torch.Tensor:
        if lengths is None:
            return x
        n = x.shape[-1]
        if bool((lengths >= start + n).all()):
            return x
        keep = (torch.arange(start, start + n, device=x.device)[None, :] < lengths[:, None]).to(x.dtype)
        return x.mul_(keep.view(x.shape[0], 1, 1, n))

    def to_layout(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T) -> (B, C, 1, T) channels-last in this runner's dtype."""
        return x.to(self.dtype)[:, :, None, :].contiguous(memory_format=torch.channels_last)

    @staticmethod
    def from_layout(x: torch.Tensor) -> torch.Tensor:
        """(B, C, 1, T) -> (B, C, T) contiguous."""
        return x[:, :, 0, :].contiguous()

    def run(self, segments: list[Segment], x: torch.Tensor, lengths: torch.Tensor | None = None):
        """Run ``segments`` on ``x`` (from :meth:`to_layout`); returns (output, lengths)."""
        self._run_weights = {}
        if lengths is not None:  # as the eager modules: positions past an item's length are zero
            x = self._mask_(x.clone(), lengths, 0)
        try:
            for seg in segments:
                x, lengths = self._run_segment(seg, x, lengths)
        finally:
            self._run_weights = {}
        return x, lengths

    def _run_segment(self, seg: Segment, x: torch.Tensor, lengths: torch.Tensor | None):
        ops = seg.ops
        lens, item_lens, chans = [x.shape[-1]], [lengths], [x.shape[1]]
        for op in ops:  # only convs change the length and the channels
            conv = op if isinstance(op, ConvSpec) else None
            lens.append(lens[-1] if conv is None else conv.out_len(lens[-1]))
            item_lens.append(item_lens[-1] if conv is None or lengths is None else conv.out_len(item_lens[-1]))
            chans.append(chans[-1] if conv is None else conv.module.out_channels)
        total = lens[-1]
        # Output tile: the largest intermediate stays within self.tile elements.
        widest = x.shape[0] * max(c * (n / max(1, total)) for c, n in zip(chans, lens))
        step = min(total, max(self.min_tile, int(self.tile / max(widest, 1e-9))))
        first = self._tile(ops, x, 0, step, lens, item_lens)
        if step == total:
            return first, item_lens[-1]
        out = first.new_empty((*first.shape[:-1], total)).contiguous(memory_format=torch.channels_last)
        out[..., :step].copy_(first)
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

        def one(o0: int) -> None:
            # Grad and inference modes are per thread: the workers take the caller's.
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                y = self._tile(ops, x, o0, min(total, o0 + step), lens, item_lens)
                out[..., o0 : min(total, o0 + step)].copy_(y)

        starts = range(step, total, step)
        pool = self._pool() if x.device.type == "cpu" else None
        if pool is None:
            for o0 in starts:
                one(o0)
        else:
            threads = torch.get_num_threads()
            try:
                list(pool.map(one, starts))
            finally:
                torch.set_num_threads(threads)  # the workers set the process-wide default to 1
        return out, item_lens[-1]

    def _pool(self):
        """Worker threads, one per torch thread, each running whole tiles on one thread: tiles
        are independent, so no barrier per op (many small ops each with an OpenMP barrier
        degrade badly on a busy machine); oneDNN computes a position alike on any thread count."""
        threads = torch.get_num_threads()
        if threads < 2:
            return None
        if self._workers is None or self._workers[0] != threads:
            pool = ThreadPoolExecutor(threads, "xcodec-tile", initializer=torch.set_num_threads, initargs=(1,))
            self._workers = (threads, pool)
        return self._workers[1]

    def _tile(self, ops, x, o0: int, o1: int, lens, item_lens) -> torch.Tensor:
        n = len(ops)
        # Ranges each op must produce, backwards from the output tile, clamped to the valid domain.
        ranges = [None] * (n + 1)
        ranges[n] = (o0, o1)
        for i in range(n - 1, -1, -1):
            a, b = ops[i].in_range(*ranges[i + 1]) if isinstance(ops[i], (ConvSpec, Residual)) else ranges[i + 1]
            ranges[i] = (max(0, a), min(lens[i], b))
        a, b = ranges[0]
        t = x[..., a:b]
        padded = False  # t already carries the zero padding of the conv that follows
        for i, op in enumerate(ops):
            (ia, ib), (oa, ob) = ranges[i], ranges[i + 1]
            if isinstance(op, Snake1d):
                nxt = ops[i + 1] if i + 1 < n else None
                if isinstance(nxt, ConvSpec) and not nxt.transposed:
                    ua, ub = nxt.in_range(*ranges[i + 2])
                    t, padded = self._padded_snake(t, op.alpha, ia - ua, ub - ib), True
                else:
                    t = snake(t, op.alpha, out=t if i > 0 else None)
                continue
            if isinstance(op, ConvSpec) and op.transposed:
                # Inputs outside the clamped range contribute nothing; crop the outputs
                # that this input slice fully determines.
                y = self._conv(op, t)
                first = oa - (ia * op.s - op.p)
                t = self._mask_(y[..., first : first + ob - oa], item_lens[i + 1], oa)
            elif isinstance(op, ConvSpec):
                ua, ub = op.in_range(oa, ob)
                if not padded and (ia != ua or ub != ib):
                    t = F.pad(t, (ia - ua, ub - ib)).contiguous(memory_format=torch.channels_last)
                t = self._conv(op, t)
                t = self._mask_(t, item_lens[i + 1], oa)
            elif isinstance(op, Residual):
                ua, ub = op.conv1.in_range(oa, ob)
                h = self._conv(op.conv1, self._padded_snake(t, op.unit.block[0].alpha, ia - ua, ub - ib))
                self._mask_(h, item_lens[i + 1], oa)
                snake(h, op.unit.block[2].alpha, out=h)
                h = self._conv(op.conv2, h)
                self._mask_(h, item_lens[i + 1], oa)
                t = h.add_(t[..., oa - ia : ob - ia])
            else:
                t = op(t)
            padded = False
            if t.shape[-1] != ob - oa:
                raise RuntimeError(f"tile bookkeeping error: op {i} gave {t.shape[-1]} positions, expected {ob - oa}")
        return t


class TiledStacks:
    """Runners per dtype and segment plans per acoustic stack, each built on first use."""

    def __init__(self) -> None:
        self._runners: dict[torch.dtype, TiledRunner] = {}
        self._plans: dict[int, list[Segment]] = {}

    def run(self, layers: nn.Sequential, x: torch.Tensor, lengths: torch.Tensor | None, dtype: torch.dtype):
        """(B, C, T) ``x`` through the encoder's or decoder's Sequential; float32 (B, C', T') out."""
        runner = self._runners.setdefault(dtype, TiledRunner(dtype))
        if id(layers) not in self._plans:
            self._plans[id(layers)] = plan_segments(layers)
        y, _ = runner.run(self._plans[id(layers)], runner.to_layout(x), lengths)
        return runner.from_layout(y).float()


def _flatten(layers) -> list:
    ops = []
    for layer in layers:
        if isinstance(layer, ResidualUnit):
            ops.append(Residual(layer, ConvSpec.of(layer.block[1]), ConvSpec.of(layer.block[3])))
        elif isinstance(layer, Block):
            ops.extend(_flatten(layer.block))
        elif isinstance(layer, Snake1d):
            ops.append(layer)
        elif isinstance(layer, (nn.Conv1d, nn.ConvTranspose1d)):
            ops.append(ConvSpec.of(layer))
        else:
            raise TypeError(f"no tiled implementation for {type(layer).__name__}")
    return ops


def plan_segments(layers) -> list[Segment]:
    """Split the acoustic encoder's or decoder's Sequential into tiled segments: one ends after each strided conv;
    the decoder's transposed conv (with the Snake before it) starts one."""
    ops = _flatten(layers)
    segments: list[Segment] = [Segment()]
    for op in ops:
        resampling = isinstance(op, ConvSpec) and (op.s != 1 or op.transposed)
        if resampling and op.transposed and segments[-1].ops:
            # Decoder: [snake, convT, residual x3]; the snake runs at the lower rate, on the convT's input.
            carry = [segments[-1].ops.pop()] if isinstance(segments[-1].ops[-1], Snake1d) else []
            if segments[-1].ops:
                segments.append(Segment())
            segments[-1].ops.extend(carry)
        segments[-1].ops.append(op)
        if resampling and not op.transposed:
            segments.append(Segment())
    return [s for s in segments if s.ops]
