"""Training checkpoints: atomic writes, rotation, discovery and RNG state.

A checkpoint is ``<log_dir>/model_ckpts/ckpt_{step:08d}.pth``, a dict of tensors and
plain Python values only, so it loads with ``torch.load(weights_only=True)`` (which is
how ``XCodec.from_pretrained`` reads it: the ``codec`` state dict and the ``config``
dict). Beside it, ``export_{step:08d}/`` holds the slim inference export
(``model.safetensors`` + ``config.yaml``).

Writes are atomic: the file is written to a temporary name in the same directory,
flushed and fsynced, then ``os.replace``d over the final name and the directory entry
fsynced. A process killed at any moment leaves either the complete new checkpoint or
none, and the previous ones untouched; leftover temporary files are removed at the
next start.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

CKPT_RE = re.compile(r"^ckpt_(\d{8,})\.pth$")
EXPORT_RE = re.compile(r"^export_(\d{8,})$")
TMP_MARK = ".tmp-"


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"ckpt_{step:08d}.pth"


def export_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"export_{step:08d}"


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """``[(step, path)]`` of complete checkpoints, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(str(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support fsync on directories
    finally:
        os.close(fd)


class _PausingWriter:
    """File wrapper that stops for ``pause`` seconds after the first write (crash tests)."""

    def __init__(self, f, pause: float, on_pause: Callable[[], None] | None):
        self.f, self.pause, self.on_pause, self.paused = f, pause, on_pause, False

    def write(self, data) -> int:
        n = self.f.write(data)
        if not self.paused:
            self.paused = True
            self.f.flush()
            if self.on_pause is not None:
                self.on_pause()
            time.sleep(self.pause)
        return n

    def flush(self) -> None:
        self.f.flush()


def atomic_torch_save(obj: Any, path: str | Path, pause_mid_write: float = 0.0, on_pause: Callable[[], None] | None = None) -> Path:
    """``torch.save`` that never leaves a partial file under ``path``.

    Args:
        obj: what to save.
        path: final file name.
        pause_mid_write: test hook: sleep this long after the first bytes are written
            (so a test can kill the process mid-write).
        on_pause: called when that pause starts.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            target = _PausingWriter(f, pause_mid_write, on_pause) if pause_mid_write > 0 else f
            torch.save(obj, target)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_directory(final: str | Path, write: Callable[[Path], Any]) -> Path:
    """Fill a temporary directory with ``write(tmp_dir)``, fsync it and rename it to ``final``."""
    final = Path(final)
    tmp = final.with_name(f"{final.name}{TMP_MARK}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(final.parent)
    return final


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete temporary files/directories left by a process killed while saving."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        if TMP_MARK in p.name:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def rotate_checkpoints(directory: str | Path, keep: int) -> list[Path]:
    """Keep the newest ``keep`` checkpoints (and their exports); return what was deleted."""
    directory = Path(directory)
    ckpts = list_checkpoints(directory)
    removed = []
    keep_steps = {s for s, _ in ckpts[-keep:]} if keep > 0 else {s for s, _ in ckpts}
    for step, p in ckpts:
        if step not in keep_steps:
            p.unlink(missing_ok=True)
            removed.append(p)
    if directory.is_dir():
        for p in directory.iterdir():
            m = EXPORT_RE.match(p.name)
            if m and int(m.group(1)) not in keep_steps and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


# ---------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """This process's python / numpy / torch (and CUDA) RNG states, weights_only-loadable."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def random_state(rng: random.Random) -> tuple:
    return rng.getstate()


def set_random_state(rng: random.Random, state) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


# ---------------------------------------------------------------------------- checks
def nonfinite_entries(tree: Any, prefix: str = "") -> list[str]:
    """Names of floating-point tensors in a nested dict/list that hold NaN or Inf."""
    bad = []
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() and not bool(torch.isfinite(tree).all()):
            bad.append(prefix or "<tensor>")
    elif isinstance(tree, dict):
        for k, v in tree.items():
            bad += nonfinite_entries(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            bad += nonfinite_entries(v, f"{prefix}[{i}]")
    return bad


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a state dict (rank comparisons)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous().reshape(-1)
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
