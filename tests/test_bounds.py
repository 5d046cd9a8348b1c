"""Config values that would allocate without bound are refused in one line naming the key and the
file, before anything is built or written (utils.budget)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

import inference
import main_launch_vqdp as trainer
from conftest import ASSETS, TINY_CONFIG
from models.export import save_transformers
from models.vocoder import read_vocoder_config
from utils.config import ConfigError, read_config

SPEECH = str(ASSETS / "speech_en.flac")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny_codec):
    return save_transformers(tiny_codec, tmp_path_factory.mktemp("hf") / "xcodec-tiny")


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize(
    "section,key,value",
    [
        (None, "codebook_size", 10**9),
        ("semantic_model_config", "num_conv_pos_embeddings", 10**8),
        ("acoustic_model_config", "decoder_hidden_size", 10**9),
        ("semantic_model_config", "num_hidden_layers", 10**6),
    ],
)
def test_transformers_config_sizes_are_bounded(tmp_path, hf_dir, capsys, section, key, value):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "model.safetensors").symlink_to(hf_dir / "model.safetensors")
    config = json.loads((hf_dir / "config.json").read_text())
    (config[section] if section else config)[key] = value
    (d / "config.json").write_text(json.dumps(config))
    code = inference.main(["--checkpoint", str(d), "--input", SPEECH, "--output", str(tmp_path / "o.wav")])
    line = _one_line(capsys)
    assert (
        code == 2 and "config.json" in line and f"{section + '.' if section else ''}{key}:" in line and "bound" in line
    ), line
    assert not (tmp_path / "o.wav").exists()


def _export(tmp_path, hf_dir, text: str):
    d = tmp_path / "export"
    d.mkdir()
    (d / "model.safetensors").symlink_to(hf_dir / "model.safetensors")
    (d / "config.yaml").write_text(text)
    return d


@pytest.mark.parametrize(
    "key,value,needle",
    [("bins", 10**9, "generator.config.bins: 1000000000 would allocate"),
     ("target_bandwidths", [0.5, 1e308], "generator.config.target_bandwidths: [0.5, 1e+308] would allocate")],
)  # fmt: skip
def test_export_config_sizes_are_bounded(tmp_path, hf_dir, capsys, key, value, needle):
    doc = read_config(TINY_CONFIG)
    doc["generator"]["config"][key] = value
    d = _export(tmp_path, hf_dir, yaml.safe_dump(doc))
    code = inference.main(["--checkpoint", str(d), "--input", SPEECH, "--output", str(tmp_path / "o.wav")])
    line = _one_line(capsys)
    assert code == 2 and str(d / "config.yaml") in line and needle in line, line


def test_deeply_nested_yaml_is_one_line(tmp_path, hf_dir, capsys):
    d = _export(tmp_path, hf_dir, "generator: " + "[" * 100_000 + "]" * 100_000 + "\n")
    code = inference.main(["--checkpoint", str(d), "--input", SPEECH, "--output", str(tmp_path / "o.wav")])
    line = _one_line(capsys)
    assert code == 2 and str(d / "config.yaml") in line and "nested too deeply" in line, line


def test_yue_teacher_size_is_bounded(tmp_path, capsys):
    root = tmp_path / "yue"
    (root / "final_ckpt").mkdir(parents=True)
    torch.save({"codec_model": {"x": torch.zeros(1)}}, root / "final_ckpt" / "ckpt_00360000.pth")
    doc = read_config(TINY_CONFIG)
    (root / "final_ckpt" / "config.yaml").write_text(yaml.safe_dump(doc))
    teacher = root / "semantic_ckpts" / "hf_1_325000" / "config.json"
    teacher.parent.mkdir(parents=True)
    teacher.write_text(json.dumps({"model_type": "hubert", "hidden_size": 10**9, "num_attention_heads": 1}))
    code = inference.main(["--checkpoint", str(root), "--input", SPEECH, "--output", str(tmp_path / "o.wav")])
    line = _one_line(capsys)
    assert code == 2 and f"{teacher}: hidden_size: 1000000000 would allocate" in line, line


def test_vocoder_config_sizes_are_bounded(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "backbone": {"class_path": "vocos.models.VocosBackbone", "init_args": {"input_channels": 48, "dim": 32, "num_layers": 10**9}},
        "head": {"class_path": "vocos.heads.ISTFTHead", "init_args": {"dim": 32, "n_fft": 3528, "hop_length": 882}},
    }))  # fmt: skip
    with pytest.raises(ConfigError, match=r"backbone\.init_args\.num_layers: 1000000000 would allocate"):
        read_vocoder_config(path)


def test_training_segment_size_is_refused_before_log_dir(tmp_path, capsys):
    log_dir = tmp_path / "run"
    code = trainer.cli(["--config", str(TINY_CONFIG), f"log_dir={log_dir}", "segment_size=100000000000"])
    line = _one_line(capsys)
    assert code == 1 and "segment_size: 100000000000 would allocate" in line and str(TINY_CONFIG) in line, line
    assert not log_dir.exists()  # refused before anything is written


def test_a_wav_declaring_1_hz_is_not_resampled(tmp_path, release_dir, capsys):
    src = tmp_path / "one_hz.wav"
    sf.write(src, np.zeros(200_000, dtype=np.float32), 1)  # 200k samples "at 1 Hz": 3.2e9 samples at 16 kHz
    code = inference.main(
        ["--checkpoint", str(release_dir / "model.pth"), "--input", str(src), "--output", str(tmp_path / "o.wav")]
    )
    line = _one_line(capsys)
    assert code == 2 and str(src) in line and "1 Hz" in line and "bound" in line, line
    assert not (tmp_path / "o.wav").exists()


@pytest.mark.parametrize(
    "override,key",
    [("batch_size=100000000", "batch_size"),
     ("full_multi_scale_stft_loss.fft_sizes=[512, 1024, 1000000000]", "full_multi_scale_stft_loss.fft_sizes"),
     ("mfd.hidden_channels=[32, 32, 32, 1000000000]", "mfd.hidden_channels"),
     ("mel_scale_loss.num_mels=10000000000", "mel_scale_loss.num_mels")],
)  # fmt: skip
def test_training_recipe_sizes_are_bounded(tmp_path, capsys, override, key):
    log_dir = tmp_path / "run"
    code = trainer.cli(["--config", str(TINY_CONFIG), f"log_dir={log_dir}", override])
    line = _one_line(capsys)
    assert code == 1 and f": {key}: " in line and "would allocate" in line, line
    assert not log_dir.exists()


def test_deeply_nested_override_is_one_line(tmp_path, capsys):
    code = trainer.cli(
        ["--config", str(TINY_CONFIG), f"log_dir={tmp_path / 'run'}", "d_list=" + "[" * 100_000 + "]" * 100_000]
    )
    line = _one_line(capsys)
    assert code == 1 and "d_list: not valid YAML (nested too deeply)" in line, line


def test_an_evaluation_rate_beyond_the_bound_fails_the_file(tmp_path, capsys):
    import evaluate

    argv = [
        "--reference",
        SPEECH,
        "--estimate",
        str(ASSETS / "speech_en_xcodec_0.5kbps.wav"),
        "--output",
        str(tmp_path / "r.json"),
    ]
    code = evaluate.main([*argv, "--sample-rate", "1000000000"])
    line = _one_line(capsys)
    assert code == 2 and "resample to" in line and "over the bound" in line, line
    assert not (tmp_path / "r.json").exists()
