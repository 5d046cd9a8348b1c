"""It learns: overfitting one real speech clip with configs/tiny.yaml lowers the MR-STFT loss."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import main_launch_vqdp as trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
STEPS = 60


def test_overfit_one_speech_clip(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    lst = tmp_path / "one.txt"
    lst.write_text(f"{ROOT / 'tests' / 'assets' / 'speech_en.flac'}\n")
    cpu0 = time.process_time()
    try:
        trainer.main([
            "--config", str(TINY), f"log_dir={tmp_path / 'run'}", f"training_file={lst}", "validation_file=null",
            f"max_steps={STEPS}", "checkpoint_interval=1000", "summary_interval=1", "print_freq=10",
            # Reconstruction only (no GAN terms), and a higher learning rate for a short run.
            "loss_weights.adversarial=0", "loss_weights.feature_matching=0", "optimizer.g.lr=1e-3",
        ])
    finally:
        torch.set_num_threads(threads)
    cpu = time.process_time() - cpu0
    acc = EventAccumulator(str(tmp_path / "run" / "logs"), size_guidance={"scalars": 0})
    acc.Reload()
    curve = [e.value for e in sorted(acc.Scalars("loss/full_stft"), key=lambda e: e.step)]
    assert len(curve) == STEPS
    start, end = sum(curve[:3]) / 3, sum(curve[-10:]) / 10
    print(f"MR-STFT loss {start:.3f} -> {end:.3f} ({100 * (1 - end / start):.0f}% lower) in {STEPS} steps, {cpu:.1f} s CPU")
    assert end <= 0.7 * start, curve
    assert cpu < 60, f"{cpu:.1f} s of CPU time"
