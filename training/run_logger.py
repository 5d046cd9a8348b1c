"""Run logging: console, ``log.txt`` and tensorboard, all on rank 0 only (other ranks stay quiet)."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from utils import distributed as du
from utils.plotting import spectrogram_figure

_SHORT = {"loss/generator": "g", "loss/discriminator": "d", "loss/full_stft": "stft", "loss/sub_stft": "sub", "loss/mel": "mel",
          "loss/adversarial": "adv", "loss/feature_matching": "fm", "loss/semantic": "sem", "loss/commit": "commit"}  # fmt: skip


class RunLogger:
    """Console, ``log.txt`` and tensorboard of a training run.

    Args:
        log_dir: run directory; text and events go to ``log_dir/logs``.
        tensorboard: write tensorboard events.
        purge_step: events at or after this step left by a crashed run are dropped.
    """

    def __init__(self, log_dir: str, tensorboard: bool = True, purge_step: int | None = None):
        self.main = du.is_main_process()
        self.writer = None
        self.text = None
        self.bar = None
        if not self.main:
            return
        logs = Path(log_dir) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.text = open(logs / "log.txt", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional heavy dependency: only with tensorboard on

            self.writer = SummaryWriter(str(logs), purge_step=purge_step)

    def info(self, msg: str) -> None:
        if not self.main:
            return
        tqdm.write(msg, file=sys.stdout)
        sys.stdout.flush()
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        self.text.write(f"{stamp} {msg}\n")

    def warn(self, msg: str) -> None:
        self.info(f"WARNING: {msg}")

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def clip(self, prefix: str, name: str, wav: np.ndarray, step: int, sample_rate: int) -> None:
        """A clip as audio (``{prefix}/{name}``) and its spectrogram figure (``{prefix}/spectrogram_{name}``)."""
        if self.writer is None:
            return
        wav = np.clip(np.asarray(wav, dtype=np.float32), -1, 1)
        self.writer.add_audio(f"{prefix}/{name}", wav, step, sample_rate)
        figure = spectrogram_figure([(f"{prefix} {name}, step {step}", wav)], sample_rate)
        self.writer.add_figure(f"{prefix}/spectrogram_{name}", figure, step)

    def step(self, step: int, epoch: int, metrics: dict[str, float], seconds: float, print_line: bool) -> None:
        """After a training step: advance the bar; with ``print_line``, one line of losses."""
        if self.bar is not None:
            self.bar.update(1)
            g, d = metrics.get("loss/generator", float("nan")), metrics.get("loss/discriminator", float("nan"))
            self.bar.set_postfix(g=f"{g:.3g}", d=f"{d:.3g}", refresh=False)
        if print_line:
            parts = [f"{name} {metrics[key]:.4g}" for key, name in _SHORT.items() if key in metrics]
            self.info(f"step {step} ep {epoch} | " + " ".join(parts) + f" | bw {metrics.get('train/bandwidth', 0):g} | {seconds:.3f} s/step")

    def summary(self, state: Any, accum: dict[str, list[float]]) -> None:
        """Tensorboard scalars of the script's ``State``: means of ``accum`` since the last
        summary, codebook usage (all ranks: a collective), learning rates, data counters."""
        values = {k: sum(v) / len(v) for k, v in accum.items()}
        values.update({f"codebook/{k}": v for k, v in state.usage.compute().items()})
        values["lr/g"] = state.sched_g.get_last_lr()[0]
        values["lr/d"] = state.sched_d.get_last_lr()[0]
        values["data/bad_files"] = float(len(state.bad_files))
        values["data/skipped_batches"] = float(state.skipped_batches)
        values["train/nonfinite_skipped"] = float(state.nonfinite_total)
        values["train/epoch"] = float(state.epoch)
        self.scalars(values, state.step)

    def models(self, state: Any, teacher: bool | str) -> None:
        """Parameter counts of the ``State``'s codec, discriminators and teacher, and where the teacher came from."""
        cfg = state.cfg
        n_g = sum(p.numel() for p in state.g_params())
        n_t = sum(p.numel() for p in state.codec.semantic_model.parameters())
        n_d = sum(p.numel() for p in state.discriminators.parameters())
        self.info(f"codec {n_g / 1e6:.2f} M trainable parameters, discriminators {cfg.d_list} {n_d / 1e6:.2f} M")
        built = "built from the config (weights from the checkpoint, init_from or random)"
        source = {True: f"pretrained {cfg.codec.semantic_techer}", False: built}.get(teacher, teacher)
        self.info(f"frozen teacher {n_t / 1e6:.2f} M parameters: {source}")

    def progress(self, total: int, initial: int) -> None:
        if self.main:
            # disable=None: a bar on terminals, nothing in redirected logs.
            self.bar = tqdm(total=total or None, initial=initial, unit="step", dynamic_ncols=True, disable=None)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.text is not None:
            self.text.close()


class ConsoleLogger:
    """The logger's interface before the run logger exists: rank 0 prints, others stay quiet."""

    def info(self, msg: str) -> None:
        if du.is_main_process():
            print(msg, flush=True)

    def warn(self, msg: str) -> None:
        self.info(f"WARNING: {msg}")
