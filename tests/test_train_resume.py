"""Resuming: exact continuation, and checkpoints that survive SIGKILL mid-write (CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from conftest import TINY_CONFIG as TINY
from conftest import train_tiny as run
from models.pretrained import read_torch_file
from utils.files import temporary_target

pytestmark = pytest.mark.usefixtures("train_env")



def assert_same_tree(a, b, where: str = "") -> None:
    """Bitwise equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs (max abs diff {(a.double() - b.double()).abs().max().item():.3g})"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(set(a) ^ set(b))}"
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_resume_continues_exactly(tmp_path):
    # Discriminators, validation and an epoch boundary (lr decay) all inside the window;
    # the stop at step 3 falls in the middle of an epoch (2 batches per epoch).
    common = ("checkpoint_interval=3", "validation_interval=2", "num_ckpt_keep=5")
    straight = tmp_path / "straight"
    run(straight, "max_steps=6", *common)
    resumed = tmp_path / "resumed"
    first = run(resumed, "max_steps=3", *common)
    assert first.step == 3 and first.epoch == 1 and first.batch_in_epoch == 1
    second = run(resumed, "max_steps=6", *common)
    assert second.step == 6
    log = (resumed / "logs" / "log.txt").read_text()
    assert "resumed from" in log and "(step 3, epoch 1, batch 1 of the epoch)" in log

    a = read_torch_file(straight / "model_ckpts" / "ckpt_00000006.pth")
    b = read_torch_file(resumed / "model_ckpts" / "ckpt_00000006.pth")
    for key in ("codec", "discriminators", "optimizer_g", "optimizer_d", "scheduler_g", "scheduler_d", "rng", "bandwidth_rng", "step", "epoch", "batch_in_epoch", "counters"):
        assert_same_tree(a[key], b[key], key)
    # The learning rate went on decaying from where it was: epochs ended after steps 2
    # and 4 (the run stops at step 6 before closing epoch 2).
    assert b["optimizer_g"]["param_groups"][0]["lr"] == pytest.approx(2e-4 * 0.999**2)
    assert b["scheduler_g"]["last_epoch"] == 2
    # And the validation numbers logged after the resume are those of the straight run.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def valid(d):
        acc = EventAccumulator(str(d / "logs"), size_guidance={"scalars": 0})
        acc.Reload()
        return {e.step: e.value for e in acc.Scalars("valid/mel_distance")}

    assert valid(straight) == valid(resumed)


def _spawn(log_dir: Path, env: dict, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "main_launch_vqdp.py"), "--config", str(TINY), f"log_dir={log_dir}", *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigkill_while_saving_keeps_previous_checkpoint(tmp_path):
    log_dir = tmp_path / "run"
    ckpt_dir = log_dir / "model_ckpts"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XCODEC_TEST_SAVE_PAUSE": "4:300"}
    args = ("max_steps=6", "checkpoint_interval=2", "num_ckpt_keep=3", "validation_file=null")
    proc = _spawn(log_dir, env, *args)
    marker = ckpt_dir / "paused_00000004"
    deadline = time.time() + 240
    while not marker.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "the save of step 4 never started"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)  # mid-save: ckpt_00000004 is written in full under a temporary name, not yet renamed
    proc.wait(timeout=30)
    proc.stdout.close()
    leftovers = [p.name for p in ckpt_dir.iterdir() if temporary_target(p.name) is not None]
    assert leftovers and all(temporary_target(n) == "ckpt_00000004.pth" for n in leftovers)
    assert not (ckpt_dir / "ckpt_00000004.pth").exists()
    previous = read_torch_file(ckpt_dir / "ckpt_00000002.pth")  # intact and loadable
    assert previous["step"] == 2

    env.pop("XCODEC_TEST_SAVE_PAUSE")
    proc = _spawn(log_dir, env, *args)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "resumed from" in out and "ckpt_00000002.pth (step 2" in out
    assert "left by an interrupted save" in out
    assert not [p for p in ckpt_dir.iterdir() if temporary_target(p.name) is not None]
    assert sorted(p.name for p in ckpt_dir.glob("ckpt_*.pth")) == ["ckpt_00000002.pth", "ckpt_00000004.pth", "ckpt_00000006.pth"]
    assert read_torch_file(ckpt_dir / "ckpt_00000006.pth")["step"] == 6


# ---------------------------------------------------------------------------- policies
def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_unusable_checkpoints_never_restart_a_run_silently(tmp_path, capsys):
    import main_launch_vqdp as trainer

    log_dir = tmp_path / "run"
    run(log_dir, "max_steps=2", "validation_file=null")
    ckpt_dir = log_dir / "model_ckpts"
    (ckpt_dir / "ckpt_00000002.pth").write_bytes(b"truncated")
    before = _files(log_dir)
    argv = ["--config", str(TINY), f"log_dir={log_dir}", "max_steps=4", "validation_file=null"]
    assert trainer.cli(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none of the 1 checkpoint(s)" in err[0] and "--restart" in err[0]
    assert _files(log_dir) == before  # the old run's checkpoint, export and config untouched
    # --restart: from step 0, the old files moved aside, nothing deleted.
    assert trainer.cli([*argv, "--restart"]) == 0
    aside = [d for d in ckpt_dir.iterdir() if d.name.startswith("previous_")]
    assert len(aside) == 1 and (aside[0] / "ckpt_00000002.pth").read_bytes() == b"truncated"
    assert (aside[0] / "export_00000002").is_dir()
    assert read_torch_file(ckpt_dir / "ckpt_00000004.pth")["step"] == 4


def test_newer_unusable_checkpoints_fall_back_and_are_set_aside(tmp_path):
    log_dir = tmp_path / "run"
    ckpt_dir = log_dir / "model_ckpts"
    run(log_dir, "max_steps=2", "validation_file=null", "num_ckpt_keep=2")
    good = read_torch_file(ckpt_dir / "ckpt_00000002.pth")
    incomplete = {k: v for k, v in good.items() if k != "optimizer_g"}
    torch.save(incomplete, ckpt_dir / "ckpt_00000090.pth")  # newest, but missing a key
    (ckpt_dir / "ckpt_00000099.pth").write_bytes(b"junk")
    state = run(log_dir, "max_steps=6", "validation_file=null", "num_ckpt_keep=2")
    assert state.step == 6
    log = (log_dir / "logs" / "log.txt").read_text()
    assert "ckpt_00000002.pth (step 2" in log
    # The unusable ones no longer shadow the new checkpoints: rotation keeps 4 and 6.
    assert sorted(p.name for p in ckpt_dir.glob("ckpt_*.pth")) == ["ckpt_00000004.pth", "ckpt_00000006.pth"]
    assert sorted(p.name for p in (ckpt_dir / "unusable").iterdir()) == ["ckpt_00000090.pth", "ckpt_00000099.pth"]


def test_a_changed_architecture_is_refused_before_log_dir_changes(tmp_path, capsys):
    import main_launch_vqdp as trainer

    log_dir = tmp_path / "run"
    run(log_dir, "max_steps=2", "validation_file=null")
    before = _files(log_dir)
    assert trainer.cli(["--config", str(TINY), f"log_dir={log_dir}", "max_steps=4", "generator.config.D=24"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "generator.config.D = 16" in err[0] and "24" in err[0]
    assert _files(log_dir) == before  # config.yaml not overwritten with the rejected config


def test_changed_optimizer_settings_are_applied_on_resume(tmp_path):
    log_dir = tmp_path / "run"
    run(log_dir, "max_steps=2", "validation_file=null")
    state = run(log_dir, "max_steps=3", "validation_file=null", "optimizer.g.lr=1e-4", "optimizer.d.betas=[0.5, 0.9]")
    group = state.opt_g.param_groups[0]
    assert group["initial_lr"] == 1e-4 and group["lr"] == pytest.approx(1e-4 * 0.999)  # one epoch of decay kept
    assert state.opt_d.param_groups[0]["betas"] == (0.5, 0.9)
    log = (log_dir / "logs" / "log.txt").read_text()
    assert "optimizer.g.lr 0.0002 -> 0.0001" in log and "optimizer.d.betas" in log


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_a_checkpoint_and_exits_cleanly(tmp_path, sig):
    log_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Loader workers too: a scheduler's SIGTERM and Ctrl-C reach the whole process group.
    args = ("max_steps=500", "checkpoint_interval=1000", "validation_file=null", "print_freq=1", "num_workers=2")
    proc = subprocess.Popen([sys.executable, str(ROOT / "main_launch_vqdp.py"), "--config", str(TINY), f"log_dir={log_dir}", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    text = log_dir / "logs" / "log.txt"
    deadline = time.time() + 240
    while not (text.is_file() and "step 3 ep" in text.read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.05)
    os.killpg(proc.pid, sig)  # the whole group, as a terminal or a scheduler signals it
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, out
    assert "Traceback" not in out and f"stopping on {signal.Signals(sig).name} at step" in out
    saved = sorted(log_dir.glob("model_ckpts/ckpt_*.pth"))
    assert len(saved) == 1 and read_torch_file(saved[0])["step"] >= 3  # nothing since the last checkpoint lost
    step = read_torch_file(saved[0])["step"]
    proc = _spawn(log_dir, env, f"max_steps={step + 1}", *args[1:])
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0 and f"(step {step}," in out, out
