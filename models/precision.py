"""Inference precision: the names, their check, what the CPU does fast, and IEEE fp32 on CUDA."""

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


reset_warnings = _warn_once.cache_clear  # forget which warnings were given (tests)


@functools.cache
def cpu_has_amx() -> bool | None:
    """Whether this CPU has AMX tiles (fast bf16 matrix units); None when unknown."""
    with contextlib.suppress(AttributeError, RuntimeError):  # torch >= 2.3 has the probe
        return bool(torch.cpu._is_amx_tile_supported())
    return None


@functools.cache
def cpu_bf16_speedup() -> float:
    """How many times faster one of the codec's convs runs in bf16 than in fp32 on this CPU, measured once.

    CPU flags do not say it (AVX512-BF16 is as fast as AMX). One thread, precisions interleaved, best of 3:
    on a busy machine a multi-threaded kernel waits for its slowest thread (read 0.3-0.8x on a 3.5x CPU).
    """
    try:
        onednn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn_bf16 = True  # unknown: the full-size probe
    # Without oneDNN's bf16 kernels (no AVX512) bf16 convs run ~100x slower: a small conv shows it in 0.1 s, not minutes
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
    """``precision``, checked; ``bf16`` on a CPU measured slower in bf16 warns once that fp32 is faster."""
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


# TF32 switches (oneDNN's too); torch >= 2.9 refuses its older API once mixed with ``fp32_precision``: newest only
_TF32_SWITCHES = (("cuda", "matmul"), ("cudnn", "conv"), ("mkldnn", "matmul"), ("mkldnn", "conv"))


def tf32_switches() -> list[tuple[object, str]]:
    """(object, attribute) of each TF32 switch, in the newest API this torch has."""
    backends = torch.backends
    if all(hasattr(getattr(getattr(backends, a), b), "fp32_precision") for a, b in _TF32_SWITCHES):
        return [(getattr(getattr(backends, a), b), "fp32_precision") for a, b in _TF32_SWITCHES]
    return [(backends.cuda.matmul, "allow_tf32"), (backends.cudnn, "allow_tf32")]


@contextlib.contextmanager
def ieee_fp32(enabled: bool = True, device: torch.device | None = None) -> Iterator[None]:
    """IEEE float32 matmuls, convolutions and attention inside (TF32 changes codes); every flag restored after.
    On CUDA attention runs on SDPA's math kernel: the memory-efficient one uses 3xTF32 on sm80+ whatever the flags."""
    switches = tf32_switches() if enabled else []
    saved = [getattr(obj, name) for obj, name in switches]
    for obj, name in switches:
        setattr(obj, name, False if name == "allow_tf32" else "ieee")
    cuda = enabled and device is not None and device.type == "cuda"
    try:
        with sdpa_kernel(SDPBackend.MATH) if cuda else contextlib.nullcontext():
            yield
    finally:
        for (obj, name), value in zip(switches, saved):
            setattr(obj, name, value)
