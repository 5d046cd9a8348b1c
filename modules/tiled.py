"""Cache-blocked CPU inference for the acoustic encoder and decoder.

The DAC-style stages run at up to 16 kHz with 64-128 channels: every op over a whole
10 s clip reads and writes ~40 MB, and every fresh tensor of that size costs ~10k page
faults. Here each stage (residual units, Snakes and the resampling conv around them) is
computed tile by tile along time, with the halo each conv needs, so intermediates stay
in cache and only the stage output is written to memory.

Two layouts:

``"ncw"`` (exact): (B, C, T) tensors and, for every conv, the very backend PyTorch would
pick for the whole tensor (oneDNN or its native conv). Those kernels compute each
output position the same way whatever the width, so the result is bitwise the eager
result; Snake uses the same ops in the same order.

``"cl"`` (fast): (B, C, 1, T) channels-last tensors and oneDNN's channels-last conv
kernels (faster, a different summation order: ~1e-7 relative); also bf16.

Ragged batches: per-item valid lengths are tracked through every op and positions past
an item's length are zeroed after every conv, exactly as the eager modules do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

# Largest intermediate tile (channels x samples) and smallest output tile (samples, so
# that halos cost a few % at most), per layout; measured best on a 2-core AVX-512 CPU.
TILE_ELEMENTS = {"ncw": 1 << 18, "cl": 1 << 20}
MIN_TILE_OUT = {"ncw": 2048, "cl": 4096}
SNAKE_TILE = 1 << 18


# ------------------------------------------------------------------------------ Snake
def snake_reference(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``x + sin^2(alpha x) / alpha`` as DAC / transformers write it."""
    return x + (alpha + 1e-9).reciprocal() * torch.sin(alpha * x).pow(2)


def _snake_tile(x: torch.Tensor, alpha: torch.Tensor, recip: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    # The reference's ops in its order (mul and add commute bitwise), in place in ``out``.
    torch.mul(x, alpha, out=out)
    out.sin_()
    out.pow_(2)
    out.mul_(recip)
    out.add_(x)
    return out


def snake(x: torch.Tensor, alpha: torch.Tensor, out: torch.Tensor | None = None, tile: int = SNAKE_TILE) -> torch.Tensor:
    """Snake without autograd, bitwise equal to :func:`snake_reference` for float32.

    Works on (B, C, T) and channels-last (B, C, 1, T) tensors (``alpha``: (1, C, 1)),
    one cache-sized slice of time at a time. Lower-precision inputs are computed in
    float32 and rounded once. ``out`` may be ``x`` (in place).
    """
    if x.dim() == 4:
        alpha = alpha.reshape(1, -1, 1, 1)
    alpha = alpha.to(device=x.device)
    if out is None:
        out = torch.empty_like(x)
    if x.device.type != "cpu":
        return out.copy_(snake_reference(x.float(), alpha.float()))
    alpha = alpha.float()
    recip = (alpha + 1e-9).reciprocal()
    per_step = max(1, x.numel() // max(1, x.shape[-1]))
    step = max(256, tile // per_step)
    total = x.shape[-1]
    exact = x.dtype == torch.float32
    buf = None
    for start in range(0, total, step):
        xs, os = x[..., start : start + step], out[..., start : start + step]
        if exact:
            if os.data_ptr() == xs.data_ptr():  # in place: x is read after the output is written
                buf = torch.empty_like(xs) if buf is None or buf.shape != xs.shape else buf
                os.copy_(_snake_tile(xs, alpha, recip, buf))
            else:
                _snake_tile(xs, alpha, recip, os)
        else:
            xf = xs.float()
            buf = torch.empty_like(xf) if buf is None or buf.shape != xf.shape else buf
            os.copy_(_snake_tile(xf, alpha, recip, buf))
    return out


# ------------------------------------------------------------------------------ convs
def torch_uses_mkldnn(x, kernel_size: int, stride: int, dilation: int, groups: int = 1) -> bool:
    """Whether eager PyTorch runs this float32 CPU conv1d with oneDNN (else its native conv).

    Mirrors ``ConvParams::use_mkldnn`` (aten/src/ATen/native/Convolution.cpp) for the
    (B, C, 1, T) view that conv1d uses.
    """
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    batch, channels, width = x.shape[0], x.shape[1], x.shape[-1]
    k = kernel_size
    one_by_one_ok = stride != 1 or dilation != 1 or batch >= 16 or k != 1 or torch.get_num_threads() > 1
    big_enough = groups > 1 or batch > 1 or batch * channels * width > 20480
    return one_by_one_ok and big_enough


class _MkldnnOff:
    """Temporarily route convs to PyTorch's native kernels (as eager does for small ones)."""

    def __enter__(self):
        self.prev = torch._C._get_mkldnn_enabled()
        torch._C._set_mkldnn_enabled(False)

    def __exit__(self, *exc):
        torch._C._set_mkldnn_enabled(self.prev)


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
        if self.transposed:
            return (n - 1) * self.s - 2 * self.p + self.d * (self.k - 1) + self.op + 1
        return (n + 2 * self.p - self.d * (self.k - 1) - 1) // self.s + 1

    def in_range(self, o0: int, o1: int) -> tuple[int, int]:
        """Input positions (unclamped) that outputs [o0, o1) depend on."""
        if self.transposed:
            lo = -((-(o0 + self.p - self.d * (self.k - 1))) // self.s)  # ceil
            hi = (o1 - 1 + self.p) // self.s + 1
            return lo, hi
        return o0 * self.s - self.p, (o1 - 1) * self.s - self.p + self.d * (self.k - 1) + 1


@dataclass
class Snake:
    module: nn.Module  # Snake1d

    @property
    def alpha(self) -> torch.Tensor:
        return self.module.alpha


@dataclass
class Residual:
    unit: nn.Module  # ResidualUnit: Snake1d, conv k, Snake1d, conv 1
    conv1: ConvSpec
    conv2: ConvSpec

    @property
    def snake1(self) -> torch.Tensor:
        return self.unit.block[0].alpha

    @property
    def snake2(self) -> torch.Tensor:
        return self.unit.block[2].alpha

    def in_range(self, o0: int, o1: int) -> tuple[int, int]:
        a, b = self.conv1.in_range(o0, o1)
        return a, b


@dataclass
class Segment:
    """Ops computed together tile by tile; only the last one's output is materialised."""

    ops: list = field(default_factory=list)


def _in_range(op, o0: int, o1: int) -> tuple[int, int]:
    if isinstance(op, Snake):
        return o0, o1
    return op.in_range(o0, o1)


def _out_len(op, n):
    if isinstance(op, Snake):
        return n
    if isinstance(op, Residual):
        return n
    return op.out_len(n)


def _channels(op, c_in: int) -> int:
    if isinstance(op, ConvSpec):
        return op.module.out_channels
    return c_in


class TiledRunner:
    """Runs a list of :class:`Segment` over (B, C, T) or channels-last (B, C, 1, T) input.

    Args:
        layout: ``"ncw"`` (bitwise eager float32) or ``"cl"`` (channels-last, any dtype).
        dtype: compute dtype of the ``"cl"`` layout (float32 or bfloat16).
        tile: largest intermediate tile in elements.
        min_tile: smallest output tile in samples.
    """

    def __init__(self, layout: str = "ncw", dtype: torch.dtype = torch.float32, tile: int | None = None, min_tile: int | None = None):
        if layout not in ("ncw", "cl"):
            raise ValueError(f"layout must be 'ncw' or 'cl', got {layout!r}")
        if layout == "ncw" and dtype != torch.float32:
            raise ValueError("the exact 'ncw' layout is float32 only")
        self.layout = layout
        self.dtype = dtype
        self.tile = TILE_ELEMENTS[layout] if tile is None else tile
        self.min_tile = MIN_TILE_OUT[layout] if min_tile is None else min_tile
        self._run_weights: dict = {}
        self.parallel_tiles = True

    # ------------------------------------------------------------------ weights
    def _resolve(self, spec: ConvSpec):
        m = spec.module
        if parametrize.is_parametrized(m):  # weight norm (training layout): evaluate once per run
            w = m.weight.detach()
            if self.layout == "cl":
                w = w.to(self.dtype)[:, :, None, :].contiguous(memory_format=torch.channels_last)
            b = None if m.bias is None else m.bias.detach().to(w.dtype)
            return w, b
        if self.layout == "ncw":
            return m.weight, m.bias
        key = (self.dtype, m.weight.device, m.weight.data_ptr(), m.weight._version)
        cache = m.__dict__.get("_cl_cache")
        if cache is None or cache[0] != key:
            w = m.weight.detach().to(self.dtype)[:, :, None, :].contiguous(memory_format=torch.channels_last)
            b = None if m.bias is None else m.bias.detach().to(self.dtype)
            cache = (key, w, b)
            m.__dict__["_cl_cache"] = cache
        return cache[1], cache[2]

    def _weights(self, spec: ConvSpec):
        found = self._run_weights.get(id(spec.module))
        if found is None:
            found = self._run_weights[id(spec.module)] = self._resolve(spec)
        return found

    # ------------------------------------------------------------------ primitives
    def _conv(self, spec: ConvSpec, x: torch.Tensor, backend: str) -> torch.Tensor:
        """Conv with no padding (halos and zeros are already in ``x``)."""
        w, b = self._weights(spec)
        if self.layout == "cl":
            if spec.transposed:
                return F.conv_transpose2d(x, w, b, stride=(1, spec.s), dilation=(1, spec.d))
            if x.device.type == "cpu" and torch.backends.mkldnn.is_available():
                # oneDNN's channels-last kernels for every conv (eager would send 1x1
                # convs to its native kernel on one thread, converting layouts).
                return torch.ops.aten.mkldnn_convolution(x, w, b, [0, 0], [1, spec.s], [1, spec.d], 1)
            return F.conv2d(x, w, b, stride=(1, spec.s), dilation=(1, spec.d))
        if spec.transposed:
            return F.conv_transpose1d(x, w, b, stride=spec.s, dilation=spec.d)
        if backend == "mkldnn":
            y = torch.ops.aten.mkldnn_convolution(x.unsqueeze(2), w.unsqueeze(2), b, [0, 0], [1, spec.s], [1, spec.d], 1)
            return y.squeeze(2)
        with _MkldnnOff():
            return F.conv1d(x, w, b, stride=spec.s, dilation=spec.d)

    def _pad(self, x: torch.Tensor, left: int, right: int) -> torch.Tensor:
        if left == 0 and right == 0:
            return x
        if self.layout == "cl":
            return F.pad(x, (left, right)).contiguous(memory_format=torch.channels_last)
        return F.pad(x, (left, right))

    @staticmethod
    def _mask_(x: torch.Tensor, lengths: torch.Tensor | None, start: int) -> torch.Tensor:
        if lengths is None:
            return x
        n = x.shape[-1]
        if bool((lengths >= start + n).all()):
            return x
        keep = (torch.arange(start, start + n, device=x.device)[None, :] < lengths[:, None]).to(x.dtype)
        keep = keep.view(x.shape[0], 1, 1, n) if x.dim() == 4 else keep.view(x.shape[0], 1, n)
        return x.mul_(keep)

    # ------------------------------------------------------------------ running
    def to_layout(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T) -> this runner's layout and dtype."""
        if self.layout == "cl":
            return x.to(self.dtype)[:, :, None, :].contiguous(memory_format=torch.channels_last)
        return x.contiguous()

    def from_layout(self, x: torch.Tensor) -> torch.Tensor:
        """This runner's layout -> (B, C, T) contiguous."""
        if x.dim() == 4:
            x = x[:, :, 0, :]
        return x.contiguous()

    def run(self, segments: list[Segment], x: torch.Tensor, lengths: torch.Tensor | None = None):
        """Run ``segments`` on ``x`` (already in this layout); returns (output, lengths)."""
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
        lens = [x.shape[-1]]
        for op in ops:
            lens.append(int(_out_len(op, lens[-1])))
        item_lens = [lengths]
        for op in ops:
            item_lens.append(None if item_lens[-1] is None else _out_len(op, item_lens[-1]))
        chans = [x.shape[1]]
        for op in ops:
            chans.append(_channels(op, chans[-1]))
        backends = self._backend_map(ops, x.shape[0], chans, lens)

        total = lens[-1]
        # Output tile: the largest intermediate stays within self.tile elements.
        rates = [lens[i] / max(1, total) for i in range(len(ops) + 1)]
        widest = x.shape[0] * max(chans[i] * rates[i] for i in range(len(ops) + 1))
        step = max(self.min_tile, int(self.tile / max(widest, 1e-9)))
        if step >= total:
            step = total
        first = self._tile(ops, x, 0, step, lens, item_lens, backends)
        if step == total:
            return first, item_lens[-1]
        out = torch.empty((*first.shape[:-1], total), dtype=first.dtype, device=first.device)
        if self.layout == "cl":
            out = out.contiguous(memory_format=torch.channels_last)
        out[..., :step].copy_(first)

        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

        def one(o0: int) -> None:
            # Grad and inference modes are per thread: the workers take the caller's.
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                y = self._tile(ops, x, o0, min(total, o0 + step), lens, item_lens, backends)
                out[..., o0 : min(total, o0 + step)].copy_(y)

        starts = range(step, total, step)
        pool = self._pool() if all(b == "mkldnn" for b in backends.values()) and x.device.type == "cpu" else None
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
        """Worker threads, one per torch thread, each running its tiles on one thread.

        Tiles are independent, so running whole tiles in parallel needs no barrier per
        op (many small ops each with an OpenMP barrier degrade badly on a busy machine).
        Every conv here runs oneDNN, whose kernels compute an output position the same
        way on one thread or several, so results are unchanged.
        """
        threads = torch.get_num_threads()
        if not self.parallel_tiles or threads < 2:
            return None
        pool = self.__dict__.get("_workers")
        if pool is None or pool[0] != threads:
            from concurrent.futures import ThreadPoolExecutor

            pool = (threads, ThreadPoolExecutor(threads, thread_name_prefix="xcodec-tile", initializer=torch.set_num_threads, initargs=(1,)))
            self.__dict__["_workers"] = pool
        return pool[1]

    def _backend_map(self, ops, batch: int, chans: list[int], lens: list[int]) -> dict[int, str]:
        out: dict[int, str] = {}
        if self.layout != "ncw":
            return out
        for i, op in enumerate(ops):
            convs = [op.conv1, op.conv2] if isinstance(op, Residual) else [op] if isinstance(op, ConvSpec) else []
            for spec in convs:
                shape = torch.Size((batch, chans[i], lens[i]))
                mk = torch_uses_mkldnn(_ShapeOnly(shape), spec.k, spec.s, spec.d)
                out[id(spec)] = "mkldnn" if mk else "native"
        return out

    def _tile(self, ops, x, o0: int, o1: int, lens, item_lens, backends) -> torch.Tensor:
        n = len(ops)
        # Ranges each op must produce, backwards from the output tile, clamped to the valid domain.
        ranges = [None] * (n + 1)
        ranges[n] = (o0, o1)
        for i in range(n - 1, -1, -1):
            a, b = _in_range(ops[i], *ranges[i + 1])
            ranges[i] = (max(0, a), min(lens[i], b))
        a, b = ranges[0]
        t = x[..., a:b]
        for i, op in enumerate(ops):
            (ia, ib), (oa, ob) = ranges[i], ranges[i + 1]
            if isinstance(op, Snake):
                t = snake(t, op.alpha, out=t if i > 0 else None)
            elif isinstance(op, ConvSpec) and op.transposed:
                # Inputs outside the clamped range contribute nothing; crop the outputs
                # that this input slice fully determines.
                y = self._conv(op, t, "mkldnn")
                first = oa - (ia * op.s - op.p)
                t = self._mask_(y[..., first : first + ob - oa], item_lens[i + 1], oa)
            elif isinstance(op, ConvSpec):
                ua, ub = op.in_range(oa, ob)
                t = self._conv(op, self._pad(t, ia - ua, ub - ib), backends.get(id(op), "mkldnn"))
                t = self._mask_(t, item_lens[i + 1], oa)
            else:  # Residual
                ua, ub = op.in_range(oa, ob)
                h = snake(t, op.snake1)
                h = self._conv(op.conv1, self._pad(h, ia - ua, ub - ib), backends.get(id(op.conv1), "mkldnn"))
                self._mask_(h, item_lens[i + 1], oa)
                snake(h, op.snake2, out=h)
                h = self._conv(op.conv2, h, backends.get(id(op.conv2), "mkldnn"))
                self._mask_(h, item_lens[i + 1], oa)
                t = h.add_(t[..., oa - ia : ob - ia])
            if t.shape[-1] != ob - oa:
                raise RuntimeError(f"tile bookkeeping error: op {i} gave {t.shape[-1]} positions, expected {ob - oa}")
        return t


class _ShapeOnly:
    """Just enough of a tensor for :func:`torch_uses_mkldnn`."""

    def __init__(self, shape: torch.Size):
        self.shape = shape
        self.device = torch.device("cpu")
        self.dtype = torch.float32


# ------------------------------------------------------------------------------ plans
def _residual(unit) -> Residual:
    return Residual(unit, ConvSpec.of(unit.block[1]), ConvSpec.of(unit.block[3]))


def _flatten(layers) -> list:
    from .acoustic import DecoderBlock, EncoderBlock, ResidualUnit, Snake1d

    ops = []
    for layer in layers:
        if isinstance(layer, ResidualUnit):
            ops.append(_residual(layer))
        elif isinstance(layer, (EncoderBlock, DecoderBlock)):
            ops.extend(_flatten(layer.block))
        elif isinstance(layer, Snake1d):
            ops.append(Snake(layer))
        elif isinstance(layer, (nn.Conv1d, nn.ConvTranspose1d)):
            ops.append(ConvSpec.of(layer))
        else:
            raise TypeError(f"no tiled implementation for {type(layer).__name__}")
    return ops


def plan_segments(layers) -> list[Segment]:
    """Split a Sequential of the acoustic encoder or decoder into tiled segments.

    A segment ends after each resampling conv (strided or transposed) whose output is
    longer-lived than its input stage; the decoder's upsampling conv starts a segment.
    """
    ops = _flatten(layers)
    segments: list[Segment] = [Segment()]
    for op in ops:
        resampling = isinstance(op, ConvSpec) and (op.s != 1 or op.transposed)
        if resampling and op.transposed and segments[-1].ops:
            # Decoder: [snake, convT, residual x3] form a segment; the snake before the
            # convT belongs with it (it runs at the lower rate, on the convT's input).
            carry = [segments[-1].ops.pop()] if isinstance(segments[-1].ops[-1], Snake) else []
            if segments[-1].ops:
                segments.append(Segment())
            segments[-1].ops.extend(carry)
        segments[-1].ops.append(op)
        if resampling and not op.transposed:
            segments.append(Segment())
    return [s for s in segments if s.ops]
