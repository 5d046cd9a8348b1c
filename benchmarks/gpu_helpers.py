"""The GPU check's machinery (benchmarks/gpu_check.py): sections run within budgets, real
audio, code comparisons with margins, timing."""

from __future__ import annotations

import functools
import os
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from benchmarks.bench_inference import read, timed
from corpus.schema import write_json
from models import XCodec

RATE = 16000
ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def pool() -> np.ndarray:
    """The bundled real audio (English and Mandarin speech, music), one 13 s float32 array."""
    return np.concatenate([read(n).numpy() for n in ("speech_en.flac", "speech_cn_4s.flac", "music_4s.flac")])


def cut(n: int, rng: np.random.Generator, src: np.ndarray) -> np.ndarray:
    """``n`` samples of ``src`` looped from a random offset, at a random gain in [0.3, 1]."""
    idx = (int(rng.integers(0, len(src))) + np.arange(n)) % len(src)
    return (src[idx] * rng.uniform(0.3, 1.0)).astype(np.float32)


def kmeans_clips(model: XCodec) -> list[torch.Tensor]:
    """4 s clips (x 0.95) of at least 12 x ``bins`` frames: mixtures of two random cuts of the bundled audio."""
    rng, src, n = np.random.default_rng(1), pool(), 4 * RATE
    count = -(-12 * model.bins // int(model.num_frames(n)))
    return [torch.from_numpy(cut(n, rng, src) + 0.5 * cut(n, rng, src)) * 0.95 for _ in range(count)]


def clip(n: int, seed: int) -> torch.Tensor:
    """(1, 1, n) real audio (a random cut of the bundled audio), scaled by 0.95."""
    return torch.from_numpy(cut(n, np.random.default_rng(seed), pool()))[None, None] * 0.95


def agreement(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Fraction of equal codes per quantizer of (B, n_q, F) or (n_q, F) codes."""
    a, b = a.cpu().reshape(-1, *a.shape[-2:]), b.cpu().reshape(-1, *b.shape[-2:])
    n = min(a.shape[-1], b.shape[-1])
    return [round(float((a[:, q, :n] == b[:, q, :n]).float().mean()), 6) for q in range(a.shape[1])]


def padded(waves: list[torch.Tensor]) -> torch.Tensor:
    """Audio tensors of any shape ending in T_i, zero-padded into one (B, 1, max T_i) batch."""
    return torch.nn.utils.rnn.pad_sequence([w.reshape(-1) for w in waves], batch_first=True)[:, None]


def ragged_vs_alone(model: XCodec, clips: list[torch.Tensor], alone: list[torch.Tensor], precision: str) -> list[float]:
    """Agreement per quantizer of (1, 1, T_i) ``clips`` as one padded batch against ``alone``, (1, n_q, F_i) each."""
    lengths = [c.shape[-1] for c in clips]
    codes = model.encode(padded(clips), lengths=lengths, precision=precision)
    frames = model.num_frames(torch.tensor(lengths))
    return agreement(torch.cat([codes[i : i + 1, :, : int(f)] for i, f in enumerate(frames)], -1), torch.cat(alone, -1))


@torch.inference_mode()
def mismatches(cpu_model: XCodec, clips: list, refs: list, others: list) -> dict:
    """Where ``others`` codes differ from the reference ``refs`` of ``clips`` (lists of (1, n_q, F) codes, ``refs``
    from ``cpu_model``): per frame the first differing quantizer and its margin, second-best minus best squared
    distance of the reference residual (float64; rounding has a tiny one, a bug a large one), also relative to
    the residual's norm; returns counts, the largest relative margins and the first 20."""
    found = []
    for i, (wav, ref, other) in enumerate(zip(clips, refs, others)):
        ref = ref.cpu()
        diff = ref[0] != other[0].cpu()  # (n_q, F)
        frames = diff.any(0).nonzero().flatten().tolist()
        if not frames:
            continue
        residual = cpu_model.latents(wav.cpu(), None)[0][0].double()  # (D, F)
        first = {f: int(diff[:, f].nonzero()[0]) for f in frames}
        for q, layer in enumerate(cpu_model.quantizer.vq.layers[: ref.shape[1]]):
            here = [f for f in frames if first[f] == q]
            r = residual[:, here].T  # (M, D)
            book = layer.codebook.double()
            dist = r.pow(2).sum(1, keepdim=True) - 2 * r @ book.T + book.pow(2).sum(1)[None]  # (M, bins)
            best2 = dist.topk(2, dim=1, largest=False).values if here else None
            for j, f in enumerate(here):
                margin = float(best2[j, 1] - best2[j, 0])
                norm = max(float(r[j].pow(2).sum()), 1e-30)
                found.append({"frame": f, "quantizer": q, "margin": margin, "margin_rel": margin / norm, "clip": i})
            residual = residual - layer.decode(ref[0, q][None])[0].double()
    found.sort(key=lambda m: (m["clip"], m["frame"]))
    margins = sorted((m["margin_rel"] for m in found), reverse=True)
    return {"frames": len(found), "max_margin_rel": margins[0] if found else None,
            "median_margin_rel": statistics.median(margins) if found else None, "first": found[:20]}  # fmt: skip


def make_corpus(folder: Path, hours: float, quick: bool) -> tuple[list[Path], float]:
    """FLAC clips of 2-20 s (1-4 s with --quick) of the bundled audio, until ``hours``: (paths, hours written)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, src = np.random.default_rng(0), pool() / 0.95
    lo, hi = (1, 4) if quick else (2, 20)
    lengths, total = [], 0
    while total < hours * 3600 * RATE:
        lengths.append(int(rng.integers(lo * RATE, hi * RATE)))
        total += lengths[-1]
    paths = [folder / f"clip{i:05d}.flac" for i in range(len(lengths))]
    seeds = rng.integers(0, 2**31, len(lengths))

    def write(path: Path, n: int, seed: int) -> None:
        sf.write(path, cut(n, np.random.default_rng(seed), src), RATE)

    with ThreadPoolExecutor(os.cpu_count() or 1) as threads:
        list(threads.map(write, paths, lengths, seeds))
    return paths, total / RATE / 3600


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def repeated(fn: Callable[[], None], device: torch.device, hours: float, until: float, reps: int = 3) -> dict:
    """A timed warm-up pass (a corpus of unique lengths pays per-shape set-up like it), then up to ``reps``
    timed passes while the clock allows: median audio hours per GPU-hour and peak GPU memory."""
    first = timed(fn, device)[1]
    reset_peak(device)
    times = []
    while len(times) < reps and (not times or time.monotonic() + times[-1] < until):
        times.append(timed(fn, device)[1])
    seconds = statistics.median(times)
    peak = round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None
    return {"hours_per_hour": round(hours / (seconds / 3600), 1), "seconds": round(seconds, 3), "passes": len(times),
            "first_pass_hours_per_hour": round(hours / (first / 3600), 1), "peak_gpu_gb": peak}  # fmt: skip


class Check:
    """Runs the sections within their budgets and the deadline, none stopping the rest; the JSON after each."""

    def __init__(self, summary: dict, path: Path, deadline: float, cap: int) -> None:
        self.summary, self.path, self.deadline, self.cap = summary, path, deadline, cap
        self.results: dict[str, dict] = summary.setdefault("sections", {})

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, cmd: list[str], env_extra: dict | None = None) -> tuple[int, str, float]:
        """A subprocess, capped at ``--cap`` seconds and the time left; (rc, output, seconds)."""
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
        limit = max(5, int(min(self.cap, self.left())))
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
            rc, out = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            text = [s.decode(errors="replace") if isinstance(s, bytes) else (s or "") for s in (exc.stdout, exc.stderr)]
            rc, out = 124, "".join(text) + f"\n[killed after {limit} s]"
        return rc, out, time.perf_counter() - t0

    def section(self, name: str, fn: Callable[[], dict], budget: float) -> None:
        print(f"[{name}] budget {budget:.0f} s, {self.left():.0f} s left", flush=True)
        t0 = time.perf_counter()
        if self.left() < budget * 0.5:
            out = {"ok": True, "skipped": f"not enough time left ({self.left():.0f} s for a {budget:.0f} s budget)"}
        else:
            try:
                out = {"ok": True, **fn()}  # a section may report ok False itself, with its numbers
            except Exception as exc:  # recorded in the JSON: the next section still runs
                error = f"{type(exc).__name__}: {exc}"[:2000]
                out = {"ok": False, "error": error, "traceback": traceback.format_exc()[-4000:]}
        out.update(seconds=round(time.perf_counter() - t0, 2), budget_s=budget)
        self.results[name] = out
        self.write()
        status = "skipped" if "skipped" in out else ("ok" if out["ok"] else "FAILED")
        # A section that reports ok False itself (train: a failed run) has numbers, not an error.
        why = "" if out["ok"] else f": {out.get('error', 'see its numbers in the JSON')[:300]}"
        print(f"[{status}] {name} ({out['seconds']} s){why}", flush=True)

    def write(self) -> None:
        self.summary["all_ok"] = all(r["ok"] for r in self.results.values())
        write_json(self.path, self.summary)
