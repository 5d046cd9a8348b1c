"""The prepared GPU check runs end to end on CPU (``--device cpu --quick``): every section passes
and the summary carries the numbers a GPU session reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_gpu_check_smoke_on_cpu(tmp_path):
    out = tmp_path / "summary.json"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick", "--json", str(out), "--work", str(tmp_path / "work")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = json.loads(out.read_text())
    sections = summary["sections"]
    assert summary["all_ok"] and set(sections) == {"device", "exactness", "bf16", "compile", "train", "cli_long", "throughput"}
    assert sections["device"]["devices"] == ["cpu"] and sections["device"]["ragged_item0_equals_alone"]
    exact = sections["exactness"]
    assert all(v == 1.0 for row in exact["device_vs_cpu_fp32"] + exact["batch_vs_alone"] for v in row)
    assert exact["tf32_flags_restored"]
    train = sections["train"]
    assert train["fp32"]["resumed"] and train["bf16"]["finished"] and train["two_ranks_one_device"]["identical_ranks"]
    assert sections["cli_long"]["codes_shape"][1] == 2500  # 50 s at 50 Hz, windowed
    assert sections["throughput"]["xcodec_fp32"]["hours_per_hour"] > 0
