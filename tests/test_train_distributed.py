"""``torchrun --nproc-per-node=2`` on CPU (gloo): ranks stay identical, a killed rank is recovered."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import queue
import signal
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest
import torch.distributed as dist

from models.pretrained import read_torch_file
from training.checkpoint import state_hash

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
ASSETS = ROOT / "tests" / "assets"

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")


def train_list(tmp_path: Path) -> Path:
    # 6 entries: each rank gets 3 different clips per epoch (batches of 2 and 1).
    names = ["speech_en.flac", "speech_cn_4s.flac", "music_4s.flac"] * 2
    path = tmp_path / "train.txt"
    path.write_text("".join(f"{ASSETS / n}\n" for n in names))
    return path


def torchrun_command(*args: str, restarts: int = 0) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", f"--max-restarts={restarts}",
        str(ROOT / "main_launch_vqdp.py"), "--config", str(TINY), *args,
    ]  # fmt: skip


def torchrun_env(env_extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XCODEC_TEST_")}
    env.update({"OMP_NUM_THREADS": "1", **env_extra})
    return env


def torchrun(tmp_path: Path, env_extra: dict, *args: str, restarts: int = 0, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = torchrun_command(*args, restarts=restarts)
    return subprocess.run(cmd, cwd=ROOT, env=torchrun_env(env_extra), capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_ranks_keep_identical_state(tmp_path):
    log_dir = tmp_path / "run"
    hashes = tmp_path / "hashes"
    proc = torchrun(tmp_path, {"XCODEC_TEST_HASH_DIR": str(hashes)}, f"log_dir={log_dir}", f"training_file={train_list(tmp_path)}", "max_steps=4", "checkpoint_interval=4")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    r0 = json.loads((hashes / "hash_rank0.json").read_text())
    r1 = json.loads((hashes / "hash_rank1.json").read_text())
    assert r0["step"] == r1["step"] == 4
    for key in ("codec", "codebooks", "discriminators", "optimizer_g"):
        assert r0[key] == r1[key], key
    # The teacher is not part of DDP's gradient sync.
    assert r0["ddp_synced_params"] > 0 and r0["ddp_syncs_teacher"] is False
    # What rank 0 wrote is what rank 1 holds.
    ckpt = read_torch_file(log_dir / "model_ckpts" / "ckpt_00000004.pth")
    assert state_hash(ckpt["codec"]) == r1["codec"]
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    # Only rank 0 logs: one line per step, one event file.
    assert out.count("step 4 ep") == 1
    assert len(list((log_dir / "logs").glob("events.out.tfevents.*"))) == 1


@pytest.mark.slow
def test_killed_rank_is_restarted_and_resumes(tmp_path):
    log_dir = tmp_path / "run"
    proc = torchrun(
        tmp_path,
        {"XCODEC_TEST_KILL": "1:3"},  # rank 1 SIGKILLs itself after step 3, first attempt only
        f"log_dir={log_dir}", f"training_file={train_list(tmp_path)}", "max_steps=5", "checkpoint_interval=2", "validation_file=null",
        restarts=1,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "resumed from" in out and "ckpt_00000002.pth (step 2" in out
    ckpt = read_torch_file(log_dir / "model_ckpts" / "ckpt_00000005.pth")
    assert ckpt["step"] == 5


@pytest.mark.slow
def test_adversarial_terms_starting_late_leave_ddp_consistent(tmp_path):
    """No spectral loss and discriminator_iter_start > 0: the decoder has no gradient in the
    first steps, which DDP must be told (find_unused_parameters) or it stops with an error."""
    proc = torchrun(
        tmp_path, {}, f"log_dir={tmp_path / 'run'}", f"training_file={train_list(tmp_path)}", "max_steps=3",
        "validation_file=null", "discriminator_iter_start=2",
        "loss_weights.full_stft=0", "loss_weights.sub_stft=0", "loss_weights.mel=0", "loss_weights.adversarial=1",
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "finished at step 3" in out


SHORT_RUN = ("max_steps=2", "checkpoint_interval=2", "validation_file=null")


def _stop(proc: subprocess.Popen) -> None:
    """End a torchrun left running by a failed test: SIGTERM makes it end its workers (they run
    in sessions of their own, out of reach of its process group); SIGKILL if that fails."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _lines_until(proc: subprocess.Popen, marker: str, timeout: float) -> list[str]:
    """The merged output of ``proc`` up to the line holding ``marker`` (read by a thread, so a
    hung process cannot block the test beyond ``timeout`` seconds of silence)."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [*map(lines.put, proc.stdout), lines.put(None)], daemon=True).start()
    seen = []
    while not seen or marker not in seen[-1]:
        line = lines.get(timeout=timeout)
        assert line is not None, "".join(seen)[-4000:]  # ended without the marker
        seen.append(line)
    return seen


@pytest.mark.slow
def test_every_run_exits_by_itself(tmp_path):
    """Issue 19: a 2-process run printed "finished" and then hung in interpreter teardown in 3 of
    5 runs (DDP's reducer freed the gloo group at exit while its worker thread waited for the
    GIL). Five runs in a row: each ends by itself, with exit code 0, soon after that line."""
    train = train_list(tmp_path)
    for run in range(5):
        cmd = torchrun_command(f"log_dir={tmp_path / f'run{run}'}", f"training_file={train}", *SHORT_RUN)
        out = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=torchrun_env({}), start_new_session=True, **out)
        try:
            _lines_until(proc, "finished at step 2", timeout=300)
            # Generous: a clean exit takes about a second; the hang never ended.
            assert proc.wait(timeout=90) == 0, f"run {run}: exit code {proc.returncode}"
        except subprocess.TimeoutExpired:
            pytest.fail(f"run {run} of 5 did not exit within 90 s of 'finished at step 2'")
        finally:
            _stop(proc)


@pytest.mark.slow
@pytest.mark.parametrize("refused", ["on_every_rank", "on_rank_0"])
def test_a_refused_run_says_why_once(tmp_path, refused):
    """A config every rank refuses, and a log_dir only rank 0 writes into (here under a file):
    one ``error:`` line for the job, a non-zero exit, no traceback of our processes (only
    torchrun's own report of a failed child follows), and nothing written."""
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file\n")
    if refused == "on_every_rank":
        args, message = (f"log_dir={tmp_path / 'run'}", "max_steps=abc"), "max_steps: expected int, got 'abc'"
    else:
        args, message = (f"log_dir={blocker / 'run'}", "max_steps=1"), f"{blocker / 'run'}"
    proc = torchrun(tmp_path, {}, *args, f"training_file={train_list(tmp_path)}", timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], out[-4000:]
    assert out.count(message) == 1, out[-4000:]
    # A child's traceback names our files (or is prefixed [rankN]); torchrun's report names neither.
    assert f'File "{ROOT}' not in out and "[rank" not in out and out.count("Traceback") <= 1, out[-4000:]
    assert blocker.read_text() == "a file\n" and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_only_rank_0_draws_the_progress_bar(tmp_path):
    """Both ranks write to one terminal (a pty, where tqdm draws): one bar, rank 0's."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    cmd = torchrun_command(f"log_dir={tmp_path / 'run'}", f"training_file={train_list(tmp_path)}", *SHORT_RUN)
    terminal = {"stdin": subprocess.DEVNULL, "stdout": follower, "stderr": follower}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=torchrun_env({}), start_new_session=True, **terminal)
    os.close(follower)
    chunks = []

    def read() -> None:
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: every process holding the terminal has exited
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert proc.wait(timeout=300) == 0, b"".join(chunks).decode(errors="replace")[-4000:]
    finally:
        _stop(proc)
    reader.join(timeout=60)
    os.close(leader)
    out = b"".join(chunks).decode(errors="replace")
    assert out.count("0/2 [") == 1 and "2/2 [" in out, out[-4000:]  # one bar drawn, and drawn to the end
    assert out.count("finished at step 2") == 1 and out.count("step 2 ep") == 1, out[-4000:]
