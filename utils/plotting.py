"""Spectrogram figures for ``evaluate.py --plot`` and training's images (matplotlib: imported only to draw)."""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from utils.files import atomic_write

FIGURE_WIDTH = 10.0  # inches: one size for every file, whatever its length
PANEL_HEIGHT = 2.6
DPI = 100
DB_RANGE = 80.0


def spectrogram_db(wav: np.ndarray, sample_rate: int) -> tuple[np.ndarray, float]:
    """Magnitude spectrogram in dB, ``((n_fft/2 + 1, frames), hop seconds)``: 32 ms Hann windows, 8 ms hop."""
    n_fft = 1 << (int(0.032 * sample_rate) - 1).bit_length()  # 512 at 16 kHz
    hop = max(1, int(0.008 * sample_rate))
    x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
    if x.numel() < n_fft // 2 + 1:  # reflect padding needs more samples than half a window
        x = torch.nn.functional.pad(x, (0, n_fft // 2 + 1 - x.numel()))
    spec = torch.stft(x, n_fft, hop, n_fft, torch.hann_window(n_fft), center=True, return_complex=True).abs()
    return (20 * torch.log10(spec + 1e-10)).numpy(), hop / sample_rate


def spectrogram_figure(panels: Sequence[tuple[str, np.ndarray]], sample_rate: int, title: str | None = None):
    """A ``matplotlib.figure.Figure`` (no pyplot state: thread-safe, no display) of stacked spectrograms.

    Args:
        panels: ``(title, (T,) audio)`` per row; the first sets the top of the shared dB scale (80 dB deep).
    """
    from matplotlib.figure import Figure  # optional heavy dependency: only when a figure is drawn

    specs = [spectrogram_db(w, sample_rate) for _, w in panels]
    vmax = float(specs[0][0].max())
    height = PANEL_HEIGHT * len(panels) + (0.4 if title else 0.0)
    fig = Figure(figsize=(FIGURE_WIDTH, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    image = None
    for ax, (label, _), (db, hop_s) in zip(axes, panels, specs):
        extent = (0.0, db.shape[1] * hop_s, 0.0, sample_rate / 2000)
        image = ax.imshow(db, origin="lower", aspect="auto", extent=extent, cmap="viridis", vmin=vmax - DB_RANGE,
                          vmax=vmax, interpolation="nearest")  # fmt: skip
        ax.set_title(label, fontsize=10, loc="left")
        ax.set_ylabel("frequency (kHz)")
    axes[-1].set_xlabel("time (s)")
    fig.colorbar(image, ax=list(axes), label="magnitude (dB)", pad=0.01)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def save_figure(fig, path: str | Path) -> Path:
    """Write a figure as PNG, atomically."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
