"""The prepared GPU check runs end to end on CPU (``--device cpu --quick``): every section passes
and the summary carries the numbers a GPU session reports; and the pieces it relies on hold on
CPU: exact mode restores the TF32 settings, codebooks come from enough frames and build on any
device."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.gpu_helpers import kmeans_clips
from conftest import ROOT
from models import build_codec, init_codebooks, load_generator_config
from models.precision import ieee_fp32, tf32_switches
from modules.tiled import BF16_ONEDNN


@pytest.mark.slow
def test_gpu_check_smoke_on_cpu(tmp_path):
    out = tmp_path / "summary.json"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick", "--json", str(out), "--work", str(tmp_path / "work"), "--budget", "1200"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = json.loads(out.read_text())
    sections = summary["sections"]
    assert summary["all_ok"] and list(sections) == ["device", "exactness", "bf16", "xcodec2", "throughput", "cli_long", "train", "compile"]
    assert summary["setup"]["frames_per_entry"] >= 10
    assert sections["device"]["devices"] == ["cpu"] and sections["device"]["encode_many_equals_encode"]
    exact = sections["exactness"]
    assert all(n > 1 for n in exact["codes_used"]), exact["codes_used"]  # every quantizer spreads over codes
    rows = ("device_vs_cpu_fp32", "device_vs_xcodecmodel", "batch_equal_lengths", "batch_ragged")
    assert all(v == 1.0 for row in rows for v in exact[row]) and exact["device_vs_cpu_mismatches"]["frames"] == 0
    assert exact["tf32_flags_restored"]
    xc2 = sections["xcodec2"]  # X-Codec 2: codes = CPU = Xcodec2Model, ragged batch = alone, spread over the codebook
    assert xc2["all_identical"] and xc2["codes_used"] > xc2["frames"] // 4 and xc2["decode_device_vs_cpu_rel_err"] < 1e-5
    train, through = sections["train"], sections["throughput"]
    assert train["fp32"]["resumed"] and train["two_ranks_one_device"]["identical_ranks"]
    if BF16_ONEDNN:
        bf16 = sections["bf16"]
        differ = sum(a < 1.0 for a in bf16["agreement_per_quantizer"])
        assert (bf16["mismatches_vs_fp32"]["frames"] > 0) == (differ > 0)  # every mismatch has its margin
        assert train["bf16"]["finished"]
        assert {"xcodec_bf16_model", "xcodec_bf16_cli", "xcodecmodel_bf16"} <= set(through)
    else:  # an AVX2-only CPU: bf16 would run ~100x slower, the check says so and leaves it out
        assert "no bf16 kernels" in sections["bf16"]["skipped"] and not any("bf16" in k for k in [*through, *train])
    assert sections["cli_long"]["codes_shape"][1] == 2500  # 50 s at 50 Hz, windowed
    assert through["xcodec_fp32_cli"]["hours_per_hour"] > 0 and through["xcodecmodel_fp32_ieee"]["hours_per_hour"] > 0
    assert "xcodec_fp32_model" in through


@pytest.mark.slow
@pytest.mark.parametrize("user", ["default", "setter", "legacy"])
def test_exact_mode_restores_tf32_settings_and_the_getter_still_answers(user):
    """Exact mode turns TF32 off with one API and leaves the process as it found it: torch
    refuses to read the matmul precision once its two APIs were mixed (Inductor reads it)."""
    code = f"""
import torch
from models.precision import ieee_fp32, tf32_switches
from modules.tiled import BF16_ONEDNN
if {user!r} == "setter":
    torch.set_float32_matmul_precision("high")
elif {user!r} == "legacy":
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
getter = torch.get_float32_matmul_precision()
before = [getattr(o, n) for o, n in tf32_switches()]
for _ in range(2):
    with ieee_fp32(device=torch.device("cpu")):
        inside = [getattr(o, n) for o, n in tf32_switches()]
assert all(v in ("ieee", False) for v in inside), inside
assert [getattr(o, n) for o, n in tf32_switches()] == before
assert torch.get_float32_matmul_precision() == getter
print("ok", getter)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)  # a fresh process: flags are global
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stdout + proc.stderr


def test_exact_mode_restores_settings_after_an_error():
    before = [getattr(o, n) for o, n in tf32_switches()]
    with pytest.raises(RuntimeError), ieee_fp32(device=torch.device("cpu")):
        raise RuntimeError("boom")
    assert [getattr(o, n) for o, n in tf32_switches()] == before


def _tiny():
    gen, scale = load_generator_config(ROOT / "configs" / "tiny.yaml")
    torch.manual_seed(0)
    return build_codec(gen, scale, weight_norm=False).eval()


def test_kmeans_clips_hold_ten_frames_per_codebook_entry():
    model = _tiny()
    clips = kmeans_clips(model)
    frames = sum(int(model.num_frames(len(c))) for c in clips)
    assert frames >= 10 * model.bins and len({round(float(c.abs().sum()), 3) for c in clips}) == len(clips)  # all different


def test_codebooks_helper_builds_on_the_models_device():
    """Inputs on the CPU, model elsewhere (``meta`` stands in for CUDA): every tensor the helper
    makes is made on the model's device (a CPU draw mixed into a CUDA model used to crash)."""
    model = _tiny().to("meta")
    init_codebooks(model, [torch.randn(16000)], "gaussian")
    assert all(layer.codebook.device.type == "meta" for layer in model.quantizer.vq.layers)
    cpu = init_codebooks(_tiny(), [torch.randn(16000), torch.randn(16000), torch.randn(12000)], "gaussian")
    assert all(layer.codebook.abs().sum() > 0 for layer in cpu.quantizer.vq.layers)
