"""Inference precision: the names, their check, what the CPU does fast, and IEEE fp32 on CUDA."""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

PRECISIONS = ("fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)  # at check_precision's caller


def reset_warnings() -> None:
    """Forget which warnings were given (tests)."""
    _warn_once.cache_clear()


@functools.cache
def cpu_has_amx() -> bool | None:
    """Whether this CPU has AMX tiles (fast bf16 matrix units); None when unknown."""
    with contextlib.suppress(AttributeError, RuntimeError):
        return bool(torch.cpu._is_amx_tile_supported())
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    return None if flags is None else "amx_tile" in flags


@functools.cache
def cpu_bf16_speedup() -> float:
    """How many times faster a convolution of the codec's kind runs in bf16 than in fp32 on this CPU,
    measured once per process (a few tenths of a second): AVX512-BF16 (AMD Zen 4) is as fast a bf16
    path as AMX, and a CPU without either runs bf16 at about half the rate.

    The probe is one of the codec's convs (256 channels, kernel 7, 2048 frames) on one thread, the
    precisions interleaved, best of 3 after a warm-up: on a busy machine a multi-threaded kernel
    waits for its slowest thread (a 64-channel conv on all threads read 0.3-0.8x on an AMX CPU
    whose codec runs 3.5x faster).
    """
    try:
        onednn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn_bf16 = True  # unknown: the full-size probe
    # Without oneDNN's bf16 kernels (no AVX512) torch runs bf16 convs in a reference loop about
    # 100x slower than fp32: a small conv says so in 0.1 s where the full-size one takes minutes.
    channels, frames = (256, 2048) if onednn_bf16 else (64, 512)
    x, w = torch.randn(1, channels, frames), torch.randn(channels, channels, 7) / (7 * channels) ** 0.5
    inputs = {dtype: (x.to(dtype), w.to(dtype)) for dtype in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(inputs, float("inf"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for rep in range(4):
                for dtype, (xd, wd) in inputs.items():
                    t0 = time.perf_counter()
                    torch.nn.functional.conv1d(xd, wd, padding=3)
                    if rep:  # the first run of each builds its kernel
                        best[dtype] = min(best[dtype], time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return best[torch.float32] / max(best[torch.bfloat16], 1e-9)


def check_precision(precision: str, device: torch.device | None = None) -> str:
    """Return ``precision`` after checking it is one of :data:`PRECISIONS`; on a CPU where bf16 is
    measured slower than fp32, ``bf16`` warns once per process that fp32 is the faster choice."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    speedup = cpu_bf16_speedup() if precision == "bf16" and device is not None and device.type == "cpu" else 1.0
    if speedup < 0.9:
        _warn_once(f"bf16 convolutions run at {speedup:.2f}x the float32 rate on this CPU (measured; no AMX or "
                   "AVX512-BF16 kernels): precision='fp32' is faster on this machine")  # fmt: skip
    return precision


def autocast(device: torch.device, precision: str | None) -> contextlib.AbstractContextManager:
    """bf16 autocast, autocast off (``"fp32"``), or for ``None`` whatever the caller set (training)."""
    if precision is None or not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


# The TF32 switches exact mode turns off (oneDNN's too: CPUs with reduced-precision float32 units use
# them). torch >= 2.9 has per-backend ``fp32_precision`` settings and refuses to read its older API
# once the two are mixed: exact mode writes only the newer one where it exists.
_TF32_SWITCHES = (("cuda", "matmul"), ("cudnn", "conv"), ("mkldnn", "matmul"), ("mkldnn", "conv"))


def tf32_switches() -> list[tuple[object, str]]:
    """(object, attribute) of each TF32 switch, in the newest API this torch has."""
    backends = torch.backends
    if all(hasattr(getattr(getattr(backends, a), b), "fp32_precision") for a, b in _TF32_SWITCHES):
        return [(getattr(getattr(backends, a), b), "fp32_precision") for a, b in _TF32_SWITCHES]
    return [(backends.cuda.matmul, "allow_tf32"), (backends.cudnn, "allow_tf32")]


@contextlib.contextmanager
def ieee_fp32(enabled: bool = True, device: torch.device | None = None) -> Iterator[None]:
    """IEEE float32 matmuls, convolutions and attention inside; every flag restored after.

    cuDNN convolutions default to TF32 on Ampere and later, which changes the last bits of every conv
    and so codes. On CUDA attention also runs on SDPA's math kernel: the memory-efficient kernel
    computes float32 with 3xTF32 on sm80+ whatever the flags.
    """
    if not enabled:
        yield
        return
    switches = tf32_switches()
    saved = [getattr(obj, name) for obj, name in switches]
    for obj, name in switches:
        setattr(obj, name, False if name == "allow_tf32" else "ieee")
    try:
        if device is not None and device.type == "cuda":
            with sdpa_kernel(SDPBackend.MATH):
                yield
        else:
            yield
    finally:
        for (obj, name), value in zip(switches, saved):
            setattr(obj, name, value)
