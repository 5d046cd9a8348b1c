"""Run logging: console, ``log.txt`` and tensorboard, all on rank 0 only (other ranks stay quiet)."""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from utils import distributed as du
from utils.files import open_own
from utils.plotting import spectrogram_figure

_SHORT = {"loss/generator": "g", "loss/discriminator": "d", "loss/full_stft": "stft", "loss/sub_stft": "sub",
          "loss/mel": "mel", "loss/adversarial": "adv", "loss/feature_matching": "fm", "loss/semantic": "sem",
          "loss/commit": "commit"}  # fmt: skip


class RunLogger:
    """Console, ``log.txt`` and tensorboard (``log_dir/logs``; ``purge_step``: a crashed run's events from it on
    are dropped); without ``log_dir`` the console alone."""

    def __init__(self, log_dir: str | None = None, tensorboard: bool = True, purge_step: int | None = None):
        self.main = du.is_main_process()
        self.writer, self.text, self.bar = None, None, None
        if not self.main or log_dir is None:
            return
        logs = Path(log_dir) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        fd = open_own(logs / "log.txt", os.O_WRONLY | os.O_APPEND | os.O_CREAT)  # never through a link
        self.text = os.fdopen(fd, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional heavy dependency: only with tensorboard on

            self.writer = SummaryWriter(str(logs), purge_step=purge_step)

    def info(self, msg: str) -> None:
        if not self.main:
            return
        tqdm.write(msg, file=sys.stdout)
        sys.stdout.flush()
        if self.text is not None:
            self.text.write(f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")

    def warn(self, msg: str) -> None:
        self.info(f"WARNING: {msg}")

    def scalars(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items() if self.writer is not None else ():
            self.writer.add_scalar(k, v, step)

    def clip(self, prefix: str, name: str, wav: np.ndarray, step: int, sample_rate: int) -> None:
        """A clip as audio (``{prefix}/{name}``) and its spectrogram figure (``{prefix}/spectrogram_{name}``)."""
        if self.writer is None:
            return
        wav = np.clip(np.asarray(wav, dtype=np.float32), -1, 1)
        self.writer.add_audio(f"{prefix}/{name}", wav, step, sample_rate)
        figure = spectrogram_figure([(f"{prefix} {name}, step {step}", wav)], sample_rate)
        self.writer.add_figure(f"{prefix}/spectrogram_{name}", figure, step)

    def step(self, step: int, epoch: int, metrics: dict[str, float], seconds: float) -> None:
        """Every ``print_freq`` steps: the bar to ``step`` with the losses, and one line of them."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            g, d = metrics.get("loss/generator", float("nan")), metrics.get("loss/discriminator", float("nan"))
            self.bar.set_postfix(g=f"{g:.3g}", d=f"{d:.3g}", refresh=False)
        parts = " ".join(f"{name} {metrics[key]:.4g}" for key, name in _SHORT.items() if key in metrics)
        self.info(f"step {step} ep {epoch} | {parts} | bw {metrics.get('train/bandwidth', 0):g} | {seconds:.3f} s/step")

    def summary(self, state: Any, means: dict[str, float]) -> None:
        """Scalars: ``means`` since the last summary, codebook usage (a collective), learning rates, counters."""
        self.scalars({
            **means, **{f"codebook/{k}": v for k, v in state.usage.compute().items()},
            "lr/g": state.sched_g.get_last_lr()[0], "lr/d": state.sched_d.get_last_lr()[0],
            "data/bad_files": float(len(state.bad_files)), "data/skipped_batches": float(state.skipped_batches),
            "train/nonfinite_skipped": float(state.nonfinite_total), "train/epoch": float(state.epoch),
        }, state.step)  # fmt: skip

    def models(self, state: Any, teacher: bool | str) -> None:
        """Parameter counts of the ``State``'s codec, discriminators and teacher, and where the teacher came from."""
        g, d, t = state.g_params(), state.discriminators.parameters(), state.codec.semantic_model.parameters()
        n_g, n_d, n_t = (sum(p.numel() for p in ps) / 1e6 for ps in (g, d, t))
        self.info(f"codec {n_g:.2f} M trainable parameters, discriminators {state.cfg.d_list} {n_d:.2f} M")
        built = "built from the config (weights from the checkpoint, init_from or random)"
        source = {True: f"pretrained {state.cfg.codec.semantic_techer}", False: built}.get(teacher, teacher)
        self.info(f"frozen teacher {n_t:.2f} M parameters: {source}")

    def progress(self, total: int, initial: int) -> None:
        if self.main:
            # disable=None: a bar on terminals, nothing in redirected logs.
            self.bar = tqdm(total=total or None, initial=initial, unit="step", dynamic_ncols=True, disable=None)

    def close(self) -> None:
        for handle in (self.bar, self.writer, self.text):
            if handle is not None:
                handle.close()


class RunningMeans:
    """Means of logged values between summaries, summed where they live (no host sync); non-finite ones left out."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, values: dict[str, torch.Tensor | float]) -> None:
        for key, value in values.items():
            v = torch.as_tensor(value.detach() if isinstance(value, torch.Tensor) else value, dtype=torch.float64)
            ok = torch.isfinite(v)
            self.sums[key] = self.sums.get(key, 0) + torch.where(ok, v, torch.zeros_like(v))
            self.counts[key] = self.counts.get(key, 0) + ok.double()

    def pop(self) -> dict[str, float]:
        """The means (keys with no finite value left out), and a fresh start."""
        out = {k: float(self.sums[k] / self.counts[k]) for k in self.sums if float(self.counts[k]) > 0}
        self.sums, self.counts = {}, {}
        return out
