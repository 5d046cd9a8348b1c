"""Training checkpoints: atomic writes, rotation, discovery and RNG state.

Saving, finding and restoring the script's ``State`` (:func:`save_checkpoint`,
:func:`find_resume_checkpoint`, :func:`restore`) live here with the file helpers.

A checkpoint is ``<log_dir>/model_ckpts/ckpt_{step:08d}.pth``, a dict of tensors and
plain Python values only, so it loads with ``torch.load(weights_only=True)`` (which is
how ``XCodec.from_pretrained`` reads it: the ``codec`` state dict and the ``config``
dict). Beside it, ``export_{step:08d}/`` holds the slim inference export
(``model.safetensors`` + ``config.yaml``).

Writes are atomic (``utils.files``): the file is written to a temporary name in the
same directory, flushed and fsynced, then ``os.replace``d over the final name and the
directory entry fsynced. A process killed at any moment leaves either the complete new checkpoint or
none, and the previous ones untouched; leftover temporary files are removed at the
next start.
"""

from __future__ import annotations

import dataclasses
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

from models.config import generator_config_from_dict
from models.export import save_export
from models.pretrained import load_codec_state, read_state, read_torch_file
from utils import distributed as du
from utils.config import ConfigError
from utils.files import atomic_directory, atomic_write, remove_stale_temporaries

CHECKPOINT_FORMAT = "xcodec-train-1"


class TrainingError(RuntimeError):
    """The run cannot go on (repeated non-finite losses, a corrupt state); the message says why."""

CKPT_RE = re.compile(r"^ckpt_(\d{8,})\.pth$")
# Temporaries of checkpoints written by earlier versions: ckpt_X.pth.tmp-PID, export_X.tmp-PID.
LEGACY_TMP_RE = re.compile(r"^(ckpt_\d{8,}\.pth|export_\d{8,})\.tmp-\d+$")
EXPORT_RE = re.compile(r"^export_(\d{8,})$")


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
    """``torch.save`` through :func:`utils.files.atomic_write`, durably (fsync of file and directory).

    Args:
        obj: what to save.
        path: final file name.
        pause_mid_write: test hook: sleep this long after the first bytes are written
            (so a test can kill the process mid-write).
        on_pause: called when that pause starts.
    """

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, _PausingWriter(f, pause_mid_write, on_pause) if pause_mid_write > 0 else f)

    return atomic_write(path, write, durable=True)


def remove_stale_checkpoint_temporaries(directory: str | Path) -> list[Path]:
    """Delete what a process killed while saving left in ``directory`` (this version's and earlier ones')."""
    removed = remove_stale_temporaries(directory)
    for p in Path(directory).iterdir() if Path(directory).is_dir() else []:
        if LEGACY_TMP_RE.match(p.name):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
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
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


# ---------------------------------------------------------------------------- the training state
def save_checkpoint(state: Any, ckpt_dir: Path, logger: Any, save_pause: tuple[int, float] | None = None) -> Path | None:
    """Write ``ckpt_{step}.pth`` (+ ``export_{step}/``) of the script's ``State`` on rank 0;
    a collective on every rank. Refuses, on every rank, to write a state holding NaN/Inf.

    ``save_pause``: test hook ``(step, seconds)``: pause that long mid-write at that step.
    """
    rngs = du.gather_objects(rng_state())  # every rank's RNG, so each resumes its own stream
    payload = {
        "format": CHECKPOINT_FORMAT,
        "codec": state.codec.state_dict(),
        "config": state.raw_config,
        "discriminators": {n: d.state_dict() for n, d in state.discriminators.items()},
        "optimizer_g": state.opt_g.state_dict(),
        "optimizer_d": state.opt_d.state_dict(),
        "scheduler_g": state.sched_g.state_dict(),
        "scheduler_d": state.sched_d.state_dict(),
        "step": state.step,
        "epoch": state.epoch,
        "batch_in_epoch": state.batch_in_epoch,
        "world_size": du.world_size(),
        "batch_size": state.cfg.batch_size,
        "rng": rngs,
        "bandwidth_rng": state.bandwidth_rng.getstate(),
        "counters": {
            "nonfinite_total": state.nonfinite_total,
            "nonfinite_consecutive": state.nonfinite_consecutive,
            "skipped_batches": state.skipped_batches,
            "bad_files": dict(state.bad_files),
        },
    }
    bad = nonfinite_entries({k: payload[k] for k in ("codec", "discriminators", "optimizer_g", "optimizer_d")})
    if bad:
        raise TrainingError(f"refusing to write a checkpoint at step {state.step}: NaN/Inf in {', '.join(bad[:5])}")
    if not du.is_main_process():
        return None
    path = checkpoint_path(ckpt_dir, state.step)
    pause, on_pause = 0.0, None
    if save_pause is not None and save_pause[0] == state.step:
        pause = save_pause[1]
        marker = ckpt_dir / f"paused_{state.step:08d}"

        def on_pause() -> None:
            marker.touch()
            logger.info(f"test hook: paused while writing {path}")

    atomic_torch_save(payload, path, pause, on_pause)
    atomic_directory(export_path(ckpt_dir, state.step), lambda d: save_export(state.codec, d), durable=True)
    for old in rotate_checkpoints(ckpt_dir, state.cfg.num_ckpt_keep):
        logger.info(f"removed old {old.name}")
    logger.info(f"saved {path} and {export_path(ckpt_dir, state.step).name}/")
    return path


def init_codec_from(codec: Any, source: str) -> str:
    """Load released or previously trained codec weights (fine-tuning); returns what was loaded.

    ``source``: anything ``XCodec.from_pretrained`` reads (a release name, a release
    ``.pth`` or one of our training checkpoints, an export, a transformers directory).
    """
    load_codec_state(codec, read_state(source), f"init_from {source}")
    return source


REQUIRED_KEYS = (
    "codec", "config", "discriminators", "optimizer_g", "optimizer_d", "scheduler_g", "scheduler_d",
    "step", "epoch", "batch_in_epoch", "rng", "bandwidth_rng",
)  # fmt: skip
UNUSABLE_DIR = "unusable"


def checkpoint_problem(obj: dict) -> str | None:
    """Why a read checkpoint cannot be resumed from (``None``: it can)."""
    if obj.get("format") != CHECKPOINT_FORMAT:
        return "not a checkpoint of this training script"
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        return f"incomplete (no {', '.join(missing)})"
    if not isinstance(obj["config"], dict):
        return "its config is not a mapping"
    return None


def find_resume_checkpoint(ckpt_dir: Path, logger: Any, restart: bool = False) -> tuple[Path, dict] | None:
    """The newest usable checkpoint (rank 0 picks, every rank reads the same file).

    Policy: a checkpoint that cannot be used (unreadable, truncated, incomplete, another
    format) is moved to ``model_ckpts/unusable/`` once an older one is chosen, so that
    rotation never deletes the new checkpoints because of it. With checkpoints present and
    none usable the run stops (it never starts again from step 0 over an existing run);
    ``restart=True`` moves every checkpoint and export to ``model_ckpts/previous_<time>/``
    and starts from step 0 (nothing is deleted).

    Raises:
        TrainingError: checkpoints exist, none is usable and ``restart`` is false.
    """
    choice, obj, error = None, None, None
    if du.is_main_process():
        found = list_checkpoints(ckpt_dir)
        if restart:
            _set_aside(ckpt_dir, f"previous_{time.strftime('%Y%m%d-%H%M%S')}", [p for _, p in found] + exports(ckpt_dir), logger)
            found = []
        unusable: list[tuple[Path, str]] = []
        for _, path in reversed(found):
            try:
                candidate = read_torch_file(path)
                problem = checkpoint_problem(candidate)
            except Exception as exc:  # a corrupt file (e.g. copied partially): try the previous one
                problem = str(exc).removeprefix(f"{path}: ")
            if problem is None:
                choice, obj = str(path), candidate
                break
            logger.warn(f"{path}: {problem}; trying an older checkpoint")
            unusable.append((path, problem))
        if unusable and choice is None:
            path, problem = unusable[0]
            error = (
                f"{ckpt_dir}: none of the {len(unusable)} checkpoint(s) can be resumed from (newest: {path.name}: {problem}); "
                "repair or move them, or pass --restart to start again from step 0 (they are then moved aside, not deleted)"
            )
        elif unusable:
            _set_aside(ckpt_dir, UNUSABLE_DIR, [p for p, _ in unusable], logger)
    error = du.broadcast_object(error)
    if error is not None:
        raise TrainingError(error)
    choice = du.broadcast_object(choice)
    if choice is None:
        return None
    return Path(choice), obj if du.is_main_process() else read_torch_file(choice)


def exports(ckpt_dir: Path) -> list[Path]:
    """The ``export_*`` directories of a checkpoint directory."""
    return sorted(p for p in Path(ckpt_dir).iterdir() if EXPORT_RE.match(p.name)) if Path(ckpt_dir).is_dir() else []


def _set_aside(ckpt_dir: Path, name: str, paths: list[Path], logger: Any) -> None:
    if not paths:
        return
    target = Path(ckpt_dir) / name
    target.mkdir(parents=True, exist_ok=True)
    for p in paths:
        os.replace(p, target / p.name)
    logger.warn(f"moved {len(paths)} file(s) to {target}: {', '.join(p.name for p in paths[:4])}{' ...' if len(paths) > 4 else ''}")


def check_resumable(ckpt: dict, raw: dict, source: str) -> None:
    """Refuse to resume a run whose codec architecture the new config changes (checked
    before anything is written into the run's directory).

    Raises:
        TrainingError: naming the first key that differs.
    """
    try:
        old = dataclasses.asdict(generator_config_from_dict(ckpt["config"], source)[0])
    except ConfigError as exc:
        raise TrainingError(f"{source}: its stored config cannot be read ({exc})") from None
    new = dataclasses.asdict(generator_config_from_dict(raw, "config")[0])
    for key in old:
        if old[key] != new[key]:
            raise TrainingError(
                f"{source} was trained with generator.config.{key} = {old[key]!r}, the config now says "
                f"{new[key]!r}: resume with the original architecture, or use another log_dir"
            )


def apply_optimizer_settings(opt: torch.optim.Optimizer, sched: Any, adamw: Any, gamma: float, name: str) -> list[str]:
    """Put the config's optimizer settings into a restored optimizer and scheduler; returns
    what changed (``"lr 0.0002 -> 0.0001"``). A new lr keeps the decay the schedule has applied."""
    changes = []
    for group in opt.param_groups:
        base = group.get("initial_lr", group["lr"])
        new = {"lr": adamw.lr, "betas": tuple(adamw.betas), "eps": adamw.eps, "weight_decay": adamw.weight_decay}
        old = {"lr": base, "betas": tuple(group["betas"]), "eps": group["eps"], "weight_decay": group["weight_decay"]}
        for key in new:
            if old[key] != new[key]:
                changes.append(f"optimizer.{name}.{key} {old[key]} -> {new[key]}")
        group["lr"] = group["lr"] * (adamw.lr / base) if base else adamw.lr
        group["initial_lr"] = adamw.lr
        group["betas"], group["eps"], group["weight_decay"] = new["betas"], new["eps"], new["weight_decay"]
    sched.base_lrs = [g["initial_lr"] for g in opt.param_groups]
    sched._last_lr = [g["lr"] for g in opt.param_groups]
    if sched.gamma != gamma:
        changes.append(f"lr_scheduler.{name}.gamma {sched.gamma} -> {gamma}")
        sched.gamma = gamma
    return sorted(set(changes))


def restore(state: Any, ckpt: dict, source: str, logger: Any) -> None:
    """Load a training checkpoint into the script's ``State`` (models, optimizers, schedulers, position, RNG)."""
    load_codec_state(state.codec, ckpt["codec"], source)
    saved_discs = ckpt["discriminators"]
    fresh = [n for n in state.discriminators if n not in saved_discs]
    for name, disc in state.discriminators.items():
        if name in saved_discs:
            disc.load_state_dict(saved_discs[name])
    state.opt_g.load_state_dict(ckpt["optimizer_g"])
    state.sched_g.load_state_dict(ckpt["scheduler_g"])
    changes = apply_optimizer_settings(state.opt_g, state.sched_g, state.cfg.optimizer.g, state.cfg.lr_scheduler.g.gamma, "g")
    if fresh or set(saved_discs) != set(state.discriminators):
        logger.warn(f"d_list changed since the checkpoint ({sorted(saved_discs)} -> {list(state.discriminators)}): discriminator optimizer restarts")
    else:
        state.opt_d.load_state_dict(ckpt["optimizer_d"])
        state.sched_d.load_state_dict(ckpt["scheduler_d"])
        changes += apply_optimizer_settings(state.opt_d, state.sched_d, state.cfg.optimizer.d, state.cfg.lr_scheduler.d.gamma, "d")
    if changes:
        logger.warn(f"settings changed since the checkpoint, applied from step {int(ckpt['step'])}: {'; '.join(changes)}")
    state.step, state.epoch, state.batch_in_epoch = int(ckpt["step"]), int(ckpt["epoch"]), int(ckpt["batch_in_epoch"])
    counters = ckpt.get("counters", {})
    state.nonfinite_total = int(counters.get("nonfinite_total", 0))
    state.nonfinite_consecutive = int(counters.get("nonfinite_consecutive", 0))
    state.skipped_batches = int(counters.get("skipped_batches", 0))
    state.bad_files = dict(counters.get("bad_files", {}))
    set_random_state(state.bandwidth_rng, ckpt["bandwidth_rng"])
    same_layout = ckpt.get("world_size") == du.world_size() and ckpt.get("batch_size") == state.cfg.batch_size
    if not same_layout:
        logger.warn(
            f"the checkpoint was written by {ckpt.get('world_size')} process(es) with batch_size {ckpt.get('batch_size')}; "
            "the data order of the current epoch and the RNG streams are not those of an uninterrupted run"
        )
        state.batch_in_epoch = 0 if ckpt.get("batch_size") != state.cfg.batch_size else state.batch_in_epoch
