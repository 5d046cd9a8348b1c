"""Training checkpoints of the script's ``State`` (save, find, restore; RNG state): ``ckpt_{step:08d}.pth``, tensors
and plain values (``weights_only`` loading), and ``export_{step:08d}/``, written atomically (docs/training.md)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from models.config import generator_config_from_dict
from models.export import save_export
from models.pretrained import load_codec_state, read_torch_file
from utils import distributed as du
from utils.config import ConfigError
from utils.files import atomic_directory, atomic_write, remove_stale_temporaries

CHECKPOINT_FORMAT = "xcodec-train-1"
CKPT_RE = re.compile(r"^ckpt_(\d{8,})\.pth$")
EXPORT_RE = re.compile(r"^export_(\d{8,})$")
# Temporaries of checkpoints written by earlier versions: ckpt_X.pth.tmp-PID, export_X.tmp-PID.
LEGACY_TMP_RE = re.compile(r"^(ckpt_\d{8,}\.pth|export_\d{8,})\.tmp-\d+$")


class TrainingError(RuntimeError):
    """The run cannot go on (repeated non-finite losses, a corrupt state); the message says why."""


def _entries(directory: Path, pattern: re.Pattern) -> list[tuple[int, Path]]:
    """``[(step, path)]`` of the entries of ``directory`` whose name ``pattern`` matches, oldest first."""
    if not directory.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := pattern.match(p.name)))


def prepare_log_dir(log_dir: Path, raw: dict) -> None:
    """On rank 0: ``model_ckpts/`` without an interrupted save's leftovers, and the merged config
    as ``config.yaml``; an ``OSError`` (e.g. an unwritable ``log_dir``) stops every rank."""
    failed = None
    if du.is_main_process():
        try:
            (log_dir / "model_ckpts").mkdir(parents=True, exist_ok=True)
            for p in remove_stale_checkpoint_temporaries(log_dir / "model_ckpts"):
                print(f"removed {p.name} left by an interrupted save", flush=True)
            text = yaml.safe_dump(raw, sort_keys=False)
            atomic_write(log_dir / "config.yaml", lambda tmp: Path(tmp).write_text(text))  # never through a link
        except OSError as exc:
            failed = exc
    du.raise_on_every_rank(failed)


def remove_stale_checkpoint_temporaries(directory: str | Path) -> list[Path]:
    """Delete what a process killed while saving left in ``directory`` (this version's and earlier ones')."""
    removed = remove_stale_temporaries(directory)
    for p in Path(directory).iterdir() if Path(directory).is_dir() else []:
        if LEGACY_TMP_RE.match(p.name):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def rotate_checkpoints(directory: Path, keep: int) -> list[Path]:
    """Keep the newest ``keep`` checkpoints (and their exports); return what was deleted."""
    ckpts = [(s, p) for s, p in _entries(directory, CKPT_RE) if p.is_file()]
    exports = [(s, p) for s, p in _entries(directory, EXPORT_RE) if p.is_dir()]
    keep_steps = {s for s, _ in ckpts[-keep:]}
    removed = [p for s, p in ckpts + exports if s not in keep_steps]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return removed


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """This process's python / numpy / torch (and CUDA) RNG states, weights_only-loadable."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
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


def nonfinite_entries(tree: Any, prefix: str = "") -> list[str]:
    """Names of floating-point tensors in a nested dict/list that hold NaN or Inf."""
    if isinstance(tree, torch.Tensor):
        return [prefix or "<tensor>"] if tree.is_floating_point() and not bool(torch.isfinite(tree).all()) else []
    if isinstance(tree, dict):
        return [bad for k, v in tree.items() for bad in nonfinite_entries(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(tree, (list, tuple)):
        return [bad for i, v in enumerate(tree) for bad in nonfinite_entries(v, f"{prefix}[{i}]")]
    return []


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a state dict (rank comparisons)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


_COUNTERS = ("nonfinite_total", "nonfinite_consecutive", "skipped_batches")


def save_checkpoint(state: Any, ckpt_dir: Path, logger: Any) -> Path | None:
    """Write ``ckpt_{step}.pth`` (+ ``export_{step}/``) of the script's ``State`` on rank 0; a collective on every
    rank, which all refuse a state holding NaN/Inf. The ``save_pause`` hook pauses mid-save (``paused_<step>``)."""
    payload = {
        "format": CHECKPOINT_FORMAT, "codec": state.codec.state_dict(), "config": state.raw_config,
        "discriminators": {n: d.state_dict() for n, d in state.discriminators.items()},
        "optimizer_g": state.opt_g.state_dict(), "optimizer_d": state.opt_d.state_dict(),
        "scheduler_g": state.sched_g.state_dict(), "scheduler_d": state.sched_d.state_dict(),
        "step": state.step, "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch,
        "world_size": du.world_size(), "batch_size": state.cfg.batch_size,
        "rng": du.gather_objects(rng_state()),  # every rank's RNG, so each resumes its own stream
        "bandwidth_rng": state.bandwidth_rng.getstate(),
        "counters": {**{k: getattr(state, k) for k in _COUNTERS}, "bad_files": dict(state.bad_files)},
    }  # fmt: skip
    bad = nonfinite_entries({k: payload[k] for k in ("codec", "discriminators", "optimizer_g", "optimizer_d")})
    if bad:
        raise TrainingError(f"refusing to write a checkpoint at step {state.step}: NaN/Inf in {', '.join(bad[:5])}")
    if not du.is_main_process():
        return None
    path, export = ckpt_dir / f"ckpt_{state.step:08d}.pth", ckpt_dir / f"export_{state.step:08d}"
    pause = state.hooks.save_pause

    def write(tmp: str) -> None:
        torch.save(payload, tmp)
        if pause is not None and pause[0] == state.step:  # test hook: written, not yet renamed; the test SIGKILLs
            (ckpt_dir / f"paused_{state.step:08d}").touch()
            logger.info(f"test hook: paused while writing {path}")
            time.sleep(pause[1])

    atomic_write(path, write, durable=True)
    atomic_directory(export, lambda d: save_export(state.codec, d), durable=True)
    for old in rotate_checkpoints(ckpt_dir, state.cfg.num_ckpt_keep):
        logger.info(f"removed old {old.name}")
    logger.info(f"saved {path} and {export.name}/")
    return path


REQUIRED_KEYS = ("codec", "config", "discriminators", "optimizer_g", "optimizer_d", "scheduler_g", "scheduler_d",
                 "step", "epoch", "batch_in_epoch", "rng", "bandwidth_rng")  # fmt: skip


def checkpoint_problem(obj: dict) -> str | None:
    """Why a read checkpoint cannot be resumed from (``None``: it can)."""
    if obj.get("format") != CHECKPOINT_FORMAT:
        return "not a checkpoint of this training script"
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        return f"incomplete (no {', '.join(missing)})"
    return None if isinstance(obj["config"], dict) else "its config is not a mapping"


def find_resume_checkpoint(ckpt_dir: Path, logger: Any, restart: bool = False) -> tuple[Path, dict] | None:
    """The newest usable checkpoint (rank 0 picks, every rank reads the same file). Unusable newer ones go to
    ``unusable/`` (rotation must not delete the new ones because of them); with checkpoints and none usable, a
    ``TrainingError`` (no silent restart from step 0); ``restart=True`` moves all to ``previous_<time>/``."""
    choice, obj, error = None, None, None
    if du.is_main_process():
        found = [p for _, p in _entries(ckpt_dir, CKPT_RE) if p.is_file()]
        if restart:
            exports = [p for _, p in _entries(ckpt_dir, EXPORT_RE)]
            _set_aside(ckpt_dir, f"previous_{time.strftime('%Y%m%d-%H%M%S')}", found + exports, logger)
            found = []
        unusable: list[tuple[Path, str]] = []
        for path in reversed(found):
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
            error = (f"{ckpt_dir}: none of the {len(unusable)} checkpoint(s) can be resumed from (newest: {path.name}: "
                     f"{problem}); repair or move them, or pass --restart to start again from step 0 (they are then "
                     "moved aside, not deleted)")
        elif unusable:
            _set_aside(ckpt_dir, "unusable", [p for p, _ in unusable], logger)
    du.raise_on_every_rank(TrainingError(error) if error else None)
    choice = du.broadcast_object(choice)
    if choice is None:
        return None
    return Path(choice), obj if du.is_main_process() else read_torch_file(choice)


def _set_aside(ckpt_dir: Path, name: str, paths: list[Path], logger: Any) -> None:
    if not paths:
        return
    target = ckpt_dir / name
    target.mkdir(parents=True, exist_ok=True)
    for p in paths:
        os.replace(p, target / p.name)
    more = " ..." if len(paths) > 4 else ""
    logger.warn(f"moved {len(paths)} file(s) to {target}: {', '.join(p.name for p in paths[:4])}{more}")


def check_resumable(ckpt: dict, raw: dict, source: str) -> None:
    """Refuse (``TrainingError`` naming the first key that differs) to resume a run whose codec
    architecture the new config changes; checked before anything is written into the run's directory."""
    try:
        old = dataclasses.asdict(generator_config_from_dict(ckpt["config"], source)[0])
    except ConfigError as exc:
        raise TrainingError(f"{source}: its stored config cannot be read ({exc})") from None
    new = dataclasses.asdict(generator_config_from_dict(raw, "config")[0])
    for key in old:
        if old[key] != new[key]:
            raise TrainingError(f"{source} was trained with generator.config.{key} = {old[key]!r}, the config now "
                                f"says {new[key]!r}: resume with the original architecture, or use another log_dir")


def _apply_settings(opt: torch.optim.Optimizer, sched: Any, adamw: Any, gamma: float, name: str) -> list[str]:
    """Put the config's settings into a restored optimizer and scheduler, keeping the decay the schedule
    applied; returns what changed (``"optimizer.g.lr 0.0002 -> 0.0001"``)."""
    changes = []
    new = {"lr": adamw.lr, "betas": tuple(adamw.betas), "eps": adamw.eps, "weight_decay": adamw.weight_decay}
    for group in opt.param_groups:
        base = group.get("initial_lr", group["lr"])
        old = {"lr": base, "betas": tuple(group["betas"]), "eps": group["eps"], "weight_decay": group["weight_decay"]}
        changes += [f"optimizer.{name}.{k} {old[k]} -> {new[k]}" for k in new if old[k] != new[k]]
        group["lr"] = group["lr"] * (adamw.lr / base) if base else adamw.lr
        group.update(initial_lr=adamw.lr, betas=new["betas"], eps=new["eps"], weight_decay=new["weight_decay"])
    sched.base_lrs = [g["initial_lr"] for g in opt.param_groups]
    sched._last_lr = [g["lr"] for g in opt.param_groups]
    if sched.gamma != gamma:
        changes.append(f"lr_scheduler.{name}.gamma {sched.gamma} -> {gamma}")
        sched.gamma = gamma
    return sorted(set(changes))


def restore(state: Any, ckpt: dict, source: str, logger: Any) -> None:
    """Load a training checkpoint into the script's ``State`` (models, optimizers, schedulers, position, RNG)."""
    cfg = state.cfg
    load_codec_state(state.codec, ckpt["codec"], source)
    saved_discs = ckpt["discriminators"]
    for name, disc in state.discriminators.items():
        if name in saved_discs:
            disc.load_state_dict(saved_discs[name])
    state.opt_g.load_state_dict(ckpt["optimizer_g"])
    state.sched_g.load_state_dict(ckpt["scheduler_g"])
    changes = _apply_settings(state.opt_g, state.sched_g, cfg.optimizer.g, cfg.lr_scheduler.g.gamma, "g")
    if set(saved_discs) != set(state.discriminators):
        logger.warn(f"d_list changed since the checkpoint ({sorted(saved_discs)} -> {list(state.discriminators)}): "
                    "discriminator optimizer restarts")
    else:
        state.opt_d.load_state_dict(ckpt["optimizer_d"])
        state.sched_d.load_state_dict(ckpt["scheduler_d"])
        changes += _apply_settings(state.opt_d, state.sched_d, cfg.optimizer.d, cfg.lr_scheduler.d.gamma, "d")
    if changes:
        logger.warn(f"settings changed since the checkpoint, applied from step {int(ckpt['step'])}: "
                    f"{'; '.join(changes)}")  # fmt: skip
    state.step, state.epoch, state.batch_in_epoch = int(ckpt["step"]), int(ckpt["epoch"]), int(ckpt["batch_in_epoch"])
    counters = ckpt.get("counters", {})
    for key in _COUNTERS:
        setattr(state, key, int(counters.get(key, 0)))
    state.bad_files = dict(counters.get("bad_files", {}))
    bw = ckpt["bandwidth_rng"]
    state.bandwidth_rng.setstate((bw[0], tuple(bw[1]), bw[2]))
    if ckpt.get("world_size") != du.world_size() or ckpt.get("batch_size") != cfg.batch_size:
        logger.warn(f"the checkpoint was written by {ckpt.get('world_size')} process(es) with batch_size "
                    f"{ckpt.get('batch_size')}; the data order of the current epoch and the RNG streams are not "
                    "those of an uninterrupted run")  # fmt: skip
        if ckpt.get("batch_size") != cfg.batch_size:
            state.batch_in_epoch = 0
